"""Load a config: schema defaults <- ssl_default_config.yaml <- recipe file <- ``key=value`` overrides.

Strict: an unknown key anywhere is an error that names the key and the closest valid one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from .schema import SSLConfig

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = CONFIG_DIR / "ssl_default_config.yaml"

_CHOICES = {
    "train.centering": ("centering", "sinkhorn_knopp"),
    "compute.precision": ("fp32", "bf16", "fp16"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_256", "none"),
    "student.arch": ("vit_small", "vit_base", "vit_large", "vit_giant2"),
    "student.ffn_layer": ("mlp", "swiglu", "swiglufused", "identity"),
    "student.attention_backend": ("auto", "xformers", "sdpa", "math", "sdpa_masked"),
    "distributed.launcher": ("auto", "torchrun", "slurm", "single"),
    "distributed.backend": ("auto", "nccl", "gloo"),
    "distributed.param_dtype": ("fp32", "bf16", "fp16"),
    "distributed.reduce_dtype": ("fp32", "bf16", "fp16"),
}


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _all_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, DictConfig):
            keys += _all_keys(value, path + ".")
    return keys


def _check_keys(candidate: DictConfig, schema: DictConfig, origin: str) -> None:
    valid = _all_keys(schema)
    for key in _all_keys(candidate):
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}' in {origin}{hint}")


def _merge(base: DictConfig, other: DictConfig, origin: str) -> DictConfig:
    _check_keys(other, base, origin)
    try:
        return OmegaConf.merge(base, other)
    except (ValidationError, ConfigKeyError, ConfigAttributeError) as error:
        raise ConfigError(f"invalid value in {origin}: {str(error).splitlines()[0]}") from None


def validate(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    if cfg.train.batch_size_per_gpu < 1:
        raise ConfigError(f"train.batch_size_per_gpu must be >= 1, got {cfg.train.batch_size_per_gpu}")
    if cfg.train.global_batch_size is not None and cfg.train.global_batch_size < 1:
        raise ConfigError(f"train.global_batch_size must be >= 1, got {cfg.train.global_batch_size}")
    if cfg.distributed.timeout_minutes <= 0:
        raise ConfigError(f"distributed.timeout_minutes must be > 0, got {cfg.distributed.timeout_minutes}")
    if cfg.distributed.replicate_degree < 1:
        raise ConfigError(f"distributed.replicate_degree must be >= 1, got {cfg.distributed.replicate_degree}")
    if cfg.compute.grad_accum_steps < 1:
        raise ConfigError(f"compute.grad_accum_steps must be >= 1, got {cfg.compute.grad_accum_steps}")
    if cfg.crops.global_crops_size % cfg.student.patch_size or cfg.crops.local_crops_size % cfg.student.patch_size:
        raise ConfigError(
            f"crop sizes {cfg.crops.global_crops_size} and {cfg.crops.local_crops_size} must be multiples of "
            f"student.patch_size={cfg.student.patch_size}"
        )
    if len(cfg.crops.mean) != cfg.student.in_chans or len(cfg.crops.std) != cfg.student.in_chans:
        raise ConfigError(f"crops.mean/std need {cfg.student.in_chans} values (student.in_chans)")
    low, high = cfg.ibot.mask_ratio_min_max
    if not 0 <= low <= high <= 1:
        raise ConfigError(f"ibot.mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {[low, high]}")


def load_config(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved, validated config (an OmegaConf object typed by :class:`SSLConfig`)."""
    cfg = OmegaConf.structured(SSLConfig)
    cfg = _merge(cfg, OmegaConf.load(DEFAULT_CONFIG), str(DEFAULT_CONFIG))
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            packaged = CONFIG_DIR / path
            if not packaged.exists():
                raise ConfigError(f"config file {config_file} not found (nor {packaged})")
            path = packaged
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([override]), f"override {override!r}")
    validate(cfg)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg))
