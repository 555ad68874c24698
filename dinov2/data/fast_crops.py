"""The ``fast`` crop pipeline: one ``CropParams`` applied with OpenCV and torch's uint8 kernels.

Same random decisions as the reference pipeline (``DataAugmentationDINO`` samples the
``CropParams`` the same way for both) and the same operations, computed on 8-bit arrays
without PIL / torchvision dispatch:

* crop + resize: torch's uint8 antialiased bicubic kernel on a channels-last view (the
  kernel written to match PIL's; differs from it by at most 1 level);
* rotation: ``cv2.warpAffine`` (bilinear, replicated edge) about the crop's centre, 0 where the
  source point is outside the crop: PIL's rule (differs by a few levels: cv2's fixed-point weights);
* brightness, contrast, solarize: 256-entry lookup tables with PIL's arithmetic
  (float32 ``blend`` then truncation), so these match the reference exactly;
* saturation: ``cv2.addWeighted`` against the luma image, truncated like PIL's blend;
* hue: the 8-bit HSV round trip PIL does, through ``cv2.cvtColor(..._HSV_FULL)``;
* grayscale: ``cv2.cvtColor`` with the ITU-R 601 luma PIL uses;
* blur: ``cv2.GaussianBlur`` with the reference's kernel (size ``blur_kernel``, the same
  sigma, reflect-101 borders = torch's "reflect").

Output: a (C, H, W) uint8 tensor, not normalised (``normalize_crops`` does that, batched).
Works for 8-bit images with 1 or 3 channels; the reference pipeline serves every other input.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as TF

_ARANGE = np.arange(256, dtype=np.float32)
_SOLARIZE_LUT = np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256)).astype(np.uint8)


def as_hwc_uint8(image) -> Optional[np.ndarray]:
    """(H, W, C) uint8 view of a PIL image or a (C, H, W) uint8 tensor; None when the fast
    pipeline does not apply (floating point or other input)."""
    if isinstance(image, torch.Tensor):
        return image.permute(1, 2, 0).numpy() if image.dtype == torch.uint8 else None
    array = np.array(image)  # a writable copy (torch warns about read-only arrays)
    if array.dtype != np.uint8:
        return None
    return array[:, :, None] if array.ndim == 2 else array


def _blend_lut(degenerate: float, factor: float) -> np.ndarray:
    """PIL ``Image.blend(degenerate, image, factor)`` for a constant degenerate image, as a table:
    ``trunc(clip(d + f * (x - d)))`` in float32."""
    d, f = np.float32(degenerate), np.float32(factor)
    return np.clip(d + f * (_ARANGE - d), 0, 255).astype(np.uint8)


def _luma(x: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) if x.ndim == 3 and x.shape[2] == 3 else x.reshape(x.shape[:2])


def _lut(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    out = cv2.LUT(x, table)
    return out.reshape(x.shape)  # cv2 drops a trailing channel axis of 1


def _contrast(x: np.ndarray, factor: float) -> np.ndarray:
    mean = int(cv2.mean(_luma(x))[0] + 0.5)  # ImageEnhance.Contrast: rounded mean of the L image
    return _lut(x, _blend_lut(mean, factor))


def _saturation(x: np.ndarray, factor: float) -> np.ndarray:
    gray = cv2.cvtColor(_luma(x), cv2.COLOR_GRAY2RGB)
    # gamma -0.499 turns cv2's round-to-nearest into the truncation of PIL's blend.
    return cv2.addWeighted(x, float(factor), gray, 1.0 - float(factor), -0.499)


def _hue(x: np.ndarray, factor: float) -> np.ndarray:
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)  # H in 1/256 turns
    hsv[..., 0] += np.uint8(np.int32(factor * 256) & 255)  # wraps around the circle, as the reference
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def _rotate(x: np.ndarray, angle: float) -> np.ndarray:
    """PIL's ``rotate(angle, BILINEAR, fillcolor=0)`` of a square image: bilinear with edge pixels
    repeated inside the source, 0 where the source point falls outside it (a constant border would
    instead fade the image's edge to black over a pixel)."""
    size = x.shape[0]
    centre = (size - 1) / 2.0  # the centre of the pixel grid, as PIL / torchvision rotate about
    matrix = cv2.getRotationMatrix2D((centre, centre), angle, 1.0)
    out = cv2.warpAffine(x, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    grid = np.arange(size, dtype=np.float64)
    inverse = cv2.invertAffineTransform(matrix)  # output pixel -> source point
    src_x = inverse[0, 0] * grid[None, :] + inverse[0, 1] * grid[:, None] + inverse[0, 2]
    src_y = inverse[1, 0] * grid[None, :] + inverse[1, 1] * grid[:, None] + inverse[1, 2]
    outside = (src_x < -0.5) | (src_x >= size - 0.5) | (src_y < -0.5) | (src_y >= size - 0.5)
    out[outside] = 0
    return out


def apply_crop_fast(image: np.ndarray, params, size: int, blur_kernel: int) -> torch.Tensor:
    """``params`` (a ``CropParams``) applied to an (H, W, C) uint8 array -> (C, size, size) uint8 tensor."""
    channels = image.shape[2]
    top, left, h, w = params.box
    # A channels-last contiguous region takes torch's vectorised uint8 kernel (a strided view does not), and
    # its output is channels-last too: an (H, W, C) array without a copy.
    region = torch.from_numpy(image[top : top + h, left : left + w]).permute(2, 0, 1).unsqueeze(0)
    region = region.contiguous(memory_format=torch.channels_last)
    out = TF.interpolate(region, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())
    if channels == 1:
        x = x[:, :, 0]
    if params.angle:
        x = _rotate(x, params.angle)
    if params.flip:
        x = cv2.flip(x, 1)
    if params.jitter is not None:
        brightness, contrast, saturation, hue = params.jitter.factors
        for op in params.jitter.order:
            if op == 0:
                x = _lut(x, _blend_lut(0.0, brightness))
            elif op == 1:
                x = _contrast(x, contrast)
            elif channels == 3:  # saturation / hue are identities on one channel
                x = _saturation(x, saturation) if op == 2 else _hue(x, hue)
    if params.grayscale and channels == 3:
        x = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    if params.blur_sigma is not None:
        x = cv2.GaussianBlur(x, (blur_kernel, blur_kernel), sigmaX=params.blur_sigma, sigmaY=params.blur_sigma,
                             borderType=cv2.BORDER_REFLECT_101)
    if params.solarize:
        x = _lut(x, _SOLARIZE_LUT)
    # (C, H, W) view of the (H, W, C) result: the collate's stack writes it out channel-first.
    return torch.from_numpy(x.reshape(size, size, channels)).permute(2, 0, 1)
