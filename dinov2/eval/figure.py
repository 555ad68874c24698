"""Figures people can read: titled panels, row labels, a caption, at least 448 px a side.

Maps computed at the backbone's resolution (one value per patch) are enlarged by an integer
factor with nearest-neighbour resampling, so each patch stays a crisp square; photographs are
enlarged with bicubic resampling. Pure image composition (PIL): no model, no files.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

MIN_SIDE = 448  # short side of every panel, in pixels
PAD = 6


def scale_factor(size: tuple[int, int], min_side: int = MIN_SIDE) -> int:
    """The integer factor that brings the short side of ``size`` (w, h) to at least ``min_side``."""
    return max(1, math.ceil(min_side / max(1, min(size))))


def enlarge(image: Image.Image, factor: int, smooth: bool = False) -> Image.Image:
    """``image`` ``factor`` times larger: nearest (patch maps) or bicubic (photographs)."""
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.BICUBIC if smooth else Image.NEAREST)


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:  # pragma: no cover - older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _text_height(text_font: ImageFont.ImageFont, text: str = "Ag") -> int:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=text_font)
    return bottom - top


def titled(panel: Image.Image, title: str, size: int = 22) -> Image.Image:
    """``panel`` under a white strip holding ``title`` (left-aligned, black)."""
    text_font = font(size)
    strip = _text_height(text_font) + 2 * PAD
    canvas = Image.new("RGB", (panel.width, panel.height + strip), "white")
    ImageDraw.Draw(canvas).text((PAD, PAD), title, fill="black", font=text_font)
    canvas.paste(panel.convert("RGB"), (0, strip))
    return canvas


def row(panels: list[Image.Image], label: str | None = None, size: int = 24) -> Image.Image:
    """Panels side by side (top-aligned), optionally after a rotated row label."""
    width = sum(p.width for p in panels) + PAD * (len(panels) - 1)
    height = max(p.height for p in panels)
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + PAD
    if not label:
        return canvas
    text_font = font(size)
    band = _text_height(text_font) + 2 * PAD
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while len(label) > 4 and measure.textlength(label, font=text_font) > height - 2 * PAD:
        label = label[:-4] + "..."  # the caption holds the full text
    text = Image.new("RGB", (height, band), "white")
    ImageDraw.Draw(text).text((PAD, PAD), label, fill="black", font=text_font)
    labelled = Image.new("RGB", (band + canvas.width, height), "white")
    labelled.paste(text.rotate(90, expand=True), (0, 0))
    labelled.paste(canvas, (band, 0))
    return labelled


def with_caption(body: Image.Image, lines: list[str], size: int = 24) -> Image.Image:
    """``body`` under a caption of ``lines`` (wrapped to the figure's width)."""
    text_font = font(size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = []
    for line in lines:
        words, current = line.split(" "), ""
        for word in words:
            candidate = f"{current} {word}".strip()
            if current and draw.textlength(candidate, font=text_font) > body.width - 2 * PAD:
                wrapped.append(current)
                current = word
            else:
                current = candidate
        wrapped.append(current)
    line_height = _text_height(text_font) + PAD
    top = len(wrapped) * line_height + 2 * PAD
    canvas = Image.new("RGB", (body.width, body.height + top), "white")
    drawer = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrapped):
        drawer.text((PAD, PAD + i * line_height), line, fill="black", font=text_font)
    canvas.paste(body, (0, top))
    return canvas


def stack(rows: list[Image.Image]) -> Image.Image:
    """Rows one under the other (left-aligned)."""
    width = max(r.width for r in rows)
    canvas = Image.new("RGB", (width, sum(r.height for r in rows) + PAD * (len(rows) - 1)), "white")
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height + PAD
    return canvas
