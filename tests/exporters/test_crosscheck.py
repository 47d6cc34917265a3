"""dcm2niix reads an exported CT series cleanly and agrees in world coordinates with our NIfTI."""

from __future__ import annotations

import subprocess

import nibabel as nib
import numpy as np
import pytest

from exporters.dicom import DicomExporter
from exporters.geometry import Geometry
from exporters.nifti import NiftiExporter

CT_WINDOW = {"kind": "ct_window", "low": -160.0, "high": 240.0, "unit": "HU", "bits_stored": 12, "modality": "CT"}


def _corners(shape_ijk, affine) -> np.ndarray:
    """Sorted (8, 3) world coordinates of the corner voxel centres of an (i, j, k) grid."""
    ni, nj, nk = shape_ijk
    idx = np.array([[i, j, k, 1.0] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)])
    pts = (affine @ idx.T).T[:, :3]
    return pts[np.lexsort(np.round(pts, 3).T[::-1])]


def _sitk_corners(image) -> np.ndarray:
    """Sorted RAS corners of a SimpleITK image (SimpleITK works in LPS)."""
    size = image.GetSize()
    pts = []
    for i in (0, size[0] - 1):
        for j in (0, size[1] - 1):
            for k in (0, size[2] - 1):
                x, y, z = image.TransformIndexToPhysicalPoint((i, j, k))
                pts.append((-x, -y, z))
    pts = np.array(pts)
    return pts[np.lexsort(np.round(pts, 3).T[::-1])]


@pytest.mark.parametrize("tilt", [0.0, 0.15])
def test_dcm2niix_agrees_with_own_nifti(tmp_path, meta, smooth, dcm2niix, tilt):
    sitk = pytest.importorskip("SimpleITK")
    volume = smooth(6, 20, 16)
    spacing = (2.5, 0.7, 0.8)
    c, s = np.cos(tilt), np.sin(tilt)
    orientation = (1.0, 0.0, 0.0, 0.0, c, -s)
    origin = (-5.0, 12.0, 40.0)
    line = meta(4, file_name="ct/vol4.nii.gz", intensity=CT_WINDOW)
    dicoms = DicomExporter(tmp_path / "dicom", "CT", software_version="t").add_volume(
        volume, line, spacing, orientation=orientation, origin=origin
    )
    own_path, _ = NiftiExporter(tmp_path / "nifti", "CT", software_version="t").add_volume(
        volume, line, spacing, orientation=orientation, origin=origin
    )
    out = tmp_path / "dcm2niix"
    out.mkdir()
    proc = subprocess.run(
        [dcm2niix, "-z", "y", "-b", "y", "-f", "conv", "-o", str(out), str(dicoms[0].parent)],
        capture_output=True, text=True, timeout=120,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    for bad in ("Bogus spatial matrix", "uneven", "Unable to determine slice direction", "gantry tilt", "Error"):
        assert bad.lower() not in log.lower(), log
    converted = sorted(out.glob("conv*.nii.gz"))
    assert len(converted) == 1, log

    expected = Geometry(volume.shape, spacing, orientation, origin).corners_ras()
    expected = expected[np.lexsort(np.round(expected, 3).T[::-1])]
    own, theirs = nib.load(own_path), nib.load(converted[0])
    np.testing.assert_allclose(_corners(own.shape, own.affine), expected, atol=1e-3)
    np.testing.assert_allclose(_corners(theirs.shape, theirs.affine), expected, atol=1e-3)
    # the same voxel values (dcm2niix may reorder axes; compare as multisets)
    np.testing.assert_array_equal(np.sort(own.get_fdata().ravel()), np.sort(theirs.get_fdata().ravel()))

    # SimpleITK: the DICOM series, our NIfTI and dcm2niix's NIfTI land on the same corners
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in dicoms])
    np.testing.assert_allclose(_sitk_corners(reader.Execute()), expected, atol=1e-3)
    np.testing.assert_allclose(_sitk_corners(sitk.ReadImage(str(own_path))), expected, atol=1e-3)
    np.testing.assert_allclose(_sitk_corners(sitk.ReadImage(str(converted[0]))), expected, atol=1e-3)
