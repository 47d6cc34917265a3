"""Preview PNGs: three panels, radiological orientation, windowing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from generator.volumes.phantom import render_ct_phantom
from generator.volumes.previews import BODY_WINDOW, preview_image, save_preview


def test_panels_orientation_and_window(tmp_path):
    vol = np.zeros((8, 10, 12), np.float32)
    vol[4, 0, 0] = 1.0  # axial mid slice: anterior row, patient-right column -> top left of panel 1
    vol[7, 5, 6] = 1.0  # most superior slice -> top row of the coronal panel
    img = preview_image(vol, (1.0, 1.0, 1.0), height=8)
    assert img.dtype == np.uint8 and img.shape[0] == 8
    axial = img[:, :10]
    assert axial[0, 0] > 0 and axial[-1, -1] == 0
    coronal = img[:, 14:26]
    assert coronal[0].max() > 0 and coronal[-1].max() == 0
    ct = render_ct_phantom({"sex": "M", "age": 40}, shape=24, seed=0)
    path = save_preview(tmp_path / "p.png", ct.array, ct.spacing, window=BODY_WINDOW)
    png = np.asarray(Image.open(path))
    assert png.ndim == 2 and png.min() == 0 and png.max() > 200


def test_anisotropic_spacing_sets_panel_widths():
    img = preview_image(np.zeros((4, 8, 8)), (4.0, 1.0, 1.0), height=16)
    # axial 8x8 mm -> 16 wide; coronal 16 mm tall x 8 mm wide -> 8 wide; sagittal the same
    assert img.shape == (16, 16 + 2 + 8 + 2 + 8)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        preview_image(np.zeros((4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="window"):
        preview_image(np.zeros((4, 4, 4)), (1, 1, 1), window=(1, 0))
