"""Face detection and blurring (DINOv2 paper, data pipeline: "blurring identifiable faces").

The detector is one of OpenCV's Haar cascades, which ship inside the ``opencv-python-headless``
wheel (``cv2.data.haarcascades``; OpenCV 4.x; the 5.x wheels no longer contain them). Nothing
is downloaded. Each detected box, enlarged by ``margin`` on every side, is replaced by a strong
Gaussian blur of itself; every pixel outside the boxes is left exactly as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .arrays import CurationInputError

DEFAULT_CASCADE = "haarcascade_frontalface_default.xml"


def cascade_folder() -> Path:
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - opencv-python-headless is a dependency
        raise CurationInputError("blur-faces needs OpenCV: pip install 'opencv-python-headless<5'") from exc
    return Path(cv2.data.haarcascades)


def available_cascades() -> list[str]:
    return sorted(name for name in os.listdir(cascade_folder()) if name.endswith(".xml"))


def load_detector(cascade: str = DEFAULT_CASCADE):
    """A cv2.CascadeClassifier from a shipped cascade name or a path to a cascade XML file."""
    import cv2

    path = Path(cascade) if Path(cascade).is_file() else cascade_folder() / cascade
    if not path.is_file():
        raise CurationInputError(
            f"face cascade {cascade!r} not found; shipped with OpenCV: {', '.join(available_cascades()) or 'none'}"
        )
    detector = cv2.CascadeClassifier(str(path))
    if detector.empty():
        raise CurationInputError(f"{path} is not a readable OpenCV cascade file")
    return detector


def detect_faces(rgb: np.ndarray, detector, *, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_size: int = 24) -> np.ndarray:
    """Boxes [n, 4] int64 as (x, y, width, height), in reading order."""
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    boxes = detector.detectMultiScale(gray, scaleFactor=scale_factor, minNeighbors=min_neighbors,
                                      minSize=(min_size, min_size))
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    return boxes[np.lexsort((boxes[:, 0], boxes[:, 1]))] if boxes.size else boxes


def expanded(box: np.ndarray, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of ``box`` grown by ``margin`` x its size on each side, clipped."""
    x, y, w, h = (int(v) for v in box)
    dx, dy = int(round(margin * w)), int(round(margin * h))
    return max(0, x - dx), max(0, y - dy), min(width, x + w + dx), min(height, y + h + dy)


def blur_boxes(rgb: np.ndarray, boxes: np.ndarray, *, margin: float = 0.1, strength: float = 0.25) -> np.ndarray:
    """Copy of ``rgb`` with each (expanded) box Gaussian-blurred with sigma = ``strength`` x the
    box's larger side, computed from the box alone, so nothing outside the boxes changes."""
    import cv2

    out = np.array(rgb, copy=True)
    height, width = out.shape[:2]
    for box in boxes:
        left, top, right, bottom = expanded(box, margin, width, height)
        if right <= left or bottom <= top:
            continue
        sigma = max(1.0, strength * max(right - left, bottom - top))
        region = np.ascontiguousarray(out[top:bottom, left:right])
        out[top:bottom, left:right] = cv2.GaussianBlur(region, (0, 0), sigmaX=sigma, sigmaY=sigma,
                                                       borderType=cv2.BORDER_REFLECT)
    return out
