"""Tests for generator.data: every input format, skips, errors (fixtures written here, <= 64 px)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from generator.data import IngestResult, IntensityMapping, load_dataset

CR_MONO1 = "dicomdirtests/77654033/CR1/6154"  # pydicom test file: CR, MONOCHROME1, 16x16


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _by_name(result: IngestResult) -> dict:
    return {r.file_name: r for r in result.records}


def _testfile(name: str) -> Path:
    p = get_testdata_file(name)
    if p is None:
        pytest.skip(f"pydicom test file {name} not available")
    return Path(p)


# ------------------------------------------------------------------------------------ PNG / JPEG
@pytest.fixture
def png_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    img8 = rng.integers(0, 256, (12, 16), dtype=np.uint8)
    Image.fromarray(img8).save(root / "a8.png")
    img16 = np.full((8, 8), 1000, dtype=np.uint16)
    img16[:, 4:] = 1001
    img16[0, 0] = 65535
    Image.fromarray(img16).save(root / "sub" / "b16.png")
    grad = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    Image.fromarray(grad).save(root / "c.jpg", quality=95)
    Image.fromarray(img8).save(root / "unlisted.png")
    (root / "corrupt.png").write_bytes(rng.bytes(300))
    (root / "corrupt.dcm").write_bytes(rng.bytes(300))
    np.save(root / "img8.npy", img8)  # not an image: neither listed nor counted
    _write_jsonl(root / "metadata.jsonl", [
        {"file_name": "a8.png", "text": "eight bit", "patient_id": "p1", "age": 47, "sex": "F",
         "findings": ["effusion"], "seed": 7, "model": "abc", "privacy_verdict": "keep"},
        {"file_name": "sub/b16.png", "text": "sixteen bit", "patient_id": "p2"},
        {"file_name": "c.jpg", "text": "a jpeg", "modality": "CR"},
        {"file_name": "corrupt.png", "text": "broken png"},
        {"file_name": "corrupt.dcm", "text": "broken dicom"},
        {"file_name": "gone.png", "text": "missing"},
    ])
    return root


def test_png_jpeg_jsonl(png_folder: Path, capsys: pytest.CaptureFixture) -> None:
    res = load_dataset(png_folder, progress=True)
    assert res.source == "imagefolder"
    recs = _by_name(res)
    assert [r.file_name for r in res.records] == ["a8.png", "c.jpg", "sub/b16.png"]

    a = recs["a8.png"]
    expected = np.asarray(Image.open(png_folder / "a8.png"), dtype=np.float32) / 255
    assert a.image.dtype == np.float32 and a.image.shape == (12, 16)
    np.testing.assert_allclose(a.image, expected, atol=1e-7)
    assert a.intensity == IntensityMapping("png8", 0.0, 255.0, "", 8, "OT")
    assert a.attributes == {"patient_id": "p1", "age": 47, "sex": "F", "findings": ["effusion"]}
    assert a.extra == {"seed": 7, "model": "abc", "privacy_verdict": "keep"}
    assert a.patient_id == "p1" and a.text == "eight bit"

    b = recs["sub/b16.png"]
    assert b.intensity.kind == "png16" and b.intensity.high == 65535.0 and b.intensity.bits_stored == 16
    stored = np.rint(b.intensity.to_physical(b.image)).astype(int)
    assert stored[1, 1] == 1000 and stored[1, 6] == 1001 and stored[0, 0] == 65535
    assert b.image[1, 6] > b.image[1, 1]  # 16-bit precision survives

    c = recs["c.jpg"]
    assert c.intensity.kind == "jpeg" and c.intensity.modality == "CR"
    assert np.abs(c.image[16] - np.linspace(0, 1, 32)).max() < 0.03

    # corrupt files and the missing one are skipped with path and reason; the rest is read
    reasons = {s.path: s.reason for s in res.skipped}
    assert set(reasons) == {"corrupt.png", "corrupt.dcm", "gone.png"}
    assert "PNG" in reasons["corrupt.png"] and "missing file" in reasons["gone.png"]
    assert "DICOM" in reasons["corrupt.dcm"]
    assert res.ignored == 1  # unlisted.png
    assert "read 3 images" in res.summary and "skipped 3" in res.summary
    assert "ignored 1 image file" in res.summary
    assert res.summary in capsys.readouterr().err


def test_metadata_csv_conversions(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "y.png")
    _write_csv(tmp_path / "metadata.csv", [
        {"file_name": "x.png", "text": "normal", "age": "47", "label": "1",
         "findings": '["nodule", "effusion"]', "view": "PA", "site": "007"},
        {"file_name": "y.png", "text": "other", "age": "", "label": "pneumonia",
         "findings": "none", "view": "", "site": ""},
    ])
    res = load_dataset(tmp_path, progress=False)
    x, y = res.records
    assert x.attributes == {"age": 47, "label": 1, "findings": ["nodule", "effusion"], "view": "PA"}
    assert x.extra == {"site": "007"}  # other columns verbatim
    assert y.attributes == {"label": "pneumonia", "findings": "none"}
    assert float(y.image.min()) == 1.0


def test_resolution_stack_fingerprint_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    names = [f"img{i}.png" for i in (10, 2, 1)]
    for i, n in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (10 + i, 16), dtype=np.uint8)).save(tmp_path / n)
    _write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": n, "text": n} for n in names])

    raw = load_dataset(tmp_path, progress=False)
    assert [r.file_name for r in raw.records] == ["img1.png", "img2.png", "img10.png"]
    with pytest.raises(ValueError, match="resolution"):
        raw.stack()

    res = load_dataset(tmp_path, resolution=5, progress=False)
    stack = res.stack()
    assert stack.shape == (3, 5, 5) and stack.dtype == np.float32
    assert 0.0 <= stack.min() and stack.max() <= 1.0
    # area averaging of the centre square: the mean is (almost) preserved
    first = raw.records[0].image
    side = min(first.shape)
    top, left = (first.shape[0] - side) // 2, (first.shape[1] - side) // 2
    square = first[top:top + side, left:left + side]
    assert abs(float(stack[0].mean()) - float(square.mean())) < 0.02

    again = load_dataset(tmp_path, resolution=5, progress=False)
    assert res.fingerprint() == again.fingerprint() and len(res.fingerprint()) == 64
    _write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": n, "text": n + "!"} for n in names])
    assert load_dataset(tmp_path, resolution=5, progress=False).fingerprint() != res.fingerprint()


# -------------------------------------------------------------------------------------------- DICOM
@pytest.fixture
def dicom_imagefolder(tmp_path: Path) -> Path:
    root = tmp_path / "dcm"
    root.mkdir()
    shutil.copy(_testfile("CT_small.dcm"), root / "ct.dcm")
    shutil.copy(_testfile("MR_small.dcm"), root / "mr.dcm")
    shutil.copy(_testfile(CR_MONO1), root / "cr.dcm")
    shutil.copy(_testfile("rtdose.dcm"), root / "dose.dcm")
    shutil.copy(_testfile("JPEG-lossy.dcm"), root / "lossy.dcm")
    _write_jsonl(root / "metadata.jsonl", [
        {"file_name": n, "text": f"{n} text"} for n in ("ct.dcm", "mr.dcm", "cr.dcm", "lossy.dcm")
    ] + [{"file_name": "dose.dcm#frame=3", "text": "one frame"}])
    return root


def test_dicom_luts_windows_and_inversion(dicom_imagefolder: Path) -> None:
    res = load_dataset(dicom_imagefolder, ct_window=(40.0, 400.0), progress=False)
    recs = _by_name(res)

    # CT: rescale to HU, no window in the header -> the stated 40/400 HU window
    ct = recs["ct.dcm"]
    ds = pydicom.dcmread(dicom_imagefolder / "ct.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert ct.intensity == IntensityMapping("ct_window", -160.0, 240.0, "HU", 16, "CT")
    np.testing.assert_allclose(ct.image, np.clip((hu + 160) / 400, 0, 1), atol=1e-6)
    inside = (hu > -160) & (hu < 240)
    np.testing.assert_allclose(ct.intensity.to_physical(ct.image)[inside], hu[inside], atol=1e-3)

    # MR: the header's VOI window (600/1600) in stored units
    mr = recs["mr.dcm"]
    raw = pydicom.dcmread(dicom_imagefolder / "mr.dcm").pixel_array.astype(float)
    assert mr.intensity.kind == "dicom_voi" and mr.intensity.modality == "MR"
    assert (mr.intensity.low, mr.intensity.high) == (-200.0, 1400.0)
    np.testing.assert_allclose(mr.image, np.clip((raw + 200) / 1600, 0, 1), atol=1e-6)

    # CR MONOCHROME1: rescale 0.684/200, window 1600/2800, then inverted (high values dark)
    cr = recs["cr.dcm"]
    d = pydicom.dcmread(dicom_imagefolder / "cr.dcm")
    assert d.PhotometricInterpretation == "MONOCHROME1"
    v = d.pixel_array * 0.684 + 200.0
    np.testing.assert_allclose(cr.image, 1 - np.clip((v - 200) / 2800, 0, 1), atol=1e-6)
    assert cr.intensity == IntensityMapping("dicom_voi_inverted", 200.0, 3000.0, "OD", 12, "CR")  # RescaleType OD
    hi, lo = np.unravel_index(np.argmax(v), v.shape), np.unravel_index(np.argmin(v), v.shape)
    assert cr.image[hi] < cr.image[lo]  # inverted: high stored values are dark
    source = cr.intensity.low + cr.intensity.high - cr.intensity.to_physical(cr.image)
    np.testing.assert_allclose(source, v, atol=1e-3)

    # multi-frame: a '#frame=N' file_name selects one frame (1-based like DICOM)
    assert "dose.dcm#frame=3" in recs and recs["dose.dcm#frame=3"].image.shape == (10, 10)
    frames = pydicom.dcmread(dicom_imagefolder / "dose.dcm").pixel_array.astype(float)
    f3 = frames[2]
    np.testing.assert_allclose(recs["dose.dcm#frame=3"].image,
                               (f3 - f3.min()) / (f3.max() - f3.min()), atol=1e-6)

    # JPEG Extended 12-bit: skipped with the transfer syntax named, unless a decoder is installed
    if "lossy.dcm" not in recs:
        (reason,) = [s.reason for s in res.skipped if s.path == "lossy.dcm"]
        assert "JPEG Extended" in reason and "decode" in reason
    assert res.intensity in {r.intensity for r in res.records}


def test_dicom_multiframe_all_frames(tmp_path: Path) -> None:
    shutil.copy(_testfile("rtdose.dcm"), tmp_path / "dose.dcm")
    _write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "dose.dcm", "text": "dose"}])
    res = load_dataset(tmp_path, progress=False)
    assert [r.file_name for r in res.records] == [f"dose.dcm#frame={i}" for i in range(1, 16)]


def test_dicom_folder_with_reports_csv(tmp_path: Path) -> None:
    root = tmp_path / "study"
    (root / "cr").mkdir(parents=True)
    shutil.copy(_testfile("CT_small.dcm"), root / "ct.dcm")
    shutil.copy(_testfile("MR_small.dcm"), root / "mr.dcm")
    shutil.copy(_testfile(CR_MONO1), root / "cr" / "6154")  # no extension: found by DICM marker
    (root / "junk.dcm").write_bytes(np.random.default_rng(3).bytes(200))
    ct_uid = pydicom.dcmread(root / "ct.dcm").StudyInstanceUID
    cr_uid = pydicom.dcmread(root / "cr" / "6154").StudyInstanceUID
    reports = tmp_path / "reports.csv"
    _write_csv(reports, [
        {"StudyInstanceUID": ct_uid, "text": "CT head, no acute findings.", "label": "0"},
        {"StudyInstanceUID": cr_uid, "text": "Cervical spine lateral view, normal.", "label": "0"},
    ])

    res = load_dataset(root, reports_csv=reports, progress=False)
    assert res.source == "dicom_folder"
    recs = _by_name(res)
    assert set(recs) == {"ct.dcm", "cr/6154"}
    assert recs["ct.dcm"].text == "CT head, no acute findings."
    assert recs["ct.dcm"].attributes["patient_id"] == "1CT1"
    assert recs["ct.dcm"].attributes["label"] == 0
    assert recs["cr/6154"].attributes["patient_id"] == "77654033"
    reasons = {s.path: s.reason for s in res.skipped}
    assert set(reasons) == {"mr.dcm", "junk.dcm"}
    assert "no report" in reasons["mr.dcm"] and "StudyInstanceUID" in reasons["mr.dcm"]

    # without reports: a caption and attributes from the header
    res = load_dataset(root, progress=False)
    cr = _by_name(res)["cr/6154"]
    assert cr.attributes["modality"] == "CR" and cr.attributes["age"] == 47
    assert "CR" in cr.text and "47 years" in cr.text
    assert {"ct.dcm", "mr.dcm", "cr/6154"} <= set(_by_name(res))

    bad = tmp_path / "bad_reports.csv"
    _write_csv(bad, [{"PatientID": "x", "text": "t"}])
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        load_dataset(root, reports_csv=bad, progress=False)


# -------------------------------------------------------------------------------------------- NIfTI
def test_nifti_2d_and_volume_orientation(tmp_path: Path) -> None:
    nx, ny, nz = 8, 6, 12
    vol = np.zeros((nx, ny, nz), np.float32)
    vol[nx - 1, ny - 1, :] = 100.0  # patient right-anterior column (RAS+ indices increase to R, A)
    vol[0, 0, nz - 1] = 50.0  # left-posterior voxel in the top (superior) slice
    ras = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol, ras), tmp_path / "vol.nii.gz")
    # the same volume stored in LPS voxel order: must give the same images
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    lps[:3, 3] = [nx - 1, ny - 1, 0]
    nib.save(nib.Nifti1Image(vol[::-1, ::-1, :].copy(), lps), tmp_path / "vol_lps.nii")
    img2d = np.arange(20, dtype=np.int16).reshape(5, 4)
    nib.save(nib.Nifti1Image(img2d, np.eye(4)), tmp_path / "flat.nii.gz")
    _write_jsonl(tmp_path / "metadata.jsonl", [
        {"file_name": "vol.nii.gz", "text": "volume"},
        {"file_name": "vol_lps.nii", "text": "volume lps"},
        {"file_name": "flat.nii.gz", "text": "flat"},
    ])
    res = load_dataset(tmp_path, nifti_axis=2, progress=False)
    recs = _by_name(res)
    names = [r.file_name for r in res.records if r.file_name.startswith("vol.nii.gz")]
    assert names == [f"vol.nii.gz#z={k}" for k in range(nz)]  # natural order: z=2 before z=10

    ax = recs["vol.nii.gz#z=3"].image
    assert ax.shape == (ny, nx)  # rows anterior->posterior, columns patient right->left
    assert ax[0, 0] == 1.0  # right-anterior shows top-left (radiological convention)
    assert recs["vol.nii.gz#z=3"].intensity == IntensityMapping("nifti", 0.0, 100.0, "", 16, "OT")
    assert recs["vol.nii.gz#z=11"].image[-1, -1] == 0.5  # left-posterior: bottom-right
    for k in range(nz):
        np.testing.assert_array_equal(recs[f"vol.nii.gz#z={k}"].image, recs[f"vol_lps.nii#z={k}"].image)

    flat = recs["flat.nii.gz"]
    assert flat.image.shape == (4, 5)
    np.testing.assert_allclose(flat.image, img2d[::-1, ::-1].T / 19.0, atol=1e-6)

    # coronal slicing: axis 1, top of the image is superior
    cor = load_dataset(tmp_path, nifti_axis=1, progress=False)
    c = _by_name(cor)["vol.nii.gz#y=0"].image
    assert c.shape == (nz, nx) and c[0, -1] == 0.5


# ---------------------------------------------------------------------------------------------- npz
def test_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    p = tmp_path / "pneumoniamnist_trainval.npz"
    np.savez(p, train_images=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1], [0], [1], [1]], np.uint8),
             val_images=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
             val_labels=np.array([[0], [2]], np.uint8))
    res = load_dataset(p, label_text={0: "normal chest", 1: "pneumonia"}, progress=False)
    assert res.source == "npz" and len(res.records) == 5
    r = _by_name(res)["pneumoniamnist_trainval.npz#train/1"]
    assert r.text == "pneumonia" and r.attributes == {"label": 1}
    assert res.intensity.kind == "npz_uint8"
    assert res.stack().shape == (5, 28, 28)
    assert load_dataset(p, label_text={"0": "a", "1": "b"}, progress=False).records[0].text == "a"

    with pytest.raises(ValueError, match="label_text"):
        load_dataset(p, progress=False)
    with pytest.raises(ValueError, match=r"\[2\]"):
        load_dataset(p, label_text={0: "a", 1: "b"}, npz_split="val", progress=False)
    with pytest.raises(ValueError, match="splits"):
        load_dataset(p, label_text={0: "a"}, npz_split="test", progress=False)


# ------------------------------------------------------------------------------------------- errors
def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset(tmp_path / "nope", progress=False)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty dataset"):
        load_dataset(empty, progress=False)

    no_text = tmp_path / "no_text"
    no_text.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(no_text / "a.png")
    _write_csv(no_text / "metadata.csv", [{"file_name": "a.png", "caption": "x"}])
    with pytest.raises(ValueError, match=r"metadata\.csv.*text.*caption"):
        load_dataset(no_text, progress=False)

    no_meta = tmp_path / "no_meta"
    no_meta.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(no_meta / "a.png")
    with pytest.raises(ValueError, match="no metadata"):
        load_dataset(no_meta, progress=False)

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"not a png at all")
    _write_jsonl(only_bad / "metadata.jsonl", [{"file_name": "x.png", "text": "t"},
                                               {"file_name": "y.png", "text": "t"}])
    with pytest.raises(ValueError, match=r"no usable image.*skipped 2"):
        load_dataset(only_bad, progress=False)

    rows_empty = tmp_path / "rows_empty"
    rows_empty.mkdir()
    (rows_empty / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError):
        load_dataset(rows_empty, progress=False)

    with pytest.raises(ValueError, match="resolution"):
        load_dataset(no_meta, resolution=0, progress=False)
    with pytest.raises(ValueError, match="nifti_axis"):
        load_dataset(no_meta, nifti_axis=3, progress=False)
