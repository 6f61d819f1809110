"""A labelled grid of images with PIL: one row per model (or sweep point), one column per prompt x seed, every cell
captioned. Small images are enlarged by a whole factor (nearest neighbour) so that captions stay readable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIN_CELL = 192  # px: cells narrower than this are enlarged by a whole factor
PAD = 6
LINE = 14


def _font(size: int = 12) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font
        return ImageFont.load_default()


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def make_grid(rows: list[list[tuple[Path | Any, str]]], *, lines: int = 2) -> Any:
    """rows of (image or path, caption) -> one RGB image; a caption's lines beyond `lines` are dropped."""
    from PIL import Image, ImageDraw

    cells = [[(im if isinstance(im, Image.Image) else Image.open(im)).convert("RGB") for im, _ in row] for row in rows]
    w = max(c.width for row in cells for c in row)
    h = max(c.height for row in cells for c in row)
    scale = max(1, -(-MIN_CELL // w))
    cw, ch = w * scale, h * scale
    caption = lines * LINE + PAD
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (PAD + ncols * (cw + PAD), PAD + len(rows) * (ch + caption + PAD)), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    for r, row in enumerate(rows):
        for c, (_, text) in enumerate(row):
            img = cells[r][c]
            if scale > 1:
                img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
            x, y = PAD + c * (cw + PAD), PAD + r * (ch + caption + PAD)
            grid.paste(img, (x, y))
            for i, part in enumerate(text.split("\n")[:lines]):
                draw.text((x, y + ch + 3 + i * LINE), _fit(draw, part, font, cw), fill="black", font=font)
    return grid
