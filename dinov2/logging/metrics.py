"""Training metrics to a jsonl file (one object per logged step) and to TensorBoard.

Crash safety: each line is appended in one write; a process killed mid-write leaves at most a torn
last line, which readers drop with a warning. On resume, lines beyond the checkpoint's step are
removed by writing a new file and renaming it over the old one (a kill at that moment leaves the
old file or the new one, never an empty one), and TensorBoard purges its events beyond that step.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator, Mapping

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


class MetricsWriter:
    def __init__(self, output_dir: str | Path, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int = 0) -> None:
        """``resume_step``: the step the run continues from; later lines and events are removed."""
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at steps >= it (written after the checkpoint) are hidden on reload.
            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step > 0 else None)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)

    def _truncate_after(self, step: int) -> None:
        """Keep the lines up to ``step`` (a resumed run rewrites the later ones), atomically."""
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        kept = [line for line, record in _records(self.path) if record["step"] <= step]
        text = "".join(line + "\n" for line in kept)
        if len(text.encode()) == size:
            return  # nothing beyond the step and no torn line: leave the file alone
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with temporary.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    """Every logged record of a run (a torn last line is dropped with a warning)."""
    return [record for _, record in _records(Path(output_dir) / METRICS_FILE)]
