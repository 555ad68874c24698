"""Load a config: schema defaults (schema.py) <- recipe file <- ``key=value`` overrides.

Strict: an unknown key anywhere is an error that names the key and the closest valid one; a value of
the wrong type, outside an enum or outside its range (declared next to the key in the schema) names
the key, the value and what is valid; broken YAML names the file, line and column.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from .ranges import range_violations
from .schema import SSLConfig

CONFIG_DIR = Path(__file__).resolve().parent


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
    if not isinstance(other, DictConfig):
        raise ConfigError(f"{origin} must be a mapping of config keys, got a {type(other).__name__}")
    _check_keys(other, base, origin)
    try:
        return OmegaConf.merge(base, other)
    except (ValidationError, ConfigKeyError, ConfigAttributeError) as error:
        key = f"{error.full_key}: " if getattr(error, "full_key", None) else ""
        raise ConfigError(f"invalid value in {origin}: {key}{str(error).splitlines()[0]}") from None


def _yaml_error(error: yaml.YAMLError, origin: str) -> ConfigError:
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return ConfigError(f"invalid YAML in {origin}{where}: {problem}")


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise _yaml_error(error, str(path)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None


def validate(cfg: DictConfig) -> None:
    """Every key against its range in the schema, then the rules that tie several keys together."""
    problems = range_violations(cfg, SSLConfig)
    if problems:
        raise ConfigError("\n".join(problems))
    if cfg.optim.warmup_epochs > cfg.optim.epochs:
        raise ConfigError(f"optim.warmup_epochs={cfg.optim.warmup_epochs} must be <= optim.epochs={cfg.optim.epochs}")
    if cfg.crops.color_jitter[3] > 0.5:
        raise ConfigError(f"crops.color_jitter hue (4th value) must be in [0, 0.5], got {cfg.crops.color_jitter[3]}")
    student = cfg.student
    if student.embed_dim is not None and student.num_heads is not None and student.embed_dim % student.num_heads:
        raise ConfigError(
            f"student.embed_dim={student.embed_dim} must be a multiple of student.num_heads={student.num_heads}"
        )
    if cfg.crops.global_crops_size % cfg.student.patch_size or cfg.crops.local_crops_size % cfg.student.patch_size:
        raise ConfigError(
            f"crop sizes {cfg.crops.global_crops_size} and {cfg.crops.local_crops_size} must be multiples of "
            f"student.patch_size={cfg.student.patch_size}"
        )
    if len(cfg.crops.mean) != cfg.student.in_chans or len(cfg.crops.std) != cfg.student.in_chans:
        raise ConfigError(f"crops.mean/std need {cfg.student.in_chans} values (student.in_chans)")


def load_config(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved, validated config (an OmegaConf object typed by :class:`SSLConfig`)."""
    cfg = OmegaConf.structured(SSLConfig)
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            packaged = CONFIG_DIR / path
            if not packaged.exists():
                raise ConfigError(f"config file {config_file} not found (nor {packaged})")
            path = packaged
        cfg = _merge(cfg, _load_yaml(path), str(path))
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key=value")
        origin = f"override {override!r}"
        try:
            parsed = OmegaConf.from_dotlist([override])
        except yaml.YAMLError as error:
            raise _yaml_error(error, origin) from None
        cfg = _merge(cfg, parsed, origin)
    validate(cfg)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg))
