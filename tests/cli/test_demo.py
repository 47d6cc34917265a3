"""Smoke test of the README's first command, ``radsynth demo``, on a small reference set."""

from __future__ import annotations

import json

import pytest

from radsynth.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--output", str(out), "--reference-images", "50", "--images-per-prompt", "1",
               "--steps", "4", "--quiet"])
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
