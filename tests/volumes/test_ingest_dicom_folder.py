"""Volume ingest of a DICOM archive without a metadata file (issue 10): one volume per CT/MR series found
anywhere under the folder, texts from a reports CSV or built from the headers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from generator.volumes.ingest import load_volumes
from generator.volumes.readers import read_dicom_series
from tests.volumes.dicom_helpers import write_series

STUDY_A = "1.2.826.0.1.3680043.8.498.101"
STUDY_B = "1.2.826.0.1.3680043.8.498.102"
TEXT_A = "chest CT, 12 mm nodule in the right upper lobe"
TEXT_B = "chest CT, no acute findings"
#: relative folder -> (study, patient, sex, age, shape, spacing, seed)
SERIES = {
    "P1/studyA/ser1": (STUDY_A, "P1", "F", "070Y", (8, 12, 12), (2.0, 1.5, 1.5), 0),
    "P1/studyA/ser2": (STUDY_A, "P1", "F", "070Y", (6, 12, 10), (2.5, 1.0, 1.0), 1),
    "P2/studyB/ser1": (STUDY_B, "P2", "M", "045Y", (8, 10, 12), (2.0, 1.2, 1.2), 2),
}


def _hu(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.float32)


def _archive(root: Path) -> Path:
    """The nested archive of :data:`SERIES`: 3 series in 2 studies of 2 patients."""
    for rel, (study, pid, sex, age, shape, spacing, seed) in SERIES.items():
        write_series(root / rel, _hu(shape, seed), spacing=spacing, study_uid=study, patient_id=pid,
                     patient_sex=sex, patient_age=age)
    return root


def _reports(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["StudyInstanceUID", "text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_nested_archive_with_reports_reads_one_volume_per_series(tmp_path):
    root = _archive(tmp_path / "archive")
    reports = _reports(tmp_path / "reports.csv", [{"StudyInstanceUID": STUDY_A, "text": TEXT_A, "label": 1},
                                                  {"StudyInstanceUID": STUDY_B, "text": TEXT_B, "label": 0}])
    res = load_volumes(root, reports_csv=reports)
    assert [v.file_name for v in res.records] == sorted(SERIES)
    assert res.skipped == [] and res.summary == "read 3 volumes from 3 series, skipped 0"
    for vol in res.records:
        study, pid, sex, age, shape, spacing, _ = SERIES[vol.file_name]
        assert vol.text == (TEXT_A if study == STUDY_A else TEXT_B)
        assert vol.patient_id == pid and vol.attributes["patient_id"] == pid
        assert vol.attributes["label"] == (1 if study == STUDY_A else 0)  # the report's attribute columns
        assert vol.shape == shape and vol.spacing == pytest.approx(spacing)
        ref = read_dicom_series(root / vol.file_name)
        np.testing.assert_array_equal(vol.array, ref.array)
        np.testing.assert_array_equal(vol.affine, ref.affine)


def test_series_without_report_is_skipped_with_the_reason(tmp_path):
    root = _archive(tmp_path / "archive")
    reports = _reports(tmp_path / "reports.csv", [{"StudyInstanceUID": STUDY_A, "text": TEXT_A, "label": 1}])
    res = load_volumes(root, reports_csv=reports)
    assert [v.file_name for v in res.records] == ["P1/studyA/ser1", "P1/studyA/ser2"]
    assert [(s.path, s.reason) for s in res.skipped] == [
        ("P2/studyB/ser1", f"P2/studyB/ser1: no report: StudyInstanceUID '{STUDY_B}' is not in reports.csv")]
    assert "skipped 1 (no report x1)" in res.summary


def test_series_with_a_missing_slice_is_skipped_while_the_others_load(tmp_path):
    root = _archive(tmp_path / "archive")
    write_series(root / "P3/studyC/ser1", _hu((6, 8, 8), 3), spacing=(2.0, 1.0, 1.0))
    (root / "P3/studyC/ser1/slice003.dcm").unlink()
    res = load_volumes(root, shape=(8, 8, 8), spacing=2.0)
    assert [v.file_name for v in res.records] == sorted(SERIES)
    assert all(v.shape == (8, 8, 8) and v.spacing == (2.0, 2.0, 2.0) for v in res.records)
    assert [s.path for s in res.skipped] == ["P3/studyC/ser1"]
    assert "missing slice" in res.skipped[0].reason
    assert res.summary.startswith("read 3 volumes from 4 series, skipped 1 (1 missing slice(s) x1)")


def test_two_series_in_one_folder_are_named_by_uid(tmp_path):
    root = tmp_path / "archive"
    hu = _hu((6, 8, 8), 4)
    write_series(root / "mixed", hu[:3], series_uid="1.2.3.4")
    write_series(root / "mixed", hu[3:] + 7, series_uid="1.2.3.5", names=[f"b{k}.dcm" for k in range(3)])
    write_series(root / "alone", hu, series_uid="1.2.3.6")
    res = load_volumes(root)
    assert [v.file_name for v in res.records] == ["alone", "mixed#1.2.3.4", "mixed#1.2.3.5"]
    np.testing.assert_array_equal(res.records[1].array, hu[:3])
    np.testing.assert_array_equal(res.records[2].array, hu[3:] + 7)
    assert res.skipped == []


def test_every_file_in_the_root_folder(tmp_path):
    root = tmp_path / "flat"
    hu = _hu((5, 8, 8), 5)
    write_series(root, hu[:3], series_uid="1.2.3.7")
    write_series(root, hu, series_uid="1.2.3.8", names=[f"b{k}.dcm" for k in range(5)])
    res = load_volumes(root)
    assert [(v.file_name, v.shape) for v in res.records] == [(".#1.2.3.7", (3, 8, 8)), (".#1.2.3.8", (5, 8, 8))]


def test_non_dicom_files_and_dicom_without_pixels_are_ignored(tmp_path):
    root = tmp_path / "archive"
    paths = write_series(root / "P1/s1", _hu((4, 8, 8), 6), series_uid="1.2.3.9")
    (root / "notes.txt").write_text("not a DICOM file\n")
    (root / "P1/s1/.hidden.dcm").write_bytes(b"\x00" * 10)
    # a DICOM object of its own series with position and orientation but no Pixel Data
    ds = pydicom.dcmread(paths[0])
    del ds.PixelData
    ds.SeriesInstanceUID = "1.2.3.10"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.10.1"
    (root / "P1/other").mkdir()
    ds.save_as(str(root / "P1/other/nopixels.dcm"), enforce_file_format=True)
    # and one without Image Position (Patient), in the series' folder
    ds = pydicom.dcmread(paths[1])
    del ds.ImagePositionPatient
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.9.99"
    ds.save_as(str(root / "P1/s1/noposition.dcm"), enforce_file_format=True)
    res = load_volumes(root)
    assert [(v.file_name, v.shape) for v in res.records] == [("P1/s1", (4, 8, 8))]
    assert res.skipped == []
    assert res.summary == ("read 1 volumes from 1 series, skipped 0; ignored 3 files that are not DICOM image "
                           "slices")


def test_without_reports_the_text_is_built_from_the_header(tmp_path):
    root = _archive(tmp_path / "archive")
    res = load_volumes(root)
    by_name = {v.file_name: v for v in res.records}
    a, b = by_name["P1/studyA/ser1"], by_name["P2/studyB/ser1"]
    assert a.attributes == {"patient_id": "P1", "modality": "CT", "sex": "F", "age": 70}
    # the header's caption, as the 2D DICOM folder mode writes it: no finding is claimed
    assert a.text.startswith("CT") and "female, 70 years" in a.text and "finding" not in a.text
    assert "male, 45 years" in b.text and "finding" not in b.text
    assert b.patient_id == "P2"


def test_reports_csv_with_a_metadata_folder_is_refused(tmp_path):
    root = tmp_path / "meta"
    write_series(root / "s", _hu((4, 6, 6), 7))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "s", "text": "chest CT"}) + "\n")
    reports = _reports(tmp_path / "reports.csv", [])
    with pytest.raises(ValueError, match=r"reports_csv=.*reports\.csv.* has metadata\.jsonl"):
        load_volumes(root, reports_csv=reports)
    assert len(load_volumes(root).records) == 1


def test_folder_without_metadata_or_series_is_refused(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty: no metadata\.jsonl or metadata\.csv and no DICOM image series"):
        load_volumes(root)


def test_train_dims3_on_a_dicom_archive(tmp_path, tiny_text_encoder, capsys):
    from radsynth.cli import main

    root = _archive(tmp_path / "archive")
    reports = _reports(tmp_path / "reports.csv", [{"StudyInstanceUID": STUDY_A, "text": TEXT_A, "label": 1},
                                                  {"StudyInstanceUID": STUDY_B, "text": TEXT_B, "label": 0}])
    out = tmp_path / "model"
    argv = ["train", "--dims", "3", "--data", str(root), "--reports-csv", str(reports), "--output", str(out),
            "--resolution", "16", "--spacing", "2", "--preset", "tiny", "--max-steps", "2",
            "--text-encoder", str(tiny_text_encoder), "--quiet"]
    assert main(argv) == 0
    assert (out / "radsynth.json").is_file()
    capsys.readouterr()
    missing = ["train", "--dims", "3", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "m2"),
               "--resolution", "16", "--preset", "tiny"]
    assert main(missing) == 2
    err = capsys.readouterr().err
    assert "metadata.jsonl" in err and "DICOM series" in err


def test_train_dims3_refuses_reports_csv_with_a_metadata_folder_before_touching_output(tmp_path, capsys):
    from radsynth.cli import main

    root = tmp_path / "meta"
    write_series(root / "s", _hu((4, 6, 6), 8))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "s", "text": "chest CT"}) + "\n")
    reports = _reports(tmp_path / "reports.csv", [])
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier model")
    argv = ["train", "--dims", "3", "--data", str(root), "--reports-csv", str(reports), "--output", str(out),
            "--overwrite", "--resolution", "16", "--preset", "tiny"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--reports-csv" in err and "metadata.jsonl" in err
    assert (out / "keep.txt").is_file()


def test_index_of_a_dicom_archive(tmp_path):
    """``radsynth index --dims 3`` reads a DICOM archive as training and held-out volumes (one per series)."""
    from privacy.volumes import VolumeIndex
    from radsynth.cli import main

    train = _archive(tmp_path / "archive")
    hold = tmp_path / "holdout"
    for i in range(6):
        write_series(hold / f"H{i}/study/ser", _hu((8, 12, 12), 10 + i), spacing=(2.0, 1.5, 1.5),
                     study_uid=f"1.2.826.0.1.3680043.8.498.2{i}", patient_id=f"H{i}", patient_sex="M",
                     patient_age="050Y")
    out = tmp_path / "index"
    assert main(["index", "--dims", "3", "--data", str(train), "--holdout", str(hold), "--output", str(out),
                 "--resolution", "8", "--spacing", "2", "--alpha", "0.2", "--review-alpha", "0.25"]) == 0
    index = VolumeIndex.load(out)
    assert sorted(index.ids) == sorted(SERIES) and index.shape == (8, 8, 8)
    assert index.holdout["n_null"] == 6 and index.spacing == pytest.approx((2.0, 2.0, 2.0))
