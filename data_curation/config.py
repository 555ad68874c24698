"""Schema of the `dinov2-curate run` configuration, loaded by the training config's strict loader.

Unknown keys are errors that name the key and the closest valid one, so a typo such as
``self_dedup.treshold`` fails loudly instead of silently using the default; numeric keys carry
their valid range (``ranged``, as in dinov2/configs/schema.py), checked at load time; keys with a closed
set of values are enums (choices.py), so a wrong value names the key and the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig

from dinov2.configs.loader import CONFIG_DIR, ConfigError, load_structured
from dinov2.configs.ranges import ranged

from .arrays import CurationInputError
from .choices import EmbeddingDtype, GroupRule, KMeansInit, PickStrategy, ShardLauncher
from .index import IndexOptions

CURATION_CONFIG_DIR = CONFIG_DIR / "curation"
COSINE = dict(ge=-1.0, le=1.0)


@dataclass
class HashDedupConfig:
    enabled: bool = False  # raw pool, before embedding: near-exact copies by PCA hash
    bits: int = ranged(64, ge=1)
    radius: int = ranged(10, ge=0)
    thumb_size: int = ranged(16, ge=1)
    factory: str = "BFlat"  # BFlat (exact) | BHash4x16 (exact, large pools) | BIVF1024 (approximate)
    search_params: str = ""
    rule: GroupRule = GroupRule.representative
    basis: Optional[str] = None
    fit_sample: int = ranged(100_000, ge=1)


@dataclass
class FilterConfig:
    enabled: bool = False  # classifier over embeddings (e.g. NSFW): drop rows scoring above threshold
    classifier: Optional[str] = None
    threshold: float = ranged(0.5, ge=0.0, le=1.0)  # a probability
    positive: List[int] = field(default_factory=list)


@dataclass
class BlurFacesConfig:
    enabled: bool = False  # blurred copies of the selected images that show faces; the manifest points to them
    cascade: str = "haarcascade_frontalface_default.xml"
    scale_factor: float = ranged(1.1, gt=1.0)
    min_neighbors: int = ranged(5, ge=0)
    min_size: int = ranged(24, ge=1)
    margin: float = ranged(0.1, ge=0.0)
    strength: float = ranged(0.25, gt=0.0)


@dataclass
class EmbedConfig:
    images: Optional[str] = None  # folder or list file; None when `embeddings` is given
    embeddings: Optional[str] = None  # existing embeddings.npy (+ paths.txt beside it) instead of embedding
    backbone: str = "dinov2_vits14"
    weights: Optional[str] = "LVD142M"  # "LVD142M", a local .pth, a file:// URL, or "random"
    image_size: int = ranged(224, ge=1)
    resize_size: int = ranged(256, ge=1)
    batch_size: int = ranged(32, ge=1)
    num_workers: int = ranged(0, ge=0)
    dtype: EmbeddingDtype = EmbeddingDtype.float32
    device: str = "auto"
    part_size: int = ranged(4096, ge=1)
    shards: int = ranged(1, ge=1)  # > 1: embed as that many shard jobs (launcher), then check and merge them
    launcher: ShardLauncher = ShardLauncher.local  # slurm: see `embed --help` for its options


@dataclass
class SelfDedupConfig:
    enabled: bool = True
    k: int = ranged(16, ge=1)
    threshold: float = ranged(0.9, **COSINE)
    rule: GroupRule = GroupRule.representative
    index_shards: int = ranged(1, ge=1)  # > 1: search that many index shards (one after the other) and merge: same pairs with Flat


@dataclass
class RelativeDedupConfig:
    enabled: bool = False
    against: List[str] = field(default_factory=list)  # reference (evaluation set) embeddings .npy
    threshold: float = ranged(0.9, **COSINE)


@dataclass
class RetrievalConfig:
    enabled: bool = False
    queries: Optional[str] = None  # curated seed-set embeddings .npy
    k: Optional[int] = ranged(4, ge=1)
    clusters: Optional[int] = ranged(None, ge=1)  # cluster-based retrieval instead of k (small seed sets)
    per_cluster: Optional[int] = ranged(None, ge=1)


@dataclass
class KMeansConfig:
    enabled: bool = True
    clusters: List[Any] = field(default_factory=lambda: [100, 10])  # ints, or "0.01x" = 1 % of the rows clustered
    niter: int = ranged(20, ge=1)
    resampling_steps: int = ranged(5, ge=0)
    sample_size: int = ranged(10, ge=1)
    strategy: PickStrategy = PickStrategy.closest  # how resampling picks points
    init: KMeansInit = KMeansInit.auto
    seed: int = 0


@dataclass
class SamplingConfig:
    target: int = ranged(1000, ge=1)
    strategy: PickStrategy = PickStrategy.random
    seed: int = 0


@dataclass
class CurationConfig:
    output_dir: str = "outputs/curation"
    manifest: str = "manifest.txt"  # relative to output_dir unless absolute
    progress: bool = True
    hash_dedup: HashDedupConfig = field(default_factory=HashDedupConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    index: IndexOptions = field(default_factory=IndexOptions)
    self_dedup: SelfDedupConfig = field(default_factory=SelfDedupConfig)
    relative_dedup: RelativeDedupConfig = field(default_factory=RelativeDedupConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    blur_faces: BlurFacesConfig = field(default_factory=BlurFacesConfig)


def packaged_config(name: str) -> Path:
    """Path of a config shipped in dinov2/configs/curation/ (``default`` or ``default.yaml``)."""
    filename = name if name.endswith(".yaml") else f"{name}.yaml"
    return CURATION_CONFIG_DIR / filename


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, through the project's one strict loader
    (``dinov2.configs.loader.load_structured``): unknown keys, wrong types and values out of range are
    errors naming the key, broken YAML names the file and line. A bare name (``default``) is a
    shipped config. Every failure is a :class:`CurationInputError`."""
    if path is not None and not Path(path).is_file() and Path(path).parent == Path(".") and packaged_config(str(path)).is_file():
        path = packaged_config(str(path))
    try:
        return load_structured(CurationConfig, path, list(overrides or ()), config_dir=CURATION_CONFIG_DIR)
    except ConfigError as error:
        hint = " (expected a YAML file, e.g. configs/curation/default.yaml)" if "config file not found" in str(error) else ""
        raise CurationInputError(f"{error}{hint}") from None
