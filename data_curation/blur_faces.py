"""`dinov2-curate blur-faces`: blurred copies of the images that show faces, never in place.

For every image (folder, list file or manifest): detect faces (faces.py), and when there are
any write a copy with the faces blurred under ``output_dir/blurred/`` (same path relative to
the images' common folder; PNG stays PNG, a JPEG is re-encoded with its own quantisation
tables). Outputs: ``manifest.txt`` (one line per decodable image: its blurred copy when it had
faces, else the original), ``faces.csv`` (path, box number, x, y, width, height, blurred copy),
``errors.txt`` (undecodable images: skipped and left out of the manifest), ``contact_sheet.png``
(blurred copies of the images with the most faces). Resumable part by part, idempotent.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from . import faces, report
from .arrays import CurationInputError, write_lines_atomic, write_text_atomic
from .images import error_text, read_rgb
from .stage_state import StageResult, StageState, map_parts

STAGE = "blur-faces"
OUTPUTS = ["manifest.txt", "faces.csv", "errors.txt"]


def blurred_path(path: str, root: str, blurred_dir: Path) -> Path:
    return blurred_dir / os.path.relpath(path, root)


def save_like(rgb: np.ndarray, source: str, target: Path) -> None:
    """Write ``rgb`` to ``target`` in the source's format (JPEG with the source's quantisation
    tables, so that only the blurred boxes differ beyond re-encoding noise), atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(rgb)
    tmp = target.with_name(f".{target.name}.tmp")
    with Image.open(source) as original:
        fmt = original.format or "PNG"
        options = {}
        if fmt == "JPEG":
            options = {"qtables": original.quantization, "subsampling": _jpeg_subsampling(original)}
        if fmt not in ("JPEG", "PNG", "TIFF", "BMP", "WEBP"):
            fmt = "PNG"
    image.save(tmp, format=fmt, **options)
    tmp.replace(target)


def _jpeg_subsampling(image) -> int:
    from PIL import JpegImagePlugin

    value = JpegImagePlugin.get_sampling(image)
    return value if value in (0, 1, 2) else 0


def _blur_part(paths: list[str], root: str, blurred_dir: Path, detector_args: dict, blur_args: dict) -> dict:
    detector = faces.load_detector(detector_args["cascade"])
    records, errors, manifest = [], [], []
    for path in paths:
        rgb, _, error = read_rgb(path)
        if error:
            errors.append(f"{path}\t{error}")
            continue
        try:
            boxes = faces.detect_faces(rgb, detector, scale_factor=detector_args["scale_factor"],
                                       min_neighbors=detector_args["min_neighbors"], min_size=detector_args["min_size"])
            target = path
            if len(boxes):
                target = str(blurred_path(path, root, blurred_dir))
                save_like(faces.blur_boxes(rgb, boxes, **blur_args), path, Path(target))
        except Exception as exc:  # e.g. a source format PIL reads but cannot write back
            errors.append(f"{path}\t{error_text(exc)}")
            continue
        manifest.append(target)
        records.extend((path, n, *map(int, box), target) for n, box in enumerate(boxes))
    return {
        "manifest": np.array(manifest, dtype=str), "errors": np.array(errors, dtype=str),
        "face_paths": np.array([r[0] for r in records], dtype=str),
        "face_boxes": np.array([r[1:6] for r in records], dtype=np.int64).reshape(-1, 5),
        "face_targets": np.array([r[6] for r in records], dtype=str),
    }


def blur_faces_stage(
    images,
    output_dir,
    *,
    cascade: str = faces.DEFAULT_CASCADE,
    scale_factor: float = 1.1,
    min_neighbors: int = 5,
    min_size: int = 24,
    margin: float = 0.1,
    strength: float = 0.25,
    part_size: int = 256,
    contact_images: int = 16,
    progress: bool = True,
) -> StageResult:
    from .embed import list_images

    paths = list_images(images)
    faces.load_detector(cascade)  # a missing cascade fails before any work
    if scale_factor <= 1.0 or min_neighbors < 0 or min_size < 1 or margin < 0 or strength <= 0 or part_size < 1:
        raise CurationInputError(
            "need scale_factor > 1, min_neighbors >= 0, min_size >= 1, margin >= 0, strength > 0, part_size >= 1; got "
            f"{scale_factor}, {min_neighbors}, {min_size}, {margin}, {strength}, {part_size}"
        )
    out = Path(output_dir).resolve()
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    source = Path(images).resolve()
    if source.is_dir() and (out == source or source in out.parents):
        raise CurationInputError(f"--output-dir {out} lies inside the image folder {source}: the blurred copies would "
                                 "join the pool on the next run; choose a folder outside it")
    detector_args = dict(cascade=cascade, scale_factor=scale_factor, min_neighbors=min_neighbors, min_size=min_size)
    blur_args = dict(margin=margin, strength=strength)
    params = dict(**detector_args, **blur_args, part_size=part_size,
                  paths_sha256=hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest())
    state = StageState(out, STAGE, params, [], OUTPUTS)
    if state.is_complete():
        return state.skipped_result()
    work = state.begin()
    blurred_dir = out / "blurred"
    parts = map_parts(paths, part_size, work / "parts",
                      lambda part: _blur_part(part, root, blurred_dir, detector_args, blur_args),
                      progress=progress, desc="blur-faces")
    manifest = [str(p) for part in parts for p in part["manifest"]]
    errors = [str(e) for part in parts for e in part["errors"]]
    face_paths = [str(p) for part in parts for p in part["face_paths"]]
    face_boxes = np.concatenate([part["face_boxes"] for part in parts])
    face_targets = [str(p) for part in parts for p in part["face_targets"]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "face", "x", "y", "width", "height", "blurred_path"])
    writer.writerows([p, *map(int, box), t] for p, box, t in zip(face_paths, face_boxes, face_targets))
    write_text_atomic(out / "faces.csv", buffer.getvalue())
    write_lines_atomic(out / "errors.txt", errors)
    write_lines_atomic(out / "manifest.txt", manifest)
    counts = {}
    for path, target in zip(face_paths, face_targets):
        counts[target] = counts.get(target, 0) + 1
    most = sorted(counts, key=lambda t: (-counts[t], t))[:contact_images]
    tiles = [(t, f"{counts[t]} face(s)", True) for t in most]
    sheet = report.contact_sheet(out / "contact_sheet.png", [tiles[i : i + 8] for i in range(0, len(tiles), 8)],
                                 title=f"{STAGE}: blurred copies") if tiles else None
    summary = report.summary(len(paths), {"undecodable": len(errors)}, len(manifest))
    summary.update(images_with_faces=len(counts), faces=len(face_paths),
                   contact_sheet=str(sheet) if sheet else "none (no faces found)")
    return state.complete(summary)
