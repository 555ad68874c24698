"""Idempotent, resumable stages.

A stage is identified by a fingerprint of its name, its parameters and the identity of its
input files (absolute path, size, modification time). When it finishes it writes a small
marker ``.<stage>.done.json`` beside its outputs, last, after every output is in place.

- Idempotent: a rerun whose fingerprint matches the marker, with all outputs present,
  does nothing and says so.
- Resumable: while running, a stage keeps partial results (finished chunks, trained
  indexes, finished k-means levels) in ``.work/<stage>-<fingerprint>/``; a rerun after a
  kill reuses them. Changing an input or a parameter changes the fingerprint, so stale
  partial results are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .arrays import write_text_atomic


def file_identity(path: str | os.PathLike) -> list:
    path = Path(path).resolve()
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def fingerprint(stage: str, params: dict, inputs: Iterable[str | os.PathLike]) -> str:
    payload = {
        "stage": stage,
        "params": params,
        "inputs": [file_identity(p) for p in inputs],
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class StageResult:
    stage: str
    output_dir: Path
    skipped: bool
    summary: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.skipped:
            return f"{self.stage}: up to date, nothing to do (outputs in {self.output_dir})"
        details = ", ".join(f"{k}={v}" for k, v in self.summary.items() if not isinstance(v, (dict, list)))
        message = f"{self.stage}: done ({details}) -> {self.output_dir}"
        if "rows_in" in self.summary and "rows_out" in self.summary:
            removed = ", ".join(f"{k[len('removed_'):]} {v}" for k, v in self.summary.items() if k.startswith("removed_"))
            message += f"\n{self.stage}: rows in {self.summary['rows_in']}; removed: {removed or 'none'}; rows out {self.summary['rows_out']}"
        return message


class StageState:
    """Marker and work folder of one stage run in ``output_dir``."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        stage: str,
        params: dict,
        inputs: Iterable[str | os.PathLike],
        outputs: Iterable[str],
    ):
        self.output_dir = Path(output_dir)
        self.stage = stage
        self.outputs = list(outputs)
        self.fingerprint = fingerprint(stage, params, inputs)
        self.params = params
        self.marker = self.output_dir / f".{stage}.done.json"
        self.work_dir = self.output_dir / ".work" / f"{stage}-{self.fingerprint[:16]}"

    def is_complete(self) -> bool:
        if not self.marker.is_file():
            return False
        try:
            recorded = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if recorded.get("fingerprint") != self.fingerprint:
            return False
        return all((self.output_dir / name).exists() for name in self.outputs)

    def skipped_result(self) -> StageResult:
        recorded = json.loads(self.marker.read_text(encoding="utf-8"))
        return StageResult(self.stage, self.output_dir, skipped=True, summary=recorded.get("summary", {}))

    def begin(self) -> Path:
        """Start (or resume) a run: drop a marker from other inputs, create the work dir."""
        if self.marker.is_file() and not self.is_complete():
            self.marker.unlink()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self.work_dir

    def complete(self, summary: dict) -> StageResult:
        record = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "params": self.params,
            "outputs": self.outputs,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "summary": summary,
        }
        write_text_atomic(self.marker, json.dumps(record, indent=2, default=str) + "\n")
        shutil.rmtree(self.work_dir, ignore_errors=True)
        work_root = self.work_dir.parent
        if work_root.is_dir() and not any(work_root.iterdir()):
            work_root.rmdir()
        return StageResult(self.stage, self.output_dir, skipped=False, summary=summary)


def map_parts(items: list, part_size: int, work_dir: Path, fn, *, progress: bool = True, desc: str = "parts") -> list[dict]:
    """Apply ``fn(items[part]) -> dict of arrays`` part by part, saving each finished part in
    ``work_dir`` (``part_NNNNNN.npz``), so that a killed run redoes at most one part. Returns the
    parts' dicts in order (finished parts are read back, not recomputed)."""
    import numpy as np
    from tqdm.auto import tqdm

    results = []
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(items), part_size))
    for number, start in enumerate(tqdm(starts, desc=desc, unit="part", disable=not progress)):
        done = Path(work_dir) / f"part_{number:06d}.npz"
        if not done.is_file():
            arrays = fn(items[start : start + part_size])
            tmp = done.with_name(f".{done.name}.tmp.npz")
            np.savez(tmp, **arrays)
            tmp.replace(done)
        with np.load(done, allow_pickle=False) as saved:
            results.append({key: saved[key] for key in saved.files})
    return results
