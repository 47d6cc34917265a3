"""export_imagefolder on a folder of NIfTI volumes: one DICOM series per volume, geometry from the affine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from exporters.folder import export_imagefolder

# RAS affines of an (i, j, k) = (16, 16, 8) grid: axial with a slight tilt, and one whose k axis
# runs against i x j in DICOM terms (the exporter then reverses the slices).
_C, _S = np.cos(0.12), np.sin(0.12)
AFFINES = {
    "tilted": np.array([[-0.8, 0, 0, 30.0], [0, -0.7 * _C, 2.5 * _S, 12.0], [0, 0.7 * _S, 2.5 * _C, -40.0], [0, 0, 0, 1]]),
    "flipped": np.array([[-0.9, 0, 0, 5.0], [0, 0.9, 0, -20.0], [0, 0, 3.0, 7.0], [0, 0, 0, 1]]),
}


def _corners(shape, affine) -> np.ndarray:
    ni, nj, nk = shape[:3]
    idx = np.array([[i, j, k, 1.0] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)])
    pts = (affine @ idx.T).T[:, :3]
    return pts[np.lexsort(np.round(pts, 3).T[::-1])]


def _volume_folder(root: Path, name: str, modality: str) -> tuple[Path, np.ndarray, np.ndarray]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    if modality == "CT":
        data = rng.integers(-1000, 1500, (16, 16, 8)).astype(np.int16)
    else:
        data = rng.random((16, 16, 8)).astype(np.float32) * 700.0  # non-integer MR values
    affine = AFFINES[name]
    nib.save(nib.Nifti1Image(data, affine), root / "vol.nii.gz")
    line = {"file_name": "vol.nii.gz", "text": f"{modality} abdomen, synthetic volume", "seed": 11, "model": "ab12"}
    (root / "metadata.jsonl").write_text(json.dumps(line) + "\n")
    return root, data, affine


def _series(out: Path) -> tuple[list[Path], dict]:
    entry = json.loads((out / "export_manifest.jsonl").read_text())
    return [out / f for f in entry["dicom_files"]], entry


@pytest.mark.parametrize("name", list(AFFINES))
def test_volume_becomes_one_series_with_nifti_geometry(tmp_path, name):
    src, data, affine = _volume_folder(tmp_path / "in", name, "CT")
    out = tmp_path / "out"
    summary = export_imagefolder(src, out, ["dicom", "nifti"], modality="CT")
    assert summary.images == 1 and summary.files == {"dicom": 8, "nifti": 2}
    paths, entry = _series(out)
    datasets = [pydicom.dcmread(p) for p in paths]
    assert len({d.SeriesInstanceUID for d in datasets}) == 1 and len({d.FrameOfReferenceUID for d in datasets}) == 1
    assert [int(d.InstanceNumber) for d in datasets] == list(range(1, 9))
    # every slice position is a voxel centre of the NIfTI grid, in LPS, evenly spaced along the normal
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    expected = [(lps @ [0, 0, k, 1])[:3] for k in range(8)]
    if name == "flipped":
        expected = expected[::-1]
    np.testing.assert_allclose(ipp, expected, atol=1e-3)
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    assert np.all(np.diff(ipp @ normal) > 0)
    # HU survive exactly
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    order = slice(None, None, -1) if name == "flipped" else slice(None)
    np.testing.assert_array_equal(hu, data.transpose(2, 1, 0)[order])
    # the re-written NIfTI lands on the same world corners, with the synthetic header policy
    own = nib.load(out / entry["nifti_file"])
    np.testing.assert_allclose(_corners(own.shape, own.affine), _corners(data.shape, affine), atol=1e-3)
    assert bytes(own.header["descrip"]).startswith(b"SYNTHETIC")
    assert json.loads((out / entry["nifti_sidecar"]).read_text())["SyntheticData"] is True


def test_volume_series_passes_validators(tmp_path, dciodvfy, dcentvfy):
    src, _, _ = _volume_folder(tmp_path / "in", "tilted", "MR")
    export_imagefolder(src, tmp_path / "out", ["dicom"], modality="MR")
    paths, _ = _series(tmp_path / "out")
    assert dcentvfy(paths) == []
    assert all(dciodvfy(p) == [] for p in paths)


@pytest.mark.parametrize("name", list(AFFINES))
def test_volume_round_trips_through_dcm2niix(tmp_path, dcm2niix, name):
    src, data, affine = _volume_folder(tmp_path / "in", name, "MR")
    export_imagefolder(src, tmp_path / "out", ["dicom"], modality="MR")
    paths, _ = _series(tmp_path / "out")
    conv = tmp_path / "conv"
    conv.mkdir()
    proc = subprocess.run([dcm2niix, "-z", "y", "-f", "v", "-o", str(conv), str(paths[0].parent)],
                          capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    for bad in ("Bogus spatial matrix", "uneven", "Error"):
        assert bad.lower() not in log.lower(), log
    (converted,) = conv.glob("v*.nii.gz")
    theirs = nib.load(converted)
    np.testing.assert_allclose(_corners(theirs.shape, theirs.affine), _corners(data.shape, affine), atol=1e-3)


def test_volume_needs_ct_or_mr(tmp_path):
    src, _, _ = _volume_folder(tmp_path / "in", "tilted", "CT")
    with pytest.raises(ValueError, match="row 1.*CT or MR"):
        export_imagefolder(src, tmp_path / "out", ["dicom"], modality="DX")
    assert not (tmp_path / "out").exists()
