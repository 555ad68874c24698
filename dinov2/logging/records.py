"""Reading ``metrics.jsonl``: one JSON object per logged step, appended in one write each, so a kill
leaves at most a torn last line, which is dropped with a warning (any other damaged line is an error)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsFileError(ValueError):
    """A metrics file that cannot be read (a damaged line that is not the last one)."""


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """(line, parsed) for every complete line; a torn last line is dropped with a warning."""
    with path.open("rb") as f:
        lines = f.read().split(b"\n")
    last = len(lines) - 1
    while last >= 0 and not lines[last].strip():
        last -= 1
    for number, raw in enumerate(lines[: last + 1], start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a metrics record")
        except ValueError as error:
            if number == last + 1:
                logger.warning("%s: dropping a torn last line (%d bytes; the run was killed while writing it)",
                               path, len(raw))
                return
            raise MetricsFileError(f"{path} line {number} is damaged ({error}): {raw[:80]!r}") from None
        yield raw.decode(), record


def read_metrics(output_dir: str | Path) -> list[dict]:
    """Every logged record of a run (a torn last line is dropped with a warning)."""
    return [record for _, record in _records(Path(output_dir) / METRICS_FILE)]
