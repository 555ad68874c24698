"""One report of how two sets of named tensors disagree: the error text for weights or
checkpoints that do not fit a model (usually another architecture or image size)."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

Shapes = Mapping[str, Optional[Sequence[int]]]  # None: an entry without a shape (an int, bytes)


def listing(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def key_mismatches(wanted: Shapes, found: Shapes, *, found_name: str = "file", wanted_name: str = "model") -> list[str]:
    """Human-readable problems (empty if ``found`` fits ``wanted`` exactly): keys ``wanted`` has
    and ``found`` lacks, keys only ``found`` has, and keys whose shapes differ (where both have one)."""
    missing = sorted(set(wanted) - set(found))
    unexpected = sorted(set(found) - set(wanted))
    mismatched = [
        f"{k}: {found_name} {tuple(found[k])} vs {wanted_name} {tuple(wanted[k])}"
        for k in wanted
        if found.get(k) is not None and wanted[k] is not None and tuple(found[k]) != tuple(wanted[k])
    ]
    problems = []
    if missing:
        problems.append(f"keys missing from the {found_name}: {listing(missing)}")
    if unexpected:
        problems.append(f"keys in the {found_name} but not in the {wanted_name}: {listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {listing(mismatched)}")
    return problems
