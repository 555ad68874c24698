"""Decisions a person can check: ``report.csv``, a contact-sheet PNG and a one-line summary.

Every removal stage writes one ``report.csv`` with the same columns (``REPORT_COLUMNS``): the
stage, the row and path, its group, whether it was kept or removed, the kept representative
that replaces it, the value that linked them (``link_kind``: hamming distance, cosine
similarity, classifier score) and the reason in words. Dedup stages list every row of every
group with more than one member (kept rows first); the filter lists every row by score.
The contact sheet shows the largest groups, one group per line, the kept image first with a
green frame and the removed ones with a red frame, each labelled with its file name and link.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .arrays import write_text_atomic
from .groups import Groups

REPORT_COLUMNS = ("stage", "row", "path", "group", "decision", "representative_row", "representative_path",
                  "link_kind", "link", "reason")
KEPT, REMOVED = "kept", "removed"


def write_report(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """CSV with ``REPORT_COLUMNS`` (missing values empty), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REPORT_COLUMNS, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in REPORT_COLUMNS})
    return write_text_atomic(path, buffer.getvalue())


def read_report(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{float(value):.6g}"
    return str(value)


def group_report_rows(stage: str, paths: Sequence[str], groups: Groups, link_kind: str, reason: str) -> list[dict]:
    """One row per member of every group with more than one member, by group, kept row first."""
    sizes = np.bincount(groups.group)
    members = np.flatnonzero(sizes[groups.group] > 1)
    kept_last = (groups.representative[members] != members).astype(np.int64)
    order = members[np.lexsort((members, kept_last, groups.group[members]))]
    rows = []
    for row in order:
        representative = int(groups.representative[row])
        kept = representative == row
        rows.append({
            "stage": stage, "row": int(row), "path": paths[row], "group": int(groups.group[row]),
            "decision": KEPT if kept else REMOVED, "representative_row": representative,
            "representative_path": paths[representative], "link_kind": link_kind,
            "link": None if kept else groups.link[row],
            "reason": "best of its group" if kept else reason,
        })
    return rows


def error_report_rows(stage: str, errors: Sequence[str]) -> list[dict]:
    """Rows for the ``path<TAB>reason`` lines of errors.txt (removed: undecodable)."""
    rows = []
    for line in errors:
        path, _, message = line.partition("\t")
        rows.append({"stage": stage, "row": -1, "path": path, "decision": REMOVED, "reason": f"undecodable: {message}"})
    return rows


def largest_groups(groups: Groups, count: int) -> list[np.ndarray]:
    """Members of the ``count`` largest groups with more than one member (representative first)."""
    sizes = np.bincount(groups.group)
    candidates = np.flatnonzero(sizes > 1)
    candidates = candidates[np.argsort(-sizes[candidates], kind="stable")][:count]
    result = []
    for group in candidates:
        members = np.flatnonzero(groups.group == group)
        representative = groups.representative[members[0]]
        result.append(np.concatenate([[representative], members[members != representative]]))
    return result


def contact_sheet(
    path: str | os.PathLike,
    lines: Sequence[Sequence[tuple[str, str, bool]]],
    *,
    title: str = "",
    thumb: int = 128,
    max_per_line: int = 8,
) -> Path | None:
    """PNG of ``lines`` of (image path, label, kept) tiles; unreadable images show as grey tiles.
    Returns None (and writes nothing) when there is nothing to show."""
    lines = [list(line)[:max_per_line] for line in lines if line]
    if not lines:
        return None
    font = ImageFont.load_default()
    label_h, pad, title_h = 26, 6, 22 if title else 0
    width = pad + max(len(line) for line in lines) * (thumb + pad)
    height = title_h + pad + len(lines) * (thumb + label_h + pad)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 4), title, fill="black", font=font)
    for line_number, line in enumerate(lines):
        top = title_h + pad + line_number * (thumb + label_h + pad)
        for column, (image_path, label, kept) in enumerate(line):
            left = pad + column * (thumb + pad)
            tile = _thumbnail(image_path, thumb - 6)
            sheet.paste(tile, (left + 3 + (thumb - 6 - tile.width) // 2, top + 3 + (thumb - 6 - tile.height) // 2))
            draw.rectangle((left, top, left + thumb - 1, top + thumb - 1), outline="green" if kept else "red", width=3)
            name = Path(image_path).name
            draw.text((left, top + thumb + 1), _shorten(name, thumb), fill="black", font=font)
            draw.text((left, top + thumb + 13), _shorten(label, thumb), fill="green" if kept else "red", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
    return path


def _thumbnail(image_path: str, size: int) -> Image.Image:
    try:
        with Image.open(image_path) as image:
            image.draft("RGB", (size, size))
            tile = image.convert("RGB")
            tile.thumbnail((size, size))
            return tile
    except Exception:
        return Image.new("RGB", (size, size), (200, 200, 200))


def _shorten(text: str, pixels: int) -> str:
    limit = max(4, pixels // 6)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary(rows_in: int, removed: dict[str, int], rows_out: int) -> dict:
    """The summary every removal stage prints: rows in, rows removed per reason, rows out."""
    result = {"rows_in": int(rows_in)}
    result.update({f"removed_{reason}": int(count) for reason, count in removed.items()})
    result["rows_out"] = int(rows_out)
    return result


def publish_group_decisions(out: Path, stage: str, paths: Sequence[str] | None, groups: Groups, link_kind: str,
                            reason: str, *, extra_rows: Sequence[dict] = (), contact_groups: int = 12,
                            link_format: str = "{:.3f}") -> Path | None:
    """report.csv (+ ``extra_rows``) and, when the rows have image paths, the contact sheet of
    the largest groups; returns the sheet's path (None when no group has copies)."""
    names = list(paths) if paths is not None else [f"row {r}" for r in range(groups.group.size)]
    write_report(Path(out) / "report.csv", group_report_rows(stage, names, groups, link_kind, reason) + list(extra_rows))
    if paths is None:
        return None
    lines = [[(names[r], "kept" if i == 0 else f"{link_kind} " + link_format.format(groups.link[r]), i == 0)
              for i, r in enumerate(members)] for members in largest_groups(groups, contact_groups)]
    return contact_sheet(Path(out) / "contact_sheet.png", lines, title=f"{stage}: largest groups (green kept, red removed)")
