"""``radsynth export``: imagefolder in, DICOM/NIfTI + manifest out, input untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

from radsynth.cli import main


def _imagefolder(root: Path, meta, smooth, n: int = 4, bits: int = 8) -> Path:
    """``n`` PNGs (24x24, 8- or 16-bit) and their metadata.jsonl."""
    root.mkdir(parents=True)
    lines = []
    for i in range(n):
        line = meta(i)
        line.pop("intensity", None)
        x = smooth(24, 24, seed=i)
        if bits == 8:
            Image.fromarray(np.round(x * 255).astype(np.uint8)).save(root / f"{i}.png")
        else:
            Image.fromarray(np.round(x * 65535).astype(np.uint16)).save(root / f"{i}.png")
        line["file_name"] = f"{i}.png"
        lines.append(json.dumps(line))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.name.encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _export_both(tmp_path: Path, meta, smooth) -> tuple[Path, Path, list[dict]]:
    src = _imagefolder(tmp_path / "in", meta, smooth, bits=16)
    out = tmp_path / "out"
    rc = main(["export", "--input", str(src), "--format", "dicom", "--format", "nifti",
               "--output", str(out), "--images-per-study", "2"])
    assert rc == 0
    return src, out, [json.loads(l) for l in (out / "export_manifest.jsonl").read_text().splitlines()]


def test_export_passes_validators(tmp_path, meta, smooth, dciodvfy, dcentvfy):
    _, out, manifest = _export_both(tmp_path, meta, smooth)
    dicoms = [out / m["dicom_file"] for m in manifest]
    assert all(dciodvfy(path) == [] for path in dicoms)
    assert dcentvfy(dicoms) == []


def test_export_both_formats(tmp_path, meta, smooth, capsys):
    src = _imagefolder(tmp_path / "in", meta, smooth, bits=16)
    before = _digest(src)
    out = tmp_path / "out"
    rc = main(["export", "--input", str(src), "--format", "dicom", "--format", "nifti",
               "--output", str(out), "--images-per-study", "2"])
    assert rc == 0
    assert "exported 4 images" in capsys.readouterr().out
    assert _digest(src) == before, "the input folder must stay untouched"
    manifest = [json.loads(l) for l in (out / "export_manifest.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in manifest] == [f"{i}.png" for i in range(4)]
    dicoms = [out / m["dicom_file"] for m in manifest]
    for m, path in zip(manifest, dicoms):
        ds = pydicom.dcmread(path)
        assert ds.SyntheticData == "YES" and ds.Modality == "DX" and ds.BitsStored == 16
        png = np.asarray(Image.open(src / m["file_name"]))
        np.testing.assert_array_equal(ds.pixel_array, png)
        img = nib.load(out / m["nifti_file"])
        np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, 0].T, png)
        assert json.loads((out / m["nifti_sidecar"]).read_text())["SyntheticData"] is True
    studies = [pydicom.dcmread(p).StudyInstanceUID for p in dicoms]
    assert studies[0] == studies[1] != studies[2] == studies[3]
    assert (out / "nifti" / "dataset_description.json").is_file()


def test_export_ct_and_errors(tmp_path, meta, smooth, capsys):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=2)
    out = tmp_path / "out"
    assert main(["export", "--input", str(src), "--format", "dicom", "--output", str(out), "--modality", "ct"]) == 0
    ds = pydicom.dcmread(out / json.loads((out / "export_manifest.jsonl").read_text().splitlines()[0])["dicom_file"])
    assert ds.Modality == "CT" and ds.RescaleType == "HU"
    capsys.readouterr()
    # the same command again continues (here: nothing left to do) and says so
    assert main(["export", "--input", str(src), "--format", "dicom", "--output", str(out), "--modality", "CT"]) == 0
    assert "(2 done by an earlier run)" in capsys.readouterr().out
    # another command on the same output -> exit 2 with a message; --overwrite replaces
    assert main(["export", "--input", str(src), "--format", "dicom", "--output", str(out), "--modality", "MR"]) == 2
    err = capsys.readouterr().err
    assert "modality" in err and "--overwrite" in err
    assert main(["export", "--input", str(src), "--format", "dicom", "--output", str(out), "--modality", "MR", "--overwrite"]) == 0
    assert pydicom.dcmread(next((out / "dicom").rglob("*.dcm"))).Modality == "MR"
    assert main(["export", "--input", str(tmp_path / "missing"), "--format", "nifti", "--output", str(out)]) == 2
    assert main(["export", "--input", str(src), "--format", "nifti", "--output", str(tmp_path / "o2"), "--images-per-study", "0"]) == 2
