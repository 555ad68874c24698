"""FAISS-based data curation for DINOv2 pretraining (`dinov2-curate`).

embed -> dedup (self, relative) -> retrieval -> hierarchical k-means -> balanced
sampling -> manifest. The maths lives in pure functions (dedup, retrieval, kmeans,
sampling, index); `stages` wraps each in an idempotent, resumable file-level stage; `cli`
and `pipeline` drive the stages.
"""

from .arrays import CurationInputError
from .dedup import relative_dedup, self_dedup
from .index import IndexOptions, build_index, exact_search, gpu_available, measure_recall, search
from .kmeans import hierarchical_kmeans
from .retrieval import retrieve_by_clusters, retrieve_nearest
from .sampling import balanced_allocation, hierarchical_sample

__all__ = [
    "CurationInputError",
    "IndexOptions",
    "balanced_allocation",
    "build_index",
    "exact_search",
    "gpu_available",
    "hierarchical_kmeans",
    "hierarchical_sample",
    "measure_recall",
    "relative_dedup",
    "retrieve_by_clusters",
    "retrieve_nearest",
    "search",
    "self_dedup",
]
