"""Volume ingest: NIfTI and DICOM series into the standard layout, geometry and HU kept."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from generator.volumes.geometry import crop_or_pad, parse_spacing, resample
from generator.volumes.ingest import load_volumes
from generator.volumes.readers import SeriesError, read_dicom_series, read_nifti
from generator.volumes.records import LPS_TO_RAS, Volume, ct_mapping
from tests.volumes.dicom_helpers import lps_affine, write_series

SPACING = (2.5, 0.8, 0.7)


def _hu(shape=(5, 6, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.float32)


def _check_world(vol: Volume, values: np.ndarray, ras_affine: np.ndarray) -> None:
    """Every source voxel appears in ``vol`` at the same RAS position with the same value."""
    inv = np.linalg.inv(vol.affine)
    for idx in np.ndindex(values.shape):
        world = ras_affine @ np.array([*idx, 1.0])
        d, h, w = np.round((inv @ world)[:3]).astype(int)
        assert np.allclose(inv @ world, [d, h, w, 1], atol=1e-4)
        assert vol.array[d, h, w] == pytest.approx(values[idx])


def test_axial_series_reads_into_standard_layout(tmp_path):
    hu = _hu()
    write_series(tmp_path / "s", hu, spacing=SPACING, origin=(-10, -12, 30))
    vol = read_dicom_series(tmp_path / "s", file_name="s")
    # axial LPS slices are already (S, P, L): the array is the stored one, HU after rescale
    np.testing.assert_array_equal(vol.array, hu)
    assert vol.spacing == pytest.approx(SPACING)
    expected = LPS_TO_RAS @ lps_affine(SPACING, (1, 0, 0, 0, 1, 0), (-10, -12, 30))
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    assert vol.lps_origin() == pytest.approx((-10, -12, 30))
    assert vol.lps_orientation() == pytest.approx((1, 0, 0, 0, 1, 0))
    assert vol.patient_id == "SYN001" and vol.intensity.unit == "HU"


def test_shuffled_series_sorted_by_position(tmp_path):
    hu = _hu(seed=1)
    names = [f"x{n:02d}.dcm" for n in np.random.default_rng(3).permutation(hu.shape[0])]
    write_series(tmp_path / "shuf", hu, names=names)
    write_series(tmp_path / "plain", hu)
    a = read_dicom_series(tmp_path / "shuf")
    b = read_dicom_series(tmp_path / "plain")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)


def test_descending_positions_are_reversed(tmp_path):
    hu = _hu(seed=2)
    normal = np.array([0, 0, 1.0])
    positions = [np.array([0, 0, 50.0]) - k * 2.5 * normal for k in range(hu.shape[0])]
    write_series(tmp_path / "s", hu, positions=positions)
    vol = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, hu[::-1])
    assert vol.spacing[0] == pytest.approx(2.5)


def test_oblique_series_keeps_world_positions(tmp_path):
    hu = _hu((4, 5, 6), seed=4)
    a = np.deg2rad(20)
    iop = (1, 0, 0, 0, np.cos(a), np.sin(a))
    write_series(tmp_path / "obl", hu, spacing=(3.0, 0.9, 0.6), iop=iop, origin=(5, -7, 12))
    vol = read_dicom_series(tmp_path / "obl")
    assert vol.spacing == pytest.approx((3.0, 0.9, 0.6))
    _check_world(vol, hu, LPS_TO_RAS @ lps_affine((3.0, 0.9, 0.6), iop, (5, -7, 12)))
    assert vol.lps_orientation() == pytest.approx(iop, abs=1e-6)


def test_sagittal_series_is_reoriented(tmp_path):
    hu = _hu((4, 6, 5), seed=5)
    iop = (0, 1, 0, 0, 0, -1)  # sagittal: columns posterior, rows toward the feet; normal = -x... (L->R)
    write_series(tmp_path / "sag", hu, spacing=(2.0, 1.0, 1.5), iop=iop, origin=(0, 0, 0))
    vol = read_dicom_series(tmp_path / "sag")
    assert vol.shape == (6, 5, 4)  # rows (S-I) become slices, columns (A-P) rows, slices (R-L) columns
    assert vol.spacing == pytest.approx((1.0, 1.5, 2.0))
    _check_world(vol, hu, LPS_TO_RAS @ lps_affine((2.0, 1.0, 1.5), iop, (0, 0, 0)))


@pytest.mark.parametrize("case, reason", [
    ("missing", "missing slice"),
    ("uneven", "uneven slice spacing"),
    ("orientation", "inconsistent orientation"),
    ("two_series", "2 series"),
    ("tilt", "do not lie on the slice normal"),
])
def test_bad_series_are_refused(tmp_path, case, reason):
    hu = _hu((6, 4, 4), seed=6)
    z = [k * 2.5 for k in range(6)]
    folder = tmp_path / case
    if case == "missing":
        write_series(folder, hu, positions=[(0, 0, v) for v in z])
        (folder / "slice003.dcm").unlink()
    elif case == "uneven":
        write_series(folder, hu, positions=[(0, 0, v) for v in [0, 2.5, 5, 7.5, 10.6, 13.1]])
    elif case == "orientation":
        iops = [(1, 0, 0, 0, 1, 0)] * 6
        iops[2] = (1, 0, 0, 0, 0.9950042, 0.0998334)
        write_series(folder, hu, iops=iops)
    elif case == "two_series":
        write_series(folder, hu[:3], series_uid="1.2.3.4")
        write_series(folder, hu[3:], series_uid="1.2.3.5", names=[f"b{k}.dcm" for k in range(3)])
    else:
        write_series(folder, hu, positions=[(0, 0.5 * k, v) for k, v in enumerate(z)])
    with pytest.raises(SeriesError, match=reason):
        read_dicom_series(folder)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data.astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def test_nifti_in_lps_like_orientation_keeps_world_and_hu(tmp_path):
    data = _hu((6, 5, 4), seed=7)
    affine = np.array([[-0.8, 0, 0, 40], [0, -0.9, 0, 30], [0, 0, 2.0, -20], [0, 0, 0, 1]])
    _write_nifti(tmp_path / "v.nii.gz", data, affine)
    vol = read_nifti(tmp_path / "v.nii.gz", file_name="v.nii.gz", text="t")
    assert vol.shape == (4, 5, 6) and vol.spacing == pytest.approx((2.0, 0.9, 0.8))
    _check_world(vol, data, affine)
    # the standard layout: d -> +S, h -> -A, w -> -R
    assert vol.affine[2, 0] > 0 and vol.affine[1, 1] < 0 and vol.affine[0, 2] < 0


def test_resample_preserves_world_positions_of_a_linear_field(tmp_path):
    shape, spacing = (8, 10, 12), (2.0, 1.0, 1.5)
    aff = np.diag([1.0, -1.0, -1.0, 1.0])[[2, 1, 0, 3]]  # d->S, h->-A, w->-R as rows permuted below
    aff = np.array([[0, 0, -spacing[2], 5], [0, -spacing[1], 0, 6], [spacing[0], 0, 0, 7], [0, 0, 0, 1]], float)
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = coords @ aff[:3, :3].T + aff[:3, 3]
    field = (world @ np.array([0.3, -0.2, 0.5]) + 1.0).reshape(shape).astype(np.float32)
    vol = Volume(field, aff, spacing, ct_mapping())
    out = resample(vol, (1.0, 2.0, 3.0))
    assert out.spacing == pytest.approx((1.0, 2.0, 3.0)) and out.shape == (16, 5, 6)
    inner = out.array[1:-1, 1:-1, 1:-1]
    c = np.stack(np.meshgrid(*[np.arange(1, n - 1) for n in out.shape], indexing="ij"), -1).reshape(-1, 3)
    w = c @ out.affine[:3, :3].T + out.affine[:3, 3]
    expected = (w @ np.array([0.3, -0.2, 0.5]) + 1.0).reshape(inner.shape)
    np.testing.assert_allclose(inner, expected, atol=1e-4)
    # the field of view (outer faces) is unchanged: centre of the grid stays put
    centre = lambda v: v.affine @ np.array([*(np.array(v.shape) - 1) / 2, 1.0])  # noqa: E731
    np.testing.assert_allclose(centre(out), centre(vol), atol=1e-6)


def test_crop_or_pad_moves_the_affine(tmp_path):
    vol = Volume(_hu((4, 6, 8), seed=8), np.diag([2.0, 1.0, 1.0, 1.0]), (2.0, 1.0, 1.0), ct_mapping())
    out = crop_or_pad(vol, (6, 4, 8))
    assert out.shape == (6, 4, 8)
    assert (out.array[0] == -1024).all() and (out.array[-1] == -1024).all()
    _check_world(out, vol.array[:, 1:5, :], vol.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]]))


def test_volume_rejects_inconsistent_spacing():
    with pytest.raises(ValueError, match="spacing"):
        Volume(np.zeros((2, 2, 2)), np.eye(4), (2.0, 1.0, 1.0), ct_mapping())
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        Volume(np.zeros((2, 2)), np.eye(4), (1.0, 1.0, 1.0), ct_mapping())
    with pytest.raises(ValueError, match="spacing"):
        parse_spacing("1,2")


def test_load_volumes_imagefolder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    hu = _hu((6, 8, 8), seed=9)
    write_series(root / "series_a", hu, spacing=(2.0, 1.0, 1.0))
    write_series(root / "series_bad", hu, positions=[(0, 0, z) for z in [0, 2, 4, 8, 10, 12]])
    _write_nifti(root / "b.nii.gz", hu.transpose(2, 1, 0), np.diag([-1.0, -1.0, 2.0, 1.0]))
    (root / "notes.txt").write_text("hi")
    rows = [
        {"file_name": "series_a", "text": "chest CT, nodule", "patient_id": "P1", "sex": "F"},
        {"file_name": "b.nii.gz", "text": "chest CT, no acute findings", "patient_id": "P2"},
        {"file_name": "series_bad", "text": "x"},
        {"file_name": "missing.nii.gz", "text": "x"},
        {"file_name": "notes.txt", "text": "x"},
        {"file_name": "../escape.nii.gz", "text": "x"},
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = load_volumes(root, spacing=2.0, shape=(8, 8, 8))
    assert [r.file_name for r in res.records] == ["b.nii.gz", "series_a"]
    assert all(r.shape == (8, 8, 8) and r.spacing == (2.0, 2.0, 2.0) for r in res.records)
    reasons = {s.path: s.reason for s in res.skipped}
    assert "missing slice" in reasons["series_bad"]
    assert "no such file" in reasons["missing.nii.gz"]
    assert "not a NIfTI" in reasons["notes.txt"]
    assert "outside" in reasons["../escape.nii.gz"]
    a = res.records[1]
    assert a.text == "chest CT, nodule" and a.patient_id == "P1" and a.attributes["sex"] == "F"
    assert res.intensity["kind"] == "ct_window" and res.stack().shape == (2, 8, 8, 8)
    x = res.stack()
    assert x.min() >= 0 and x.max() <= 1
    assert len(res.fingerprint()) == 64 and "skipped 4" in res.summary


def test_load_volumes_mr_percentiles(tmp_path):
    root = tmp_path / "mr"
    root.mkdir()
    data = np.random.default_rng(0).uniform(0, 500, (6, 6, 6))
    _write_nifti(root / "m.nii.gz", data, np.eye(4))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "m.nii.gz", "text": "MRI", "modality": "MR"}) + "\n")
    res = load_volumes(root)
    m = res.records[0].intensity
    assert m.modality == "MR" and m.kind.startswith("mr_percentile")
    vals = data.astype(np.int16)
    assert m.low == pytest.approx(np.percentile(vals[vals != 0], 0.5))
    assert res.intensity == {"kind": "mr_percentile", "percentiles": [0.5, 99.5], "unit": "", "modality": "MR"}


def test_exported_dicom_series_reads_back_exactly(tmp_path):
    """A phantom written by exporters.DicomExporter.add_volume reads back with the same HU and affine."""
    from exporters.dicom import DicomExporter
    from generator.volumes.phantom import render_ct_phantom

    vol = render_ct_phantom({"sex": "M", "age": 60}, shape=(8, 12, 10), seed=0)
    wide = (-2048.0, 3071.0)
    vol = Volume(np.round(vol.array), vol.affine, vol.spacing, ct_mapping(wide))
    ex = DicomExporter(tmp_path / "dcm", modality="CT", intensity=vol.intensity.to_dict())
    files = ex.add_volume(vol.to_model(), {"file_name": "v_0000.nii.gz", "text": vol.text, "seed": 0},
                          vol.spacing, orientation=vol.lps_orientation(), origin=vol.lps_origin())
    back = read_dicom_series(Path(files[0]).parent, ct_window=wide)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-6)
    np.testing.assert_array_equal(back.array, vol.array)
