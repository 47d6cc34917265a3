"""Mid-slice previews of a volume: axial, coronal and sagittal side by side in one 8-bit PNG.

Display conventions (radiological): axial with anterior up and patient right on the image left;
coronal and sagittal with superior up. Voxels are resampled to square display pixels using the
spacing, so anisotropic volumes look undistorted. CT is shown through a HU window (default
W 1500 / L -300, which shows lungs, soft tissue and bone); other modalities through their ``[0, 1]``
model range. Intensities stay in HU everywhere else: the window is for previews only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from generator.manifest import atomic_save_png

__all__ = ["BODY_WINDOW", "preview_image", "save_preview"]

#: ``(low, high)`` HU of the default CT preview window (W 1500, L -300: lungs, soft tissue and bone).
BODY_WINDOW: tuple[float, float] = (-1050.0, 450.0)


def _to_display(plane: np.ndarray, row_mm: float, col_mm: float, height: int) -> np.ndarray:
    rows, cols = plane.shape
    width = max(1, int(round(height * (cols * col_mm) / (rows * row_mm))))
    img = Image.fromarray(np.round(plane * 255).astype(np.uint8))
    return np.asarray(img.resize((width, height), Image.BILINEAR))


def preview_image(volume: np.ndarray, spacing: Sequence[float], *, window: Sequence[float] | None = None,
                  height: int = 128) -> np.ndarray:
    """Three mid-slices of a ``(D, H, W)`` volume in the standard layout, as one ``uint8`` image.

    Args:
        volume: ``(D, H, W)`` values: HU when ``window`` is given, else ``[0, 1]``.
        spacing: ``(slice, row, column)`` mm.
        window: ``(low, high)`` mapped to black and white (e.g. :data:`BODY_WINDOW` for CT in HU);
            ``None``: the values are already in ``[0, 1]``.
        height: Pixel height of each panel.

    Returns:
        ``(height, total_width)`` uint8: axial | coronal | sagittal, 2 black pixels between panels.

    Raises:
        ValueError: not 3D, bad spacing or window.
    """
    v = np.asarray(volume, dtype=np.float64)
    if v.ndim != 3:
        raise ValueError(f"volume must be (D, H, W), got shape {v.shape}")
    sp = [float(s) for s in spacing]
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must be 3 positive mm, got {spacing!r}")
    if window is not None:
        lo, hi = (float(w) for w in window)
        if not hi > lo:
            raise ValueError(f"window must be (low, high) with low < high, got {window!r}")
        v = (v - lo) / (hi - lo)
    v = np.clip(v, 0.0, 1.0)
    d, h, w = (s // 2 for s in v.shape)
    axial = v[d]  # rows: anterior -> posterior, columns: right -> left
    coronal = v[::-1, h, :]  # superior at top
    sagittal = v[::-1, :, w]  # superior at top, anterior on the left
    panels = [_to_display(axial, sp[1], sp[2], height), _to_display(coronal, sp[0], sp[2], height),
              _to_display(sagittal, sp[0], sp[1], height)]
    gap = np.zeros((height, 2), np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


def save_preview(path: str | Path, volume: np.ndarray, spacing: Sequence[float], *,
                 window: Sequence[float] | None = None, height: int = 128) -> Path:
    """Write :func:`preview_image` as an 8-bit grayscale PNG (atomically)."""
    img = Image.fromarray(preview_image(volume, spacing, window=window, height=height))
    return atomic_save_png(img, path)
