"""What the schema declares next to each field: the valid range of a numeric key and a one-line description.

``ranged(default, gt=0, doc="...")`` is a dataclass field whose metadata carries a :class:`Range` and
the key's description; ``option(default, doc="...")`` is a non-numeric field with its description.
:func:`range_violations` walks a config against its dataclasses and names every value out of range;
:func:`schema_fields` is the one walk over the schema's leaf fields (``--print-config`` reads it).
Standard library only (the schema is imported by code that must not need OmegaConf).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Iterator

RANGE = "range"  # the dataclass field metadata keys
DOC = "doc"


@dataclass(frozen=True)
class Range:
    """Bounds of a number, or of every item of a list of numbers (then also its length and order)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    length: int | None = None  # a list: exactly this many items
    min_length: int = 0  # a list: at least this many items
    ordered: bool = False  # a list: items non-decreasing (a [min, max] pair)
    words: tuple[str, ...] = ()  # strings also valid in place of a number (e.g. ``auto``)

    def bounds(self) -> str:
        """``> 0``, ``>= 1``, ``in [0, 1)``..."""
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}"
        if high:
            return f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}"
        return "finite"

    def describe(self, is_list: bool = False) -> str:
        if not is_list:
            return self.bounds() + "".join(f" or {word!r}" for word in self.words)
        count = f"{self.length} values" if self.length is not None else f"at least {self.min_length} value(s)"
        order = ", in non-decreasing order (min <= max)" if self.ordered else ""
        return f"{count}, each {self.bounds()}{order}"

    def contains_number(self, value: float | str) -> bool:
        """NaN and infinities are never valid; a string is valid when it is one of ``words``."""
        if isinstance(value, str):
            return value in self.words
        return (
            math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def contains_list(self, items: list) -> bool:
        return (
            (self.length is None or len(items) == self.length)
            and len(items) >= self.min_length
            and all(self.contains_number(item) for item in items)
            and (not self.ordered or all(a <= b for a, b in zip(items, items[1:])))
        )


def _num(bound: float) -> str:
    return f"{bound:g}"


def ranged(default: Any, *, ge=None, gt=None, le=None, lt=None, length=None, min_length=0, ordered=False,
           words: tuple[str, ...] = (), doc: str = "") -> Any:
    """A dataclass field with ``default`` whose valid values are the given bounds.

    A list default makes a list key: the bounds apply to each item (``length``/``min_length``/
    ``ordered`` to the list). A ``None`` default makes an optional key: null is also valid.
    ``words``: strings also valid (the field's type is then ``Union[int, str]``, e.g. ``auto``).
    ``doc``: the key's one-line description (``dinov2-train --print-config`` shows it).
    """
    spec = Range(ge=ge, gt=gt, le=le, lt=lt, length=length, min_length=min_length, ordered=ordered, words=tuple(words))
    return option(default, doc=doc, _range=spec)


def option(default: Any, *, doc: str = "", _range: Range | None = None) -> Any:
    """A dataclass field with ``default`` and its one-line description ``doc`` (non-numeric keys)."""
    metadata = {DOC: doc} if _range is None else {RANGE: _range, DOC: doc}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def schema_fields(schema: type, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """``(dotted key, type hint, field)`` for every leaf field of a dataclass schema, recursively, in order."""
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            yield from schema_fields(hint, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", hint, item


def ranged_fields(schema: type, prefix: str = "") -> Iterator[tuple[str, Any, Range | None]]:
    """``(dotted key, type hint, range or None)`` for every leaf field of a dataclass schema, recursively."""
    for key, hint, item in schema_fields(schema, prefix):
        yield key, hint, item.metadata.get(RANGE)


def range_violations(cfg: Any, schema: type) -> list[str]:
    """A message per value of ``cfg`` (attribute access, e.g. a DictConfig) out of its schema range."""
    messages = []
    for key, hint, spec in ranged_fields(schema):
        if spec is None:
            continue
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        optional = type(None) in typing.get_args(hint)
        if value is None and optional:
            continue
        is_list = typing.get_origin(hint) is list
        if is_list:
            value = list(value)
        if not (spec.contains_list(value) if is_list else spec.contains_number(value)):
            null = " (or null)" if optional else ""
            finite = "" if is_list or isinstance(value, str) or math.isfinite(value) else "a finite number "
            messages.append(f"{key}={value!r} is out of range: must be {finite}{spec.describe(is_list)}{null}")
    return messages
