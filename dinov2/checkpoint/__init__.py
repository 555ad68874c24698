from .manager import CheckpointManager, CheckpointMismatchError, check_fits, read_metadata

__all__ = ["CheckpointManager", "CheckpointMismatchError", "check_fits", "read_metadata"]
