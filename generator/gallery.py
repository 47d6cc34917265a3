"""Contact sheets: a grid of images with wrapped captions, as one PNG."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from generator.manifest import atomic_save_png


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
    return atomic_save_png(sheet, path)


def gallery_html(folder: Path, lines: Sequence[dict], *, title: str, page_dir: Path) -> str:
    """An HTML page showing each image of a generated folder with its prompt, seed, privacy verdict
    and exported files (links relative to ``page_dir``, where the page will be saved).

    Args:
        folder: The generated imagefolder.
        lines: Its manifest lines (``generator.generation.read_manifest``).
        title: Page title.
        page_dir: Folder the page is written to.
    """
    import html
    import os.path

    def rel(p: Path) -> str:
        return html.escape(Path(os.path.relpath(p, page_dir)).as_posix())

    cards = []
    for ln in lines:
        img = folder / ln["file_name"]
        verdict = ln.get("privacy_verdict", "unchecked")
        files = [f'<a href="{rel(img)}">PNG</a>']
        for key, label in (("dicom_file", "DICOM"), ("nifti_file", "NIfTI")):
            if ln.get(key):
                files.append(f'<a href="{rel(folder / ln[key])}">{label}</a>')
        sim_text = html.escape(privacy_caption(ln))
        cards.append(
            f'<figure class="{html.escape(str(verdict))}"><img src="{rel(img)}" width="192" height="192" '
            f'style="image-rendering:pixelated"><figcaption><b>{html.escape(ln["text"])}</b><br>'
            f'seed {ln.get("seed")} · privacy: <span class="v">{html.escape(str(verdict))}</span> {sim_text}'
            f'<br>{" · ".join(files)}</figcaption></figure>'
        )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{display:inline-block;width:200px;vertical-align:top;
margin:6px;font-size:12px}} .reject .v{{color:#b00;font-weight:bold}} .review .v{{color:#b60}}
.keep .v{{color:#070}}</style></head><body><h1>{html.escape(title)}</h1>
<p>{len(lines)} synthetic images. Every image is synthetic; DICOM files carry Synthetic Data = YES.</p>
{''.join(cards)}</body></html>
"""


def privacy_caption(line: dict) -> str:
    """Each view's similarity to the nearest training image beside that view's own threshold, same
    units (from the manifest's ``privacy_similarity_<view>`` / ``privacy_threshold_<view>``); the
    deciding view first. Empty when the line has no privacy fields."""
    views = sorted(k.removeprefix("privacy_similarity_") for k in line if k.startswith("privacy_similarity_"))
    first = line.get("privacy_view")
    if first in views:
        views = [first] + [v for v in views if v != first]
    parts = []
    for v in views:
        sim, thr = line.get(f"privacy_similarity_{v}"), line.get(f"privacy_threshold_{v}")
        if isinstance(sim, (int, float)) and isinstance(thr, (int, float)):
            parts.append(f"{v} {sim:.3f} (threshold {thr:.3f})")
    return ("nearest training image: " + ", ".join(parts)) if parts else ""


def folder_contact_sheet(folder: str | Path, path: str | Path, limit: int = 48) -> Path:
    """Contact sheet of the first ``limit`` images of a generated folder, captioned with prompt,
    seed and privacy verdict; saved atomically as PNG at ``path``."""
    from generator.manifest import load_png, read_manifest

    folder = Path(folder)
    lines = read_manifest(folder)[:limit]
    images = [load_png(folder / ln["file_name"]) for ln in lines]
    captions = [f"{ln['text']} (seed {ln['seed']}; {ln.get('privacy_verdict', 'unchecked')})" for ln in lines]
    return save_contact_sheet(contact_sheet(images, captions), path)
