"""What an exported backbone file says about itself: its architecture and its input.

``dinov2-export`` writes a :class:`BackboneDescription` into every file it produces, so that no
later command needs architecture or preprocessing flags:

- ``.safetensors``: the JSON text under the header metadata key :data:`DESCRIPTION_KEY`;
- ``.pth``: the same JSON text as the one non-tensor entry of the state dict, under the same key
  (a ``str`` value, which ``torch.load(weights_only=True)`` reads without running code);
- Hugging Face directories: in ``config.json`` under the same key.

The description holds the keyword arguments of ``dinov2.models.vision_transformer.build_vit``
(width, depth, heads, patch, the position-embedding grid it was trained at, channels, FFN,
registers, LayerScale, biases, position-embedding resampling offset and antialiasing) and the
input the backbone expects (image size and resize ratio of its evaluation, per-channel mean and
std of pixels in [0, 1]). Reading is strict: a missing or unknown field, a wrong type or a
newer format version is an error naming the field, never a guess.

Only the standard library is imported here, and ``dinov2.models.arch`` (standard library only too), which
translates a training config into the architecture fields once for the trainer and for this description.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from dinov2.models.arch import ARCH_FIELDS, ARCH_SHAPES, backbone_kwargs

DESCRIPTION_KEY = "dinov2_backbone"  # the one reserved non-tensor entry of a weights file
FORMAT = "dinov2-backbone"
VERSION = 1
ARCHS = tuple(ARCH_SHAPES)


class DescriptionError(ValueError):
    """A description that cannot be read or does not fit (names the field and the file)."""


@dataclass(frozen=True)
class BackboneDescription:
    arch: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int  # side of the position-embedding grid in pixels: the size the backbone was trained at
    in_chans: int
    mlp_ratio: float
    ffn_layer: str
    num_register_tokens: int
    init_values: float | None  # LayerScale init (None: no LayerScale); the trained gammas are in the file
    qkv_bias: bool
    proj_bias: bool
    ffn_bias: bool
    interpolate_offset: float
    interpolate_antialias: bool
    mean: tuple[float, ...]  # per input channel, of pixels in [0, 1]
    std: tuple[float, ...]
    resize_ratio: float = 256 / 224  # evaluation: resize the short side to img_size x this, then center-crop
    source: dict = field(default_factory=dict)  # provenance: checkpoint, step, which (teacher/student)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise DescriptionError(f"arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans"):
            if getattr(self, name) < 1:
                raise DescriptionError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise DescriptionError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise DescriptionError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise DescriptionError(
                f"mean {list(self.mean)} and std {list(self.std)} need one value per input channel ({self.in_chans})")
        if min(self.std) <= 0:
            raise DescriptionError(f"std values must be positive, got {list(self.std)}")
        if self.resize_ratio < 1:
            raise DescriptionError(f"resize_ratio must be >= 1, got {self.resize_ratio}")

    # ------------------------------------------------------------------ building
    def builder_kwargs(self) -> dict:
        """Keyword arguments of ``build_vit(self.arch, ...)`` (and of the hub entry points)."""
        return {name: getattr(self, name) for name in ARCH_FIELDS}

    @property
    def grid(self) -> int:
        """Patches per side at the training size."""
        return self.img_size // self.patch_size

    # ------------------------------------------------------------------ text
    def to_json(self) -> str:
        body = {"format": FORMAT, "version": VERSION, **asdict(self)}
        body["mean"], body["std"] = list(self.mean), list(self.std)
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "description") -> "BackboneDescription":
        try:
            body = json.loads(text)
        except (TypeError, json.JSONDecodeError) as error:
            raise DescriptionError(f"{source}: the {DESCRIPTION_KEY!r} entry is not JSON ({error})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise DescriptionError(f"{source}: the {DESCRIPTION_KEY!r} entry is not a {FORMAT} description")
        if not isinstance(body.get("version"), int) or body["version"] > VERSION:
            raise DescriptionError(
                f"{source}: description version {body.get('version')!r}; this dinov2 reads versions <= {VERSION} "
                "(upgrade dinov2 to read it)")
        body = {k: v for k, v in body.items() if k not in ("format", "version")}
        return cls.from_dict(body, source)

    @classmethod
    def from_dict(cls, body: dict, source: str = "description") -> "BackboneDescription":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(body) - set(known))
        required = [f.name for f in fields(cls) if f.name not in ("resize_ratio", "source")]
        missing = [name for name in required if name not in body]
        if unknown or missing:
            raise DescriptionError(
                f"{source}: description " + "; ".join(
                    part for part in (f"misses {', '.join(missing)}" if missing else "",
                                      f"has unknown fields {', '.join(unknown)}" if unknown else "") if part))
        values = {}
        for name, value in body.items():
            values[name] = _checked(name, value, source)
        try:
            return cls(**values)
        except DescriptionError as error:
            raise DescriptionError(f"{source}: {error}") from None


_INTS = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans", "num_register_tokens")
_BOOLS = ("qkv_bias", "proj_bias", "ffn_bias", "interpolate_antialias")
_FLOATS = ("mlp_ratio", "interpolate_offset", "resize_ratio")


def _checked(name: str, value, source: str):
    """One field's value with its type checked (JSON gives int for 1.0-valued floats: accepted)."""
    def wrong(expected: str):
        return DescriptionError(f"{source}: description field {name} must be {expected}, got {value!r}")

    if name in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if name in _BOOLS:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if name in _FLOATS or name == "init_values":
        if value is None and name == "init_values":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if name in ("mean", "std"):
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise wrong("a list of numbers")
        return tuple(float(v) for v in value)
    if name in ("arch", "ffn_layer"):
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if name == "source":
        if not isinstance(value, dict):
            raise wrong("an object")
        return value
    raise wrong("a known field")  # pragma: no cover - from_dict filters unknown names first


def from_config(cfg, *, source: dict | None = None) -> BackboneDescription:
    """The description of the backbone a training config builds (teacher and student alike)."""
    return BackboneDescription(
        arch=str(getattr(cfg.student.arch, "value", cfg.student.arch)),
        **backbone_kwargs(cfg.student, cfg.crops.global_crops_size),  # what the trainer builds (ARCH_FIELDS)
        mean=tuple(float(v) for v in cfg.crops.mean), std=tuple(float(v) for v in cfg.crops.std),
        resize_ratio=float(cfg.evaluation.resize_ratio), source=dict(source or {}),
    )


def conflicts(description: BackboneDescription, given: dict) -> list[str]:
    """``name: given X, file has Y`` for each architecture keyword in ``given`` that contradicts the file."""
    have = description.builder_kwargs()
    return [f"{k}={v!r} (the file has {have[k]!r})" for k, v in given.items() if k in have and v != have[k]]
