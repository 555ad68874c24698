"""``dinov2-train --print-config``: the resolved config as YAML, every key commented with its
description, default and valid values, all read from the schema (schema.py, ranges.py).

The output is itself a valid recipe: saved to a file it loads back to the same config.
"""

from __future__ import annotations

import dataclasses
import typing
from enum import Enum
from typing import Any

import yaml

from .ranges import DOC, RANGE, schema_fields
from .schema import SSLConfig


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(item) for item in value]
    return value


def yaml_value(value: Any) -> str:
    """One value as inline YAML (``[0.32, 1.0]``, ``null``, ``'auto'`` ...)."""
    return yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def _default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    return item.default_factory()


def valid_values(hint: Any, item: dataclasses.Field) -> str:
    """``one of fp32, bf16, fp16`` / ``>= 1 (or null)`` / ``true or false`` ..., from the type and range."""
    args = typing.get_args(hint)
    optional = type(None) in args
    inner = next((a for a in args if a is not type(None)), hint) if optional else hint
    spec = item.metadata.get(RANGE)
    if spec is not None:
        text = spec.describe(typing.get_origin(inner) is list)
    elif isinstance(inner, type) and issubclass(inner, Enum):
        text = "one of " + ", ".join(member.value for member in inner)
    elif inner is bool:
        text = "true or false"
    else:
        text = "a string"
    return text + (" (or null)" if optional else "")


def key_reference(schema: type = SSLConfig) -> list[dict]:
    """``{key, default, valid, doc}`` for every key of the schema, in schema order."""
    return [
        {"key": key, "default": _default(item), "valid": valid_values(hint, item), "doc": item.metadata.get(DOC, "")}
        for key, hint, item in schema_fields(schema)
    ]


def format_config(cfg, schema: type = SSLConfig) -> str:
    """The resolved ``cfg`` as commented YAML: ``key: value  # description [default ...; valid values]``."""
    lines, section = [], None
    for entry in key_reference(schema):
        head, _, name = entry["key"].rpartition(".")
        if head != section:
            lines.append(f"{head}:")
            section = head
        value = cfg
        for part in entry["key"].split("."):
            value = value[part]
        changed = "" if _plain(value) == _plain(entry["default"]) else " (changed)"
        lines.append(f"  {name}: {yaml_value(value)}  # {entry['doc']} [default {yaml_value(entry['default'])}{changed}; "
                     f"{entry['valid']}]")
    return "\n".join(lines)
