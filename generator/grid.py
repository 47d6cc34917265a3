"""Contact sheets: a grid of images with wrapped captions, as one PNG."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def contact_sheet(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    *,
    columns: int = 6,
    tile: int = 160,
    caption_lines: int = 4,
) -> Image.Image:
    """A grayscale grid with a caption under each tile.

    Args:
        images: ``(H, W)`` float arrays in ``[0, 1]``.
        captions: One caption per image (wrapped to the tile width, at most ``caption_lines`` lines).
        columns: Tiles per row.
        tile: Side of each tile in pixels (images are resized to it).
        caption_lines: Text lines kept under each tile.

    Raises:
        ValueError: no images, or captions and images of different lengths.
    """
    if len(images) == 0:
        raise ValueError("contact_sheet needs at least one image")
    if len(captions) != len(images):
        raise ValueError(f"got {len(captions)} captions for {len(images)} images")
    font = ImageFont.load_default()
    line_h = 12
    chars = max(10, tile // 6)
    cell_h = tile + caption_lines * line_h + 6
    cols = min(columns, len(images))
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("L", (cols * (tile + 4) + 4, rows * cell_h + 4), color=255)
    draw = ImageDraw.Draw(sheet)
    for k, (img, cap) in enumerate(zip(images, captions)):
        r, c = divmod(k, cols)
        x, y = 4 + c * (tile + 4), 4 + r * cell_h
        arr = np.round(np.clip(np.asarray(img, dtype=np.float64), 0, 1) * 255).astype(np.uint8)
        sheet.paste(Image.fromarray(arr).resize((tile, tile), Image.Resampling.BILINEAR), (x, y))
        for i, text in enumerate(textwrap.wrap(cap, chars)[:caption_lines]):
            draw.text((x, y + tile + 2 + i * line_h), text, fill=0, font=font)
    return sheet


def save_contact_sheet(sheet: Image.Image, path: str | Path) -> Path:
    """Save a sheet as PNG atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
