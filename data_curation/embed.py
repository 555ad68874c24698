"""Embed an image pool with a backbone: L2-normalised class-token features.

Images come from a folder (searched recursively) or a list file (one path a line; relative
paths are relative to the list file). Folders are listed and images decoded by the
project's one rule (``dinov2.data.images``: cycle-safe walk, regular files only, each real
file once; 16-bit images scaled to 8 bits), then resized and center-cropped (224 by
default) and normalised with the ImageNet statistics. An image that cannot be decoded is
skipped, logged and listed in errors.txt (path and error) instead of stopping the run.
A path that is not valid UTF-8 is carried as ``os.fsdecode`` gives it and written with
``surrogateescape``, so it reads back as the same file.

The pool is split in parts of ``part_size`` images; every finished part is saved, so a
killed run continues at the first missing part, then the parts are concatenated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib.error import URLError

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm.auto import tqdm

from dinov2.data.images import list_image_files, load_image
from dinov2.data.unreadable import warn_unreadable
from dinov2.normalization import IMAGENET_MEAN, IMAGENET_STD

from .arrays import CurationInputError, shard_slice  # noqa: F401  (shard_slice: re-exported)
from .choices import EmbeddingDtype, choose


def list_images(source: str | os.PathLike) -> list[str]:
    """Absolute image paths from a folder (recursive, sorted) or a list file; also in the data-set
    grammar of training and evaluation (``folder:DIR``, ``manifest:LIST``; ``dinov2.data.spec``)."""
    if str(source).startswith(("folder:", "manifest:")):
        from dinov2.data.spec import DatasetSpecError, parse_dataset_spec

        try:
            source = parse_dataset_spec(str(source), allowed=("folder", "manifest"), what="--images").path
        except DatasetSpecError as exc:
            raise CurationInputError(str(exc)) from None
    source = Path(source)
    if source.is_dir():
        paths = sorted(os.path.realpath(p) for p in list_image_files(source))
    elif source.is_file():
        paths = []
        for line in source.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path = Path(line)
            paths.append(str(path if path.is_absolute() else (source.parent / path).resolve()))
    else:
        raise CurationInputError(f"--images {source} does not exist (expected a folder of images or a list file)")
    if not paths:
        raise CurationInputError(
            f"no images found in {source} (expected image files PIL can decode, e.g. .jpg, .png, .tif, "
            "or a list file with one path a line)"
        )
    return paths


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise CurationInputError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise CurationInputError(f"--shard {text}: need 0 <= i < n, got i={index}, n={count}")
    return index, count


def make_transform(image_size: int = 224, resize_size: int = 256) -> Callable:
    if image_size < 1 or resize_size < image_size:
        raise CurationInputError(
            f"need 1 <= image_size <= resize_size, got image_size={image_size}, resize_size={resize_size}"
        )
    return transforms.Compose(
        [
            transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImagePathDataset(Dataset):
    """(position, image tensor, error message) per path; a corrupt image gives a zero
    tensor and its error, so one bad file never stops the DataLoader."""

    def __init__(self, paths: Sequence[str], transform: Callable, image_size: int):
        self.paths = list(paths)
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        try:
            tensor = self.transform(load_image(self.paths[position], "RGB"))
            return position, tensor, ""
        except Exception as exc:  # any decoding failure is data, not a crash
            blank = torch.zeros(3, self.image_size, self.image_size)
            return position, blank, f"{type(exc).__name__}: {exc}".replace("\n", " ")


@dataclass
class EmbeddedPart:
    embeddings: np.ndarray  # [ok images, D], unit rows
    paths: list[str]  # paths of the ok images, same order
    errors: list[tuple[str, str]]  # (path, error) of the images that failed


class ThumbnailDescriptor(nn.Module):
    """Non-learned stand-in backbone (``--backbone thumbnail``): the mean-centred 8x8 colour
    thumbnail, averaged with its mirror image. It detects flipped and mildly cropped copies
    without any weights, for demos and smoke tests on machines that cannot download the
    released checkpoints; use a DINOv2 backbone for real curation."""

    grid = 8
    embed_dim = 3 * grid * grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x, self.grid)
        pooled = (pooled + torch.flip(pooled, dims=[3])) / 2
        flat = pooled.flatten(1)
        return flat - flat.mean(dim=1, keepdim=True)


def load_model(backbone: str, weights: str | None, **kwargs) -> nn.Module:
    """A hub backbone by name (``weights``: None/"random" = random init, "LVD142M",
    a local path or file:// URL), a backbone file written by ``dinov2-export`` (built as it
    describes itself, fed the input it was trained on), or ``thumbnail`` (see ThumbnailDescriptor)."""
    if backbone == "thumbnail":
        return ThumbnailDescriptor().eval()
    if Path(backbone).is_file():  # written by dinov2-export: it describes its architecture and input
        from dinov2.hub.backbones import load_described
        from dinov2.hub.input_adapter import from_imagenet_rgb

        try:
            return from_imagenet_rgb(*load_described(backbone))
        except ValueError as exc:
            raise CurationInputError(str(exc)) from exc
    try:
        from dinov2.hub.backbones import load_backbone
    except ImportError as exc:  # pragma: no cover - only without the dinov2 package
        raise CurationInputError(f"cannot import dinov2.hub.backbones to build {backbone!r}: {exc}") from exc
    if weights in (None, "random", "none"):
        weights = None
    try:
        return load_backbone(backbone, weights=weights, **kwargs)
    except ValueError as exc:
        raise CurationInputError(str(exc)) from exc
    except (URLError, ConnectionError, TimeoutError) as exc:  # offline: say how to pass local weights
        raise CurationInputError(download_hint(backbone, weights, exc)) from exc


def download_hint(backbone: str, weights, exc: BaseException) -> str:
    """What to do when the weights cannot be downloaded (no network, proxy, firewall)."""
    import re

    from dinov2.hub.weights import DINOV2_BASE_URL, Weights, backbone_url

    url = str(weights)
    released = re.fullmatch(r"dinov2_vit([sblg])14(_reg)?", backbone)
    if url in Weights.__members__:
        sizes = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}
        url = backbone_url(sizes[released[1]], 14, 4 if released[2] else 0) if released else f"{DINOV2_BASE_URL}/..."
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"cannot download the {weights} weights of {backbone} from {url} ({getattr(exc, 'reason', exc)}). "
        f"Without network access: fetch that file on a machine that has it and pass --weights /path/to/"
        f"{url.rsplit('/', 1)[-1]} (embed.weights in a config), or copy it into {cache}/ where it is found "
        "offline; a backbone of your own exported with dinov2-export is passed as --backbone FILE. "
        "--weights random or --backbone thumbnail run without any weights (smoke tests only)."
    )


@torch.inference_mode()
def embed_paths(
    model: nn.Module,
    paths: Sequence[str],
    *,
    image_size: int = 224,
    resize_size: int = 256,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    dtype: str = EmbeddingDtype.float32,
    progress: bool = True,
) -> EmbeddedPart:
    """Embed ``paths`` in order; failed images are listed in ``errors``, not embedded."""
    dtype = choose(EmbeddingDtype, dtype, "embedding dtype").value
    dataset = ImagePathDataset(paths, make_transform(image_size, resize_size), image_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    features, kept, errors = [], [], []
    model = model.to(device).eval()
    for positions, images, messages in tqdm(loader, desc="embed", unit="batch", disable=not progress):
        ok = torch.tensor([not m for m in messages], dtype=torch.bool)
        for position, message in zip(positions.tolist(), messages):
            if message:
                warn_unreadable(dataset.paths[position], message)
                errors.append((dataset.paths[position], message))
        if not ok.any():
            continue
        output = model(images[ok].to(device)).float()
        output = torch.nn.functional.normalize(output, dim=1)
        features.append(output.cpu().numpy().astype(dtype))
        kept.extend(dataset.paths[p] for p in positions[ok].tolist())
    dim = getattr(model, "embed_dim", None)
    if features:
        embeddings = np.concatenate(features)
    else:
        embeddings = np.empty((0, dim or 0), dtype=dtype)
    return EmbeddedPart(embeddings, kept, errors)


def iter_parts(num_items: int, part_size: int) -> Iterator[tuple[int, slice]]:
    for number, start in enumerate(range(0, num_items, part_size)):
        yield number, slice(start, min(start + part_size, num_items))
