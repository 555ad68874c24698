"""`dinov2-curate filter`: drop rows whose classifier score over their embedding exceeds a
threshold (the way NSFW filters over image embeddings work); see classifier.py for the head.

Outputs in ``output_dir``: ``scores.npy`` (every row), ``keep.npy`` (rows with score <=
threshold), ``report.csv`` (every row, highest score first), ``contact_sheet.png`` (the
highest-scoring removed images, when ``paths.txt`` lies beside the embeddings) and
``errors.txt`` (rows whose path is listed but whose image the contact sheet could not read;
the stage itself reads embeddings only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from . import report
from .arrays import CurationInputError, load_array, read_lines, save_npy_atomic, validate_embeddings, write_lines_atomic
from .classifier import load_classifier
from .images import read_thumbnail
from .stage_state import StageResult, StageState, map_parts

STAGE = "filter"
OUTPUTS = ["scores.npy", "keep.npy", "report.csv", "errors.txt"]


def filter_stage(
    embeddings_path,
    classifier_path,
    output_dir,
    *,
    threshold: float,
    positive: Sequence[int] | None = None,
    chunk_rows: int = 65536,
    contact_rows: int = 32,
    progress: bool = True,
) -> StageResult:
    pool = load_array(embeddings_path, "embeddings")
    validate_embeddings(pool, f"embeddings ({embeddings_path})", chunk_rows)
    head = load_classifier(classifier_path)
    head.check_input(pool.shape[1], f"the embeddings ({embeddings_path})")
    classes = head.positive_classes(list(positive) if positive else None)
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise CurationInputError(f"filter threshold is a probability in [0, 1], got {threshold}")
    paths_file = Path(embeddings_path).parent / "paths.txt"
    paths = read_lines(paths_file) if paths_file.is_file() else None
    if paths is not None and len(paths) != pool.shape[0]:
        raise CurationInputError(f"{paths_file} lists {len(paths)} paths but {embeddings_path} has {pool.shape[0]} rows")
    params = dict(threshold=threshold, positive=classes, chunk_rows=chunk_rows)
    inputs = [embeddings_path, classifier_path] + ([paths_file] if paths is not None else [])
    state = StageState(output_dir, STAGE, params, inputs, OUTPUTS)
    if state.is_complete():
        return state.skipped_result()
    work = state.begin()
    starts = list(range(0, pool.shape[0], chunk_rows))
    parts = map_parts(starts, 1, work / "scores",
                      lambda s: {"scores": head.scores(np.asarray(pool[s[0] : s[0] + chunk_rows]), classes)},
                      progress=progress, desc="classifier")
    scores = np.concatenate([part["scores"] for part in parts])
    keep = np.flatnonzero(scores <= threshold).astype(np.int64)
    out = Path(output_dir)
    save_npy_atomic(out / "scores.npy", scores)
    save_npy_atomic(out / "keep.npy", keep)
    names = paths if paths is not None else [f"row {r}" for r in range(pool.shape[0])]
    order = np.argsort(-scores, kind="stable")
    rows = [{
        "stage": STAGE, "row": int(r), "path": names[r], "decision": report.REMOVED if scores[r] > threshold else report.KEPT,
        "link_kind": "score", "link": float(scores[r]),
        "reason": f"score {scores[r]:.3f} > threshold {threshold}" if scores[r] > threshold else f"score <= threshold {threshold}",
    } for r in order]
    report.write_report(out / "report.csv", rows)
    removed = order[scores[order] > threshold][:contact_rows]
    errors, sheet = [], None
    if paths is not None and removed.size:
        errors = [f"{paths[r]}\t{error}" for r in removed for error in [read_thumbnail(paths[r], 8)[2]] if error]
        tiles = [(paths[r], f"score {scores[r]:.3f}", False) for r in removed]
        sheet = report.contact_sheet(out / "contact_sheet.png", [tiles[i : i + 8] for i in range(0, len(tiles), 8)],
                                     title=f"{STAGE}: highest scores above {threshold} (removed)")
    write_lines_atomic(out / "errors.txt", errors)
    summary = report.summary(pool.shape[0], {"classifier": pool.shape[0] - keep.size}, keep.size)
    summary["max_score"] = round(float(scores.max()), 4)
    summary["contact_sheet"] = str(sheet) if sheet else "none"
    return state.complete(summary)
