from .manager import CheckpointManager, CheckpointMismatchError, CheckpointSaveError, check_fits, is_good
from .metadata import CheckpointReadError, UnsafeCheckpointError, read_metadata

__all__ = [
    "CheckpointManager", "CheckpointMismatchError", "CheckpointReadError", "CheckpointSaveError",
    "UnsafeCheckpointError", "check_fits", "is_good", "read_metadata",
]
