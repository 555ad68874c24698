"""The closed sets of values some curation keys and options take: one enum per set, defined once.

The members are :class:`dinov2.configs.choices.Choice` (a member is its string value), typed fields of
the curation schema (config.py): OmegaConf converts a YAML value or ``key=value`` override to the member
and rejects anything else, naming the key and the valid values. The CLI's argparse ``choices=`` read
``Enum.values()``. A function that Python code may call with a plain string takes it through
:func:`choose`, the one check, with the same kind of message.
"""

from __future__ import annotations

from typing import TypeVar

from dinov2.configs.choices import Choice

from .arrays import CurationInputError


class GroupRule(Choice):
    """How linked rows form groups (groups.py describes both)."""

    representative = "representative"  # a row is removed only if linked to the kept row (no chaining)
    connected = "connected"  # connected components of the link graph, as in the DINOv2 paper


class PickStrategy(Choice):
    """Which points of a cluster are taken (k-means resampling, the final sampling): the closest to the
    centroid, or random ones."""

    closest = "closest"
    random = "random"


# "kmeans++" is no Python identifier: the functional form keeps each member's name equal to its value,
# which OmegaConf lists in its error message.
KMeansInit = Choice("KMeansInit", [(value, value) for value in ("auto", "kmeans++", "random")], module=__name__)
KMeansInit.__doc__ = "k-means initialisation: auto is k-means++ up to kmeans.KMEANS_PP_MAX_CLUSTERS clusters, else random."


class ShardLauncher(Choice):
    """How shard jobs start (launch.py): one process per shard on this machine, or a SLURM job array."""

    local = "local"
    slurm = "slurm"


class EmbeddingDtype(Choice):
    """The dtype of the stored embeddings."""

    float32 = "float32"
    float16 = "float16"


class KMeansDtype(Choice):
    """The precision of the distributed k-means distances (float64: identical assignments for any world size)."""

    float32 = "float32"
    float64 = "float64"


class FaissDevice(Choice):
    """Where FAISS indexes and k-means run: auto is the GPU when faiss-gpu and a GPU are present."""

    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


C = TypeVar("C", bound=Choice)


def choose(choices: type[C], value: str, what: str) -> C:
    """``value`` as a member of ``choices``, or a :class:`CurationInputError` naming ``what``, the valid values
    and ``value``."""
    try:
        return choices(value)
    except ValueError:
        raise CurationInputError(f"{what} must be one of {', '.join(choices.values())}, got {value!r}") from None
