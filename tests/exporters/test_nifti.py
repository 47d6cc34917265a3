"""NIfTI export: RAS affine, qform = sform, units, explicit scaling, descrip, sidecar, description."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from exporters.geometry import AXIAL, Geometry
from exporters.nifti import NiftiExporter

SOFTWARE_VERSION = "9.9.9-test"
CT_WINDOW = {"kind": "ct_window", "low": -160.0, "high": 240.0, "unit": "HU", "bits_stored": 12, "modality": "CT"}


def _raw_header(path) -> nib.Nifti1Header:
    """The header exactly as stored (nibabel's loaded header resets scl_* to NaN)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return nib.Nifti1Header.from_fileobj(fh)


def _check_header(path, expected_affine) -> nib.Nifti1Image:
    img = nib.load(path)
    hdr = _raw_header(path)
    assert int(hdr["qform_code"]) == int(hdr["sform_code"]) == 1
    np.testing.assert_allclose(hdr.get_qform(), hdr.get_sform(), atol=1e-4)
    np.testing.assert_allclose(img.affine, expected_affine, atol=1e-4)
    assert hdr.get_xyzt_units()[0] == "mm"
    assert float(hdr["scl_slope"]) == 1.0 and float(hdr["scl_inter"]) == 0.0
    assert bytes(hdr["descrip"]).startswith(b"SYNTHETIC")
    return img


def test_ct_volume_ras_affine(tmp_path, meta, smooth):
    volume = smooth(4, 12, 10)
    spacing = (3.0, 0.6, 0.9)
    line = meta(2, file_name="vol.nii.gz", intensity=CT_WINDOW)
    exporter = NiftiExporter(tmp_path, "CT", software_version=SOFTWARE_VERSION)
    image_path, sidecar_path = exporter.add_volume(volume, line, spacing, origin=(10.0, -20.0, 30.0))
    assert image_path.name == "vol.nii.gz" and sidecar_path.name == "vol.json"
    geom = Geometry(volume.shape, spacing, AXIAL, (10.0, -20.0, 30.0))
    img = _check_header(image_path, np.diag([-1, -1, 1, 1]) @ geom.lps_affine())
    # RAS handedness: an axial LPS grid (+x = left) must map column index to -R (toward the right is negative)
    assert img.affine[0, 0] < 0 and img.affine[1, 1] < 0 and img.affine[2, 2] > 0
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_allclose(img.affine[:3, 3], [-10.0, 20.0, 30.0])
    data = np.asarray(img.dataobj)
    assert data.shape == (10, 12, 4) and data.dtype == np.int16
    np.testing.assert_allclose((data.transpose(2, 1, 0) + 160) / 400, volume, atol=0.5 / 400 + 1e-6)
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["SyntheticData"] is True
    assert sidecar["Seed"] == line["seed"] and sidecar["Model"] == line["model"] and sidecar["Prompt"] == line["text"]
    assert sidecar["Units"] == "HU" and sidecar["Privacy"]["privacy_verdict"] == "keep"
    assert float(img.header["cal_min"]) == -160 and float(img.header["cal_max"]) == 240
    desc = json.loads((tmp_path / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Name"] == "RadSynth" and desc["GeneratedBy"][0]["Version"] == SOFTWARE_VERSION
    assert desc["SyntheticData"] is True


def test_2d_radiograph_is_one_slice_coronal(tmp_path, meta, smooth):
    image = smooth(16, 20)
    (path, _) = NiftiExporter(tmp_path, "DX", software_version=SOFTWARE_VERSION, pixel_spacing=0.5).add(image, meta(1))
    img = nib.load(path)
    assert img.shape == (20, 16, 1)
    # columns toward patient left (-R), rows toward the feet (-S)
    assert nib.aff2axcodes(img.affine)[:2] == ("L", "I")
    data = np.asarray(img.dataobj)[:, :, 0].T
    top = 2**12 - 1
    np.testing.assert_allclose(data / top, image, atol=0.5 / top + 1e-6)
    _check_header(path, img.affine)


def test_uncompressed_and_overwrite(tmp_path, meta, smooth):
    exporter = NiftiExporter(tmp_path, "MR", compress=False)
    image_path, _ = exporter.add(smooth(8, 8), meta(0))
    assert image_path.suffix == ".nii"
    with pytest.raises(FileExistsError):
        NiftiExporter(tmp_path, "MR", compress=False).add(smooth(8, 8), meta(0))
    NiftiExporter(tmp_path, "MR", compress=False, overwrite=True).add(smooth(8, 8), meta(0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sidecar_drops_unlisted_fields(tmp_path, meta, smooth):
    line = meta(0, patient_id="MRN-7654321", neighbours=["train/DOE_JANE.png"])
    _, sidecar = NiftiExporter(tmp_path, "DX").add(smooth(8, 8), line)
    text = sidecar.read_text()
    assert "MRN-7654321" not in text and "DOE_JANE" not in text


def test_bad_arguments(tmp_path, meta, smooth):
    with pytest.raises(ValueError, match="modality"):
        NiftiExporter(tmp_path, "PET")
    exporter = NiftiExporter(tmp_path, "CT")
    with pytest.raises(ValueError, match="spacing"):
        exporter.add_volume(smooth(2, 4, 4), meta(0), (1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="orientation"):
        exporter.add_volume(smooth(2, 4, 4), meta(0), (1, 1, 1), orientation=(1, 0, 0, 1, 0, 0))
