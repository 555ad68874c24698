"""Schema and strict loading of the `dinov2-curate run` configuration (YAML, OmegaConf).

Unknown keys are errors that name the key and the closest valid one (difflib), so a typo
such as ``self_dedup.treshold`` fails loudly instead of silently using the default.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .arrays import CurationInputError
from .index import IndexOptions


@dataclass
class HashDedupConfig:
    enabled: bool = False  # raw pool, before embedding: near-exact copies by PCA hash
    bits: int = 64
    radius: int = 10
    thumb_size: int = 16
    factory: str = "BFlat"  # BFlat (exact) | BHash4x16 (exact, large pools) | BIVF1024 (approximate)
    search_params: str = ""
    rule: str = "representative"  # representative | connected
    basis: Optional[str] = None
    fit_sample: int = 100_000


@dataclass
class FilterConfig:
    enabled: bool = False  # classifier over embeddings (e.g. NSFW): drop rows scoring above threshold
    classifier: Optional[str] = None
    threshold: float = 0.5
    positive: List[int] = field(default_factory=list)


@dataclass
class BlurFacesConfig:
    enabled: bool = False  # blurred copies of the selected images that show faces; the manifest points to them
    cascade: str = "haarcascade_frontalface_default.xml"
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 24
    margin: float = 0.1
    strength: float = 0.25


@dataclass
class EmbedConfig:
    images: Optional[str] = None  # folder or list file; None when `embeddings` is given
    embeddings: Optional[str] = None  # existing embeddings.npy (+ paths.txt beside it) instead of embedding
    backbone: str = "dinov2_vits14"
    weights: Optional[str] = "LVD142M"  # "LVD142M", a local .pth, a file:// URL, or "random"
    image_size: int = 224
    resize_size: int = 256
    batch_size: int = 32
    num_workers: int = 0
    dtype: str = "float32"
    device: str = "auto"
    part_size: int = 4096
    shards: int = 1  # > 1: embed as that many shard jobs (launcher), then check and merge them
    launcher: str = "local"  # local (one process per shard) | slurm (job array; see `embed --help` for its options)


@dataclass
class SelfDedupConfig:
    enabled: bool = True
    k: int = 16
    threshold: float = 0.9
    rule: str = "representative"  # representative (no chaining) | connected (components, as in the paper)
    index_shards: int = 1  # > 1: search that many index shards (one after the other) and merge: same pairs with Flat


@dataclass
class RelativeDedupConfig:
    enabled: bool = False
    against: List[str] = field(default_factory=list)  # reference (evaluation set) embeddings .npy
    threshold: float = 0.9


@dataclass
class RetrievalConfig:
    enabled: bool = False
    queries: Optional[str] = None  # curated seed-set embeddings .npy
    k: Optional[int] = 4
    clusters: Optional[int] = None  # cluster-based retrieval instead of k (small seed sets)
    per_cluster: Optional[int] = None


@dataclass
class KMeansConfig:
    enabled: bool = True
    clusters: List[Any] = field(default_factory=lambda: [100, 10])  # ints, or "0.01x" = 1 % of the rows clustered
    niter: int = 20
    resampling_steps: int = 5
    sample_size: int = 10
    strategy: str = "closest"  # how resampling picks points: closest | random
    init: str = "auto"  # auto | kmeans++ | random
    seed: int = 0


@dataclass
class SamplingConfig:
    target: int = 1000
    strategy: str = "random"  # random | closest
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


def valid_keys(schema=CurationConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(valid_keys(type(default), f"{name}."))
    return keys


def check_keys(user: Any, source: str, schema=CurationConfig, prefix: str = "") -> None:
    """Raise on the first key of ``user`` (a nested mapping) that the schema lacks."""
    if not isinstance(user, dict):
        return
    known = {f.name: f for f in fields(schema)}
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            candidates = [k for k in valid_keys() if k.count(".") == dotted.count(".")]
            close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(sorted(known))}"
            raise CurationInputError(f"unknown config key '{dotted}' in {source}{hint}")
        default = known[key].default_factory() if callable(known[key].default_factory) else known[key].default  # type: ignore[misc]
        if is_dataclass(default):
            check_keys(value, source, type(default), f"{dotted}.")


def packaged_config(name: str) -> Path:
    """Path of a config shipped in dinov2/configs/curation/ (``default`` or ``default.yaml``)."""
    filename = name if name.endswith(".yaml") else f"{name}.yaml"
    return Path(str(resources.files("dinov2") / "configs" / "curation" / filename))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults <- YAML file <- ``key=value`` overrides; every key checked against the schema."""
    merged = OmegaConf.structured(CurationConfig)
    # OmegaConf makes the node of a frozen dataclass read-only; a loaded config stays editable.
    OmegaConf.set_readonly(merged.index, False)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            shipped = packaged_config(str(path))
            if path.parent == Path(".") and shipped.is_file():
                path = shipped
            else:
                raise CurationInputError(f"config file not found: {path} (expected a YAML file, e.g. configs/curation/default.yaml)")
        try:
            layers.append((OmegaConf.load(path), str(path)))
        except (OmegaConfBaseException, ValueError) as exc:
            raise CurationInputError(f"cannot parse config {path}: {exc}") from exc
    if overrides:
        try:
            layers.append((OmegaConf.from_dotlist(list(overrides)), "command-line overrides"))
        except (OmegaConfBaseException, ValueError) as exc:
            raise CurationInputError(f"bad override in {overrides}: {exc} (expected key=value)") from exc
    for layer, source in layers:
        check_keys(OmegaConf.to_container(layer, resolve=False), source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise CurationInputError(f"invalid value in {source}: {exc}") from exc
    return merged
