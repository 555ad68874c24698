"""DINOv2 multi-crop augmentation (2 global + N local crops).

Recipe of the official dinov2 ``DataAugmentationDINO``: RandomResizedCrop (bicubic),
an optional small random rotation (``rotation_degrees``, off in the official recipe; for
centred objects such as digits), horizontal flip, colour jitter (p 0.8) and random
grayscale (p 0.2), Gaussian blur (kernel 9, sigma 0.1-2.0) and solarize on the second
global crop, then ToTensor and Normalize. With ``normalize=False`` (the training loader's
setting) the crops stay as the image gave them, uint8 for 8-bit images, and
``normalize_crops`` does the ToTensor + Normalize arithmetic later, batched on the device.
The image operations are torchvision's (``transforms.v2.functional``); the random
*parameters* are drawn here from an explicit ``torch.Generator``, which is
what lets the SSL dataset make every crop a pure function of (seed, sample position)
without touching or forking the global torch RNG.

Blur probabilities: ``blur_p`` is the probability that blur IS applied, for
(global crop 1, global crop 2, local crops), default (1.0, 0.1, 0.5) as in the paper
and BYOL. The official dinov2 code passes ``1 - p`` to ``RandomApply``, so the
released checkpoints were in fact trained with (0.0, 0.9, 0.5); pass that value to
reproduce them exactly (see facebookresearch/dinov3#286).

Channels (``num_channels``):
* 3 (RGB): the full recipe.
* 1 (grayscale): brightness and contrast jitter apply; saturation, hue and random
  grayscale are identities on one channel and are skipped.
* any other C (multi-band arrays): colour jitter and random grayscale have no
  meaning, so a non-zero ``color_jitter_p`` or ``grayscale_p`` is rejected at
  construction with a ValueError (we do not silently drop them). Crops, flips, blur,
  solarize (for data in [0, 1]) and per-channel normalisation work for any C.

Pipelines (``pipeline``): ``"reference"`` applies each crop's parameters with torchvision /
PIL, the operations of the official pipeline; ``"fast"`` applies the SAME parameters with
OpenCV and torch's uint8 kernels (``fast_crops.py``), several times faster per core and equal
to the reference up to rounding (a level or two of 255), for 8-bit inputs with 1 or 3
channels (other inputs take the reference path).

Inputs: a PIL image (converted to "RGB" or "L" to match ``num_channels``), or a
tensor (C, H, W) / (H, W) of dtype uint8 (scaled by 1/255 like ToTensor) or float
(used as is; solarize then assumes values in [0, 1], threshold 0.5).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dinov2.normalization import IMAGENET_MEAN, IMAGENET_STD

from .fast_crops import apply_crop_fast, as_hwc_uint8

logger = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD = IMAGENET_MEAN, IMAGENET_STD  # timm's names

_RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect range
_RRC_ATTEMPTS = 10

ImageLike = Union[Image.Image, torch.Tensor]
PIPELINES = ("reference", "fast")


@dataclass(frozen=True)
class ColorJitterParams:
    order: Tuple[int, ...]  # permutation of (brightness, contrast, saturation, hue)
    factors: Tuple[float, float, float, float]


@dataclass(frozen=True)
class CropParams:
    """Every random decision for one crop; applying it is deterministic."""

    box: Tuple[int, int, int, int]  # top, left, height, width in the source image
    flip: bool
    jitter: Optional[ColorJitterParams]
    grayscale: bool
    blur_sigma: Optional[float]
    solarize: bool
    angle: float = 0.0  # degrees counter-clockwise about the crop's centre, corners filled with 0


def normalize_crops(crops: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel (dim -3), ``x = crops / 255`` for uint8 crops, as a new float32 tensor.

    The arithmetic of ToTensor + Normalize (divide by 255, not multiply by 1/255; subtract then
    divide), so it matches them bitwise. Works on one crop or a batch, on any device; mean and
    std are Python numbers, so no host tensor is copied to the device.
    """
    if crops.ndim < 3 or crops.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"crops of shape {tuple(crops.shape)} need one mean and std per channel (dim -3), "
                         f"got {len(mean)} means and {len(std)} stds")
    if crops.dtype == torch.uint8:
        out = crops.to(torch.float32).div(255)
    elif crops.is_floating_point():
        out = crops.to(torch.float32, copy=True)
    else:
        raise TypeError(f"crops must be uint8 or floating point, got {crops.dtype}")
    for c, (m, s) in enumerate(zip(mean, std)):
        out[..., c, :, :].sub_(float(m)).div_(float(s))
    return out


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=g).item())


def _coin(g: torch.Generator, p: float) -> bool:
    # RandomApply's rule: p = 0 never fires, p = 1 always does.
    return bool(torch.rand(1, generator=g).item() < p)


def sample_resized_crop_box(
    g: torch.Generator, height: int, width: int, scale: Tuple[float, float], ratio=_RRC_RATIO
) -> Tuple[int, int, int, int]:
    """RandomResizedCrop.get_params with an explicit generator (same algorithm)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_RRC_ATTEMPTS):
        target_area = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return top, left, h, w
    # Fallback: largest centred crop with an aspect ratio inside the range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class DataAugmentationDINO:
    """Multi-crop augmentation; ``__call__(image, generator=None)`` -> crops dict."""

    def __init__(
        self,
        global_crops_scale: Tuple[float, float] = (0.32, 1.0),
        local_crops_scale: Tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 98,
        *,
        flip_p: float = 0.5,
        color_jitter: Optional[Tuple[float, float, float, float]] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: Tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_kernel: int = 9,
        blur_sigma: Tuple[float, float] = (0.1, 2.0),
        solarize_p: float = 0.2,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        num_channels: int = 3,
        normalize: bool = True,
        pipeline: str = "reference",
        rotation_degrees: float = 0.0,
    ):
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(
                f"mean and std need one value per channel: num_channels={num_channels}, "
                f"got {len(mean)} means and {len(std)} stds"
            )
        if len(blur_p) != 3:
            raise ValueError(f"blur_p is (global1, global2, local), got {blur_p}")
        if color_jitter is None:
            color_jitter, color_jitter_p = (0.0, 0.0, 0.0, 0.0), 0.0
        if num_channels not in (1, 3) and (color_jitter_p > 0 or grayscale_p > 0):
            raise ValueError(
                f"colour jitter and random grayscale need RGB (or 1-channel) input; with "
                f"num_channels={num_channels} set color_jitter_p=0 and grayscale_p=0 "
                f"(got color_jitter_p={color_jitter_p}, grayscale_p={grayscale_p})"
            )
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
        if not 0.0 <= rotation_degrees <= 180.0:
            raise ValueError(f"rotation_degrees must be in [0, 180], got {rotation_degrees}")
        if blur_kernel % 2 != 1:
            raise ValueError(f"blur_kernel must be odd, got {blur_kernel}")
        for name, p in [("flip_p", flip_p), ("color_jitter_p", color_jitter_p), ("grayscale_p", grayscale_p),
                        ("solarize_p", solarize_p)] + [(f"blur_p[{i}]", p) for i, p in enumerate(blur_p)]:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")

        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.flip_p = flip_p
        self.rotation_degrees = float(rotation_degrees)
        b, c, s, h = color_jitter
        # ColorJitter's ranges: multiplicative factors around 1, hue shift around 0.
        self.jitter_ranges = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h))
        self.color_jitter_p = color_jitter_p
        self.grayscale_p = grayscale_p
        self.blur_p = tuple(blur_p)
        self.blur_kernel = int(blur_kernel)
        self.blur_sigma = tuple(blur_sigma)
        self.solarize_p = solarize_p
        self.mean = [float(m) for m in mean]
        self.std = [float(v) for v in std]
        self.num_channels = int(num_channels)
        self.normalize = bool(normalize)
        self.pipeline = pipeline
        logger.info(
            "multi-crop: 2 global %d px scale %s, %d local %d px scale %s, %d channels",
            self.global_crops_size, self.global_crops_scale, self.local_crops_number,
            self.local_crops_size, self.local_crops_scale, self.num_channels,
        )

    # --- parameters -------------------------------------------------------------------

    def sample_crop_params(
        self, g: torch.Generator, height: int, width: int, *, scale, blur_p: float, solarize_p: float
    ) -> CropParams:
        box = sample_resized_crop_box(g, height, width, scale)
        # Drawn only when enabled, so runs without rotation keep their random streams.
        angle = _uniform(g, -self.rotation_degrees, self.rotation_degrees) if self.rotation_degrees > 0 else 0.0
        flip = _coin(g, self.flip_p)
        jitter = None
        if _coin(g, self.color_jitter_p):
            order = tuple(int(i) for i in torch.randperm(4, generator=g))
            factors = tuple(_uniform(g, lo, hi) for lo, hi in self.jitter_ranges)
            jitter = ColorJitterParams(order, factors)
        grayscale = _coin(g, self.grayscale_p)
        blur_sigma = _uniform(g, *self.blur_sigma) if _coin(g, blur_p) else None
        solarize = _coin(g, solarize_p)
        return CropParams(box, flip, jitter, grayscale, blur_sigma, solarize, angle)

    # --- application ------------------------------------------------------------------

    def _prepare(self, image: ImageLike) -> ImageLike:
        if isinstance(image, Image.Image):
            mode = "RGB" if self.num_channels == 3 else "L" if self.num_channels == 1 else None
            if mode is None:
                raise ValueError(f"PIL images have 1 or 3 channels; num_channels={self.num_channels} needs a tensor")
            return image if image.mode == mode else image.convert(mode)
        if isinstance(image, torch.Tensor):
            if image.ndim == 2:
                image = image.unsqueeze(0)
            if image.ndim != 3 or image.shape[0] != self.num_channels:
                raise ValueError(f"expected a ({self.num_channels}, H, W) tensor, got shape {tuple(image.shape)}")
            if image.dtype != torch.uint8 and not image.is_floating_point():
                raise TypeError(f"tensor images must be uint8 or floating point, got {image.dtype}")
            return image.as_subclass(torch.Tensor)
        raise TypeError(f"expected a PIL image or a torch.Tensor, got {type(image).__name__}")

    def apply_crop(self, image: ImageLike, params: CropParams, size: int) -> torch.Tensor:
        top, left, h, w = params.box
        out = F.resized_crop(image, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                             antialias=True)
        if params.angle:
            out = F.rotate(out, params.angle, interpolation=InterpolationMode.BILINEAR, fill=0)
        if params.flip:
            out = F.horizontal_flip(out)
        if params.jitter is not None:
            out = self._color_jitter(out, params.jitter)
        if params.grayscale and self.num_channels == 3:
            out = F.rgb_to_grayscale(out, num_output_channels=3)
        if params.blur_sigma is not None:
            out = F.gaussian_blur(out, [self.blur_kernel, self.blur_kernel], [params.blur_sigma, params.blur_sigma])
        if params.solarize:
            eight_bit = isinstance(out, Image.Image) or out.dtype == torch.uint8
            out = F.solarize(out, 128 if eight_bit else 0.5)
        return self._to_tensor(out)

    def _color_jitter(self, img: ImageLike, jitter: ColorJitterParams) -> ImageLike:
        brightness, contrast, saturation, hue = jitter.factors
        for fn_id in jitter.order:
            if fn_id == 0:
                img = F.adjust_brightness(img, brightness)
            elif fn_id == 1:
                img = F.adjust_contrast(img, contrast)
            elif self.num_channels == 3:  # saturation / hue are identities on one channel
                img = F.adjust_saturation(img, saturation) if fn_id == 2 else F.adjust_hue(img, hue)
        return img

    def _to_tensor(self, img: ImageLike) -> torch.Tensor:
        if isinstance(img, Image.Image):
            img = F.pil_to_tensor(img)
        img = img.as_subclass(torch.Tensor)
        if not self.normalize:
            return img if img.dtype == torch.uint8 else img.to(torch.float32)
        return normalize_crops(img, self.mean, self.std)

    def _crop_applier(self, image: ImageLike) -> Callable[[CropParams, int], torch.Tensor]:
        """``(params, size) -> crop`` for one image, by the configured pipeline."""
        if self.pipeline == "fast":
            hwc = as_hwc_uint8(image)
            if hwc is not None and hwc.shape[2] in (1, 3):
                def fast(params: CropParams, size: int) -> torch.Tensor:
                    crop = apply_crop_fast(hwc, params, size, self.blur_kernel)
                    return normalize_crops(crop, self.mean, self.std) if self.normalize else crop
                return fast
        return lambda params, size: self.apply_crop(image, params, size)

    # --- entry point ------------------------------------------------------------------

    def __call__(self, image: ImageLike, generator: Optional[torch.Generator] = None) -> dict:
        """Crops of ``image``; all randomness from ``generator``.

        Without a generator one is seeded from the global torch RNG (one draw), which
        keeps the official call signature usable; pass one for reproducibility.
        """
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        image = self._prepare(image)
        if isinstance(image, Image.Image):
            width, height = image.size
        else:
            height, width = image.shape[-2:]
        g_blur1, g_blur2, l_blur = self.blur_p

        p1 = self.sample_crop_params(generator, height, width, scale=self.global_crops_scale, blur_p=g_blur1,
                                     solarize_p=0.0)
        p2 = self.sample_crop_params(generator, height, width, scale=self.global_crops_scale, blur_p=g_blur2,
                                     solarize_p=self.solarize_p)
        apply = self._crop_applier(image)
        global_crops = [apply(p1, self.global_crops_size), apply(p2, self.global_crops_size)]
        local_crops: List[torch.Tensor] = []
        for _ in range(self.local_crops_number):
            pl = self.sample_crop_params(generator, height, width, scale=self.local_crops_scale, blur_p=l_blur,
                                         solarize_p=0.0)
            local_crops.append(apply(pl, self.local_crops_size))
        return {
            "global_crops": global_crops,
            # Same tensors as the student's globals (the teacher sees identical views).
            "global_crops_teacher": list(global_crops),
            "local_crops": local_crops,
            "offsets": (),
        }
