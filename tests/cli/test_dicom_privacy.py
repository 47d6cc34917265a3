"""No identifying value of DICOM training data reaches a model folder or an export (issue 5)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from radsynth.cli import main

MARKERS = {
    "PatientName": "Zyxwvut^Qwertyuiop",
    "PatientID": "MRN-99887766",
    "PatientBirthDate": "19230417",
    "InstitutionName": "St Examplius Hospital",
    "ReferringPhysicianName": "Drfoo^Barbaz",
    "AccessionNumber": "ACC55443322",
    "StudyDate": "20190312",
    "OperatorsName": "Techname^Unique",
}


def _identifying_dicom_folder(folder: Path) -> tuple[Path, list[str]]:
    folder.mkdir()
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uids = []
    rows = []
    rng = np.random.default_rng(0)
    for i in range(8):
        ds = template.copy()
        for key, value in MARKERS.items():
            setattr(ds, key, value)
        ds.StudyInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.9.7777.")
        ds.SeriesInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.9.7777.")
        ds.SOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.9.7777.")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        arr = ds.pixel_array.astype(np.int32) + rng.integers(0, 50, ds.pixel_array.shape)
        ds.PixelData = arr.astype(ds.pixel_array.dtype).tobytes()
        uids += [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
        ds.save_as(folder / f"ct{i}.dcm")
        rows.append({"StudyInstanceUID": ds.StudyInstanceUID,
                     "text": "axial chest CT" if i % 2 else "axial chest CT, nodule"})
    with open(folder.parent / "reports.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["StudyInstanceUID", "text"])
        w.writeheader()
        w.writerows(rows)
    return folder, uids


def test_identifiers_never_reach_model_or_exports(tmp_path, tiny_text_encoder):
    data, uids = _identifying_dicom_folder(tmp_path / "dicom")
    model = tmp_path / "model"
    assert main(["train", "--data", str(data), "--reports-csv", str(tmp_path / "reports.csv"),
                 "--output", str(model), "--resolution", "16", "--preset", "tiny", "--max-steps", "2",
                 "--text-encoder", str(tiny_text_encoder), "--quiet"]) == 0
    out = tmp_path / "synth"
    assert main(["generate", "--model", str(model), "--prompt", "axial chest CT, nodule", "--num-images", "2",
                 "--steps", "2", "--output", str(out), "--format", "dicom", "--format", "nifti", "--quiet"]) == 0
    exp = tmp_path / "exported"
    assert main(["export", "--input", str(out), "--format", "dicom", "--format", "nifti",
                 "--output", str(exp), "--modality", "CT"]) == 0
    needles = [v.encode() for v in MARKERS.values()] + [u.encode() for u in uids]
    needles += [v.replace("^", " ").encode() for v in MARKERS.values() if "^" in v]
    dicoms = list(out.rglob("*.dcm")) + list(exp.rglob("*.dcm"))
    assert len(dicoms) >= 4
    checked = 0
    for root in (model, out, exp):
        for f in root.rglob("*"):
            if f.is_file():
                blob = f.read_bytes()
                for needle in needles:
                    assert needle not in blob, f"{needle!r} leaked into {f}"
                checked += 1
    assert checked > 10
    ds = pydicom.dcmread(dicoms[0])
    assert ds.Modality == "CT" and str(ds.PatientName) != MARKERS["PatientName"]
