"""Typed configs (OmegaConf structured configs over dataclasses) and the YAML recipes shipped with them."""

from .loader import CONFIG_DIR, ConfigError, load_config, save_config
from .schema import SSLConfig

__all__ = ["CONFIG_DIR", "ConfigError", "SSLConfig", "load_config", "save_config"]
