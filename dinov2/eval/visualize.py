"""Pictures of what a backbone sees: PCA maps of patch features and class-token attention.

PCA map (DINOv2 paper, Fig. 1 and Sec. 7): a first PCA over the patches of all given images;
patches whose first component is above a threshold are foreground, the rest is background
(black). A second PCA over foreground patches only gives three components shown as RGB. The
sign of a principal component is arbitrary, so the first one is oriented to make the image
border mostly background (objects tend not to touch every edge); pass ``orient=False`` to
keep the raw SVD sign.

Attention map: the class token's attention to every patch, per head, in the last block. It
is recomputed from that block's own ``norm1`` and ``attn.qkv`` on the block's input (caught by
a forward pre-hook), so it does not depend on which attention kernel the model runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from dinov2.data.images import is_image_name, load_image as decode_file

from .backbone import blocks_of, model_in_chans
from .data import IMAGENET_MEAN, IMAGENET_STD, DataError, normalization
from .features import eval_mode
from .figure import enlarge, row, scale_factor, stack, titled, with_caption

# ---------------------------------------------------------------------------- maths


def pca_components(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean ``[D]``, top-``n`` principal directions ``[n, D]``) of rows of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:n]
    if comps.shape[0] < n:  # fewer samples/dims than components: pad with zeros
        comps = np.concatenate([comps, np.zeros((n - comps.shape[0], x.shape[1]))])
    return mean, comps


def border_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m


def foreground_mask(
    grids: list[np.ndarray], threshold: float = 0.0, orient: bool = True
) -> tuple[list[np.ndarray], np.ndarray]:
    """First PCA over all patches of all images ``grids`` (each ``[h, w, D]``).

    Returns per-image boolean foreground masks (first component > ``threshold``) and the
    first-component values, concatenated over images.
    """
    flat = np.concatenate([g.reshape(-1, g.shape[-1]) for g in grids])
    mean, comps = pca_components(flat, 1)
    first = (flat - mean) @ comps[0]
    if orient:
        border = np.concatenate([border_mask(*g.shape[:2]).ravel() for g in grids])
        if (~border).any() and first[border].mean() > first[~border].mean():
            first = -first
    masks, start = [], 0
    for g in grids:
        n = g.shape[0] * g.shape[1]
        masks.append((first[start : start + n] > threshold).reshape(g.shape[:2]))
        start += n
    return masks, first


def pca_rgb(
    grids: list[np.ndarray], remove_background: bool = True, threshold: float = 0.0, orient: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image an ``[h, w, 3]`` float map in [0, 1] (the first three PCA components of the
    foreground patch features, min-max scaled jointly over all images; background black) and
    its ``[h, w]`` foreground mask."""
    if not grids:
        raise ValueError("pca_rgb needs at least one feature grid")
    if remove_background:
        masks, _ = foreground_mask(grids, threshold, orient)
        if not any(m.any() for m in masks):  # degenerate: keep everything rather than a black picture
            masks = [np.ones(g.shape[:2], dtype=bool) for g in grids]
    else:
        masks = [np.ones(g.shape[:2], dtype=bool) for g in grids]
    fg = np.concatenate([g[m] for g, m in zip(grids, masks)])
    mean, comps = pca_components(fg, 3)
    proj = (fg - mean) @ comps.T  # [n_fg, 3]
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    proj = (proj - lo) / np.where(hi > lo, hi - lo, 1.0)
    out, start = [], 0
    for g, m in zip(grids, masks):
        rgb = np.zeros(g.shape[:2] + (3,))
        n = int(m.sum())
        rgb[m] = proj[start : start + n]
        start += n
        out.append(rgb)
    return out, masks


def cls_attention_from_qkv(
    tokens_normed: torch.Tensor, qkv: nn.Linear, num_heads: int, scale: float
) -> torch.Tensor:
    """Class-token attention ``[B, heads, N]`` over all ``N`` tokens (rows sum to 1)."""
    b, n, d = tokens_normed.shape
    q, k, _ = qkv(tokens_normed).reshape(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
    return logits.softmax(dim=-1)[:, :, 0]


# ---------------------------------------------------------------------------- model hooks


@dataclass
class ImageMaps:
    patch_grid: np.ndarray  # [h, w, D] normalised patch features of the last block
    attention: np.ndarray  # [heads, h, w] class-token attention to patches, last block


@torch.inference_mode()
def patch_features_and_attention(model: nn.Module, image: torch.Tensor) -> ImageMaps:
    """Last-block patch features and class-token attention for one ``[1, 3, H, W]`` image."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image [1, C, H, W], got {tuple(image.shape)}")
    p = model.patch_size
    h, w = image.shape[-2] // p, image.shape[-1] // p
    last = blocks_of(model)[-1]
    caught = {}

    def hook(_module, args):
        caught["x"] = args[0]

    handle = last.register_forward_pre_hook(hook)
    try:
        out = model.forward_features(image)
    finally:
        handle.remove()
    x = caught["x"]
    if x.dim() != 3:
        raise RuntimeError(f"last block received {tuple(x.shape)} tokens; expected a dense [B, N, D] batch")
    attn = cls_attention_from_qkv(last.norm1(x), last.attn.qkv, last.attn.num_heads, last.attn.scale)
    skip = 1 + int(getattr(model, "num_register_tokens", 0))
    attn = attn[0, :, skip:].reshape(-1, h, w)
    patches = out["x_norm_patchtokens"][0].reshape(h, w, -1)
    return ImageMaps(patch_grid=patches.float().cpu().numpy(), attention=attn.float().cpu().numpy())


# ---------------------------------------------------------------------------- images in and out


def load_image(item: str) -> tuple[str, Image.Image]:
    """(name, RGB image) for a file path or ``skimage:NAME`` (photos shipped with scikit-image)."""
    if item.startswith("skimage:"):
        import skimage.data

        name = item.split(":", 1)[1]
        fn = getattr(skimage.data, name, None)
        if fn is None or not callable(fn):
            raise DataError(f"{item}: skimage.data has no image {name!r} (try astronaut, chelsea, coffee)")
        arr = np.asarray(fn())
        if arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-12)).astype(np.uint8)
        return name, Image.fromarray(arr).convert("RGB")
    if not os.path.isfile(item):
        raise DataError(f"image not found: {item}")
    try:
        img = decode_file(item, "RGB")  # the project's decoding rule (16-bit scaled)
    except Exception as e:
        raise DataError(f"{item}: cannot read image ({e})") from e
    return os.path.splitext(os.path.basename(item))[0], img


def expand_inputs(items: list[str]) -> list[str]:
    """Files stay, directories become their image files (sorted), ``skimage:`` names stay."""
    out = []
    for it in items:
        if os.path.isdir(it):
            found = sorted(
                os.path.join(it, f) for f in os.listdir(it)
                if is_image_name(f) and os.path.isfile(os.path.join(it, f))  # regular files: no FIFOs
            )
            if not found:
                raise DataError(f"{it}: folder contains no images")
            out.extend(found)
        else:
            out.append(it)
    if not out:
        raise DataError("no input images given")
    return out


def prepare(
    img: Image.Image, img_size: int, patch_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> tuple[Image.Image, torch.Tensor]:
    """Resize the short side to ``img_size`` (aspect kept), crop each side down to a multiple of
    the patch size; return the shown picture (RGB) and the normalised tensor ``[1, C, H, W]``
    with ``C = len(mean)`` channels (1: grayscale)."""
    w, h = img.size
    s = img_size / min(w, h)
    nw, nh = max(patch_size, round(w * s)), max(patch_size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    cw, ch = nw - nw % patch_size, nh - nh % patch_size
    left, top = (nw - cw) // 2, (nh - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    if len(mean) == 1:  # a grayscale backbone: show (and feed) what it sees
        img = img.convert("L").convert("RGB")
    arr = np.asarray(img.convert("L"), dtype=np.float32)[..., None] if len(mean) == 1 else np.asarray(img, np.float32)
    t = torch.from_numpy(arr / 255.0).permute(2, 0, 1)
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    return img, ((t - m) / s)[None]


def to_png(rgb01: np.ndarray, factor: int = 1) -> Image.Image:
    """``[h, w, 3]`` floats in [0, 1] -> PIL image, ``factor`` times larger (one square per patch)."""
    arr = (np.clip(rgb01, 0.0, 1.0) * 255).round().astype(np.uint8)
    return enlarge(Image.fromarray(arr), factor)


def heatmap(values: np.ndarray, factor: int = 1, cmap: str = "viridis") -> Image.Image:
    """A 2-D map min-max scaled to [0, 1] through a matplotlib colormap."""
    from matplotlib import colormaps

    v = values.astype(np.float64)
    v = (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else np.zeros_like(v)
    return to_png(colormaps[cmap](v)[..., :3], factor)


@dataclass
class Entry:
    """One backbone of a figure: its label (caption and row label) and input statistics."""

    label: str
    model: nn.Module
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    img_size: int = 224
    short: str = ""  # row label of a comparison (the caption holds ``label``)


@dataclass
class Computed:
    entry: Entry
    names: list[str]
    shown: list[Image.Image]  # the pictures the backbone saw (RGB, its working size)
    maps: list[ImageMaps]
    rgbs: list[np.ndarray]
    masks: list[np.ndarray]


def compute(entry: Entry, items: list[str], remove_background: bool, threshold: float, progress: bool) -> Computed:
    """Maps of every image for one backbone; the PCA is fitted jointly over all its images."""
    from tqdm.auto import tqdm

    model = entry.model
    mean, std = normalization(model_in_chans(model), entry.mean, entry.std)
    device = next(model.parameters()).device
    shown, maps, names = [], [], []
    with eval_mode(model):
        for item in tqdm(items, desc="visualize", disable=not progress, leave=False):
            name, img = load_image(item)
            pic, x = prepare(img, entry.img_size, model.patch_size, mean, std)
            maps.append(patch_features_and_attention(model, x.to(device)))
            shown.append(pic)
            names.append(_unique(name, names))
    rgbs, masks = pca_rgb([m.patch_grid for m in maps], remove_background, threshold)
    return Computed(entry, names, shown, maps, rgbs, masks)


def panels(c: Computed, i: int, max_heads: int | None) -> tuple[list[Image.Image], list[Image.Image]]:
    """(titled panels for the overview, untitled enlarged maps for the single files) of image ``i``."""
    pic, m, rgb = c.shown[i], c.maps[i], c.rgbs[i]
    factor = scale_factor(pic.size)
    grid_factor = factor * c.entry.model.patch_size
    pca_img = to_png(rgb, grid_factor)
    heads = [heatmap(a, grid_factor) for a in m.attention]
    h, w = m.attention.shape[1:]
    titled_panels = [titled(enlarge(pic, factor, smooth=True), f"input {pic.width}x{pic.height} px"),
                     titled(pca_img, f"PCA of patch features ({h}x{w} patches)")]
    shown_heads = heads if max_heads is None else heads[:max_heads]
    titled_panels += [titled(hm, f"attention head {k} (class token)") for k, hm in enumerate(shown_heads)]
    return titled_panels, [pca_img, *heads]


def caption(computed: list[Computed], name: str, heads_shown: str, remove_background: bool) -> list[str]:
    backbones = "; ".join(f"{chr(ord('A') + r)}: {c.entry.label}" if len(computed) > 1 else c.entry.label
                          for r, c in enumerate(computed))
    background = ", background (first component below the threshold) black" if remove_background else ""
    return [f"image {name}  |  {backbones}",
            f"PCA: first 3 components of the last block's normalised patch features as RGB, fitted over all given "
            f"images{background}. Attention: the last block's class token to every patch, {heads_shown}."]


def visualize(
    model: nn.Module,
    inputs: list[str],
    output_dir: str,
    img_size: int = 224,
    remove_background: bool = True,
    threshold: float = 0.0,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    progress: bool = True,
    label: str = "backbone",
    max_heads: int | None = 6,
) -> dict:
    """Write ``<name>_pca.png``, ``<name>_attn_head<i>.png`` and ``<name>_overview.png`` (labelled
    panels: input, PCA, heads; a caption naming the backbone) per image, every panel at least 448 px.

    The PCA is fitted jointly over all given images, so colours are comparable between them.
    ``mean``/``std`` default to ImageNet's for an RGB backbone (see ``data.normalization``).
    """
    return _write([Entry(label, model, mean, std, img_size)], inputs, output_dir, remove_background, threshold,
                  progress, max_heads)


def visualize_comparison(entries: list[Entry], inputs: list[str], output_dir: str, remove_background: bool = True,
                         threshold: float = 0.0, progress: bool = True, max_heads: int | None = 6) -> dict:
    """Several backbones side by side: ``<name>_compare.png`` holds one labelled row per backbone
    (input, PCA, heads), besides each backbone's own files (``<name>_<row>_pca.png``, ...)."""
    return _write(entries, inputs, output_dir, remove_background, threshold, progress, max_heads)


def _write(entries: list[Entry], inputs: list[str], output_dir: str, remove_background: bool, threshold: float,
           progress: bool, max_heads: int | None) -> dict:
    items = expand_inputs(inputs)
    computed = [compute(e, items, remove_background, threshold, progress) for e in entries]
    os.makedirs(output_dir, exist_ok=True)
    compare = len(entries) > 1
    written = []
    for i, name in enumerate(computed[0].names):
        rows, files, details = [], {}, []
        for r, c in enumerate(computed):
            titled_panels, maps = panels(c, i, max_heads)
            prefix = f"{name}_{chr(ord('a') + r)}" if compare else name
            files[f"{prefix}_pca" if compare else "pca"] = _save(maps[0], output_dir, f"{prefix}_pca.png")
            for k, hm in enumerate(maps[1:]):
                key = f"{prefix}_attn_head{k}" if compare else f"attn_head{k}"
                files[key] = _save(hm, output_dir, f"{prefix}_attn_head{k}.png")
            letter = chr(ord("A") + r)
            rows.append(row(titled_panels, f"{letter}: {c.entry.short or c.entry.label}" if compare else None))
            details.append({"label": c.entry.label, "size": list(c.shown[i].size),
                            "foreground_fraction": float(c.masks[i].mean())})
        n_heads = max(len(c.maps[i].attention) for c in computed)
        shown = n_heads if max_heads is None else min(n_heads, max_heads)
        heads_text = f"{shown} of {n_heads} heads shown" if shown < n_heads else f"all {n_heads} heads"
        figure = with_caption(stack(rows), caption(computed, name, heads_text, remove_background))
        key = "compare" if compare else "overview"
        files[key] = _save(figure, output_dir, f"{name}_{key}.png")
        entry = {"image": name, "size": details[0]["size"], "foreground_fraction": details[0]["foreground_fraction"],
                 "files": files}
        if compare:
            entry["backbones"] = details
        written.append(entry)
    return {"metric": "visualize", "output_dir": output_dir, "images": written,
            "backbones": [e.label for e in entries]}


def _save(image: Image.Image, output_dir: str, filename: str) -> str:
    path = os.path.join(output_dir, filename)
    image.save(path)
    return path


def _unique(name: str, taken: list[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    return out
