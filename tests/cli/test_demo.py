"""Smoke test of the README's first command, ``radsynth demo``, on a small reference set."""

from __future__ import annotations

import json

import pytest

from radsynth.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    """The README's first command with --3d: radiographs and CT volumes from the bundled models."""
    out = tmp_path / "demo"
    rc = main(["demo", "--output", str(out), "--reference-images", "50", "--images-per-prompt", "1",
               "--steps", "4", "--quiet", "--3d", "--volumes-per-prompt", "1"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    lines = [json.loads(x) for x in (out / "teaching_set" / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 4  # one image per demo prompt
    assert all(ln["privacy_verdict"] in ("keep", "review") for ln in lines)
    for name in ("contact_sheet.png", "index.html", "audit.html", "audit.json", "text_control.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(list((out / "teaching_set" / "dicom").rglob("*.dcm"))) == 4
    assert len(list((out / "teaching_set" / "nifti").rglob("*.nii*"))) == 4
    control = json.loads((out / "text_control.json").read_text())
    assert sum(v["n"] for v in control.values()) == 4
    assert "RadSynth demo finished" in printed and "text control" in printed
    # nothing from the training machine in what a user shares
    assert str(tmp_path) not in (out / "teaching_set" / "metadata.jsonl").read_text()

    # --3d: one CT volume per volume prompt, as NIfTI with sidecar and preview, and as a DICOM CT series
    vol = out / "volumes"
    lines = [json.loads(x) for x in (vol / "ct_set" / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    assert all(ln["privacy_verdict"] in ("keep", "review") for ln in lines)
    assert sorted(p.name for p in (vol / "ct_set").glob("*.nii.gz")) == sorted(ln["file_name"] for ln in lines)
    assert len(list((vol / "ct_set" / "previews").glob("*.png"))) == 3
    series = {p.parent for p in (vol / "ct_set" / "dicom").rglob("*.dcm")}
    assert len(series) == 3
    for name in ("audit.html", "audit.json", "privacy_index/index.json"):
        assert (vol / name).is_file(), name
    audit = json.loads((vol / "audit.json").read_text())
    assert audit["summary"]["n_images"] == 3 and audit["summary"]["n_references"] == 400
    assert "CT volumes" in printed and "volume audit" in printed
    assert not list(vol.glob(".phantoms-*"))  # the rebuilt training phantoms are not left behind


def test_demo_volume_flags_need_3d(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "d"), "--volumes-per-prompt", "3"]) == 2
    assert "need --3d" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_3d_refuses_a_2d_model_before_writing(tmp_path, capsys):
    from generator.demo import DEMO_MODEL_DIR

    assert main(["demo", "--output", str(tmp_path / "d"), "--3d", "--volume-model", str(DEMO_MODEL_DIR)]) == 2
    assert "not a volume model" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
