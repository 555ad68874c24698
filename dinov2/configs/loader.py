"""Load a config: schema defaults (schema.py) <- recipe file <- ``key=value`` overrides.

``load_structured(schema, ...)`` loads any dataclass schema this way (the training config: ``load_config``;
the curation config: ``data_curation.config``).

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
            parent = key.rpartition(".")[0]
            here = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == parent and k != parent]
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(sorted(here))}"
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
    """The rules that tie several keys of the training config together (each key's own range is checked
    by :func:`load_structured`)."""
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
    if cfg.train.init_from and cfg.student.pretrained_weights:
        raise ConfigError(
            f"train.init_from={cfg.train.init_from} and student.pretrained_weights={cfg.student.pretrained_weights} "
            f"both set the student's starting weights (init_from would silently overwrite them); set only one")
    if cfg.evaluation.val_labels and not cfg.evaluation.val_dataset:
        raise ConfigError(f"evaluation.val_labels={cfg.evaluation.val_labels} is set but evaluation.val_dataset is not "
                          f"(the labels of which queries?)")


def _editable(node: DictConfig) -> None:
    """A frozen dataclass in a schema makes a read-only node; a loaded config stays editable."""
    OmegaConf.set_readonly(node, False)
    for value in node.values():
        if isinstance(value, DictConfig):
            _editable(value)


def load_structured(schema: type, config_file: str | Path | None = None, overrides: Sequence[str] = (), *,
                    config_dir: Path = CONFIG_DIR) -> DictConfig:
    """The dataclass ``schema``'s defaults <- the YAML ``config_file`` (a path, or one relative to
    ``config_dir``) <- ``key=value`` overrides, typed by ``schema``; every value inside the range declared
    next to its key (``ranges.ranged``). Any misfit is a :class:`ConfigError` naming the key (or the file,
    line and column of broken YAML). The loader of the training config and of the curation config."""
    cfg = OmegaConf.structured(schema)
    _editable(cfg)
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            packaged = config_dir / path
            if not packaged.exists():
                nor = f" (nor {packaged})" if packaged != path else ""
                raise ConfigError(f"config file not found: {config_file}{nor}")
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
    problems = range_violations(cfg, schema)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def load_config(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved, validated training config (an OmegaConf object typed by :class:`SSLConfig`)."""
    cfg = load_structured(SSLConfig, config_file, overrides)
    validate(cfg)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg))
