"""Typed configs (OmegaConf structured configs over dataclasses) and the YAML recipes shipped with them.

The schema, its enums and ranges are standard library only, so the model layers can import the enums
without OmegaConf (``hubconf`` needs torch alone); the loader's names import OmegaConf on first use.
"""

from .choices import Arch, AttentionBackend, Centering, Choice, DistBackend, FfnLayer, Launcher, Precision, ScalingRule
from .schema import SSLConfig

_LOADER_NAMES = ("CONFIG_DIR", "ConfigError", "load_config", "save_config")

__all__ = [
    "Arch", "AttentionBackend", "Centering", "Choice", "DistBackend", "FfnLayer", "Launcher", "Precision", "SSLConfig",
    "ScalingRule", *_LOADER_NAMES,
]


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
