from .manager import (
    CheckpointCorruptError, CheckpointManager, CheckpointMismatchError, CheckpointSaveError, check_fits, is_good,
    read_metadata,
)

__all__ = [
    "CheckpointCorruptError", "CheckpointManager", "CheckpointMismatchError", "CheckpointSaveError", "check_fits",
    "is_good", "read_metadata",
]
