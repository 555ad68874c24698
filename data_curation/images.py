"""Reading images for the raw-pool stages (hash-dedup, blur-faces, contact sheets).

Decoding follows the project's one rule (``dinov2.data.images.decode_image``: fully decoded,
high bit depths scaled to 8 bits); thumbnails decode large JPEGs at a reduced scale first.
One image that cannot be decoded never stops a stage: the readers here return the error text
instead of raising, and the stages list such files in ``errors.txt`` (path, tab, reason).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dinov2.data.images import decode_image

LOSSLESS_FORMATS = ("PNG", "TIFF", "BMP", "PPM", "GIF", "WEBP_LOSSLESS")

# libjpeg's luminance quantisation table at quality 50 (ITU T.81, annex K), in zig-zag-free order;
# only its mean is used, so the order does not matter.
_JPEG_STD_LUMINANCE_MEAN = float(np.mean([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]))


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str  # PIL format name, e.g. JPEG, PNG
    file_size: int  # bytes
    jpeg_quality: int  # estimated from the quantisation tables; 100 for lossless formats

    @property
    def pixels(self) -> int:
        return self.width * self.height


def estimate_jpeg_quality(image: Image.Image) -> int:
    """libjpeg quality factor (1-100) whose scaling of the standard luminance table matches the
    mean of the image's first quantisation table; 100 for images without such tables."""
    tables = getattr(image, "quantization", None)
    if not tables:
        return 100
    table = tables.get(0, next(iter(tables.values())))
    scale = 100.0 * float(np.mean(table)) / _JPEG_STD_LUMINANCE_MEAN
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return int(np.clip(round(quality), 1, 100))


def image_info(image: Image.Image, path: str) -> ImageInfo:
    fmt = image.format or os.path.splitext(path)[1].lstrip(".").upper()
    quality = estimate_jpeg_quality(image) if fmt in ("JPEG", "MPO") else 100
    return ImageInfo(image.size[0], image.size[1], fmt, os.path.getsize(path), quality)


def read_thumbnail(path: str, size: int) -> tuple[np.ndarray | None, ImageInfo | None, str]:
    """(grayscale ``size`` x ``size`` uint8 thumbnail, info, "") or (None, None, error text).

    Large JPEGs are decoded at a reduced scale (PIL ``draft``), which is several times faster and
    gives the same thumbnail up to rounding."""
    try:
        with Image.open(path) as image:
            info = image_info(image, path)
            image.draft("L", (4 * size, 4 * size))
            gray = decode_image(image, "L").resize((size, size), Image.Resampling.BOX)
            return np.asarray(gray, dtype=np.uint8), info, ""
    except Exception as exc:  # any decoding failure is data, not a crash
        return None, None, error_text(exc)


def read_rgb(path: str) -> tuple[np.ndarray | None, ImageInfo | None, str]:
    """(H x W x 3 uint8, info, "") or (None, None, error text)."""
    try:
        with Image.open(path) as image:
            info = image_info(image, path)
            return np.asarray(decode_image(image, "RGB")), info, ""
    except Exception as exc:
        return None, None, error_text(exc)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\t", " ")
