from .metrics import MetricsWriter
from .records import read_metrics

__all__ = ["MetricsWriter", "read_metrics"]
