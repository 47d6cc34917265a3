"""Every file RadSynth writes gets the mode an ordinary ``open`` would give: ``0o666 & ~umask``
(a temporary file renamed into place must not keep mkstemp's 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from radsynth.cli import main


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode)
            for p in folder.rglob("*") if p.is_file()}


def test_phantoms_and_generate_outputs_follow_the_umask(tmp_path, tiny_model, umask_022):
    assert main(["phantoms", "--num-images", "3", "--size", "32", "--output", str(tmp_path / "ph")]) == 0
    assert main(["generate", "--model", str(tiny_model), "--prompt", "bright square", "--num-images", "2",
                 "--steps", "2", "--output", str(tmp_path / "gen"), "--format", "png", "--format", "dicom",
                 "--format", "nifti", "--grid", str(tmp_path / "sheet.png"), "--quiet"]) == 0
    modes = {**{f"ph/{k}": v for k, v in _modes(tmp_path / "ph").items()},
             **{f"gen/{k}": v for k, v in _modes(tmp_path / "gen").items()},
             "sheet.png": stat.S_IMODE((tmp_path / "sheet.png").stat().st_mode)}
    assert {"ph/metadata.jsonl", "ph/phantom_000000.png", "gen/metadata.jsonl", "gen/000000.png"} <= set(modes)
    assert any(k.startswith("gen/dicom/") for k in modes) and any(k.startswith("gen/nifti/") for k in modes)
    wrong = {k: oct(v) for k, v in modes.items() if v != 0o644}
    assert not wrong, wrong


def test_a_private_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        assert main(["phantoms", "--num-images", "2", "--size", "32", "--output", str(tmp_path / "ph")]) == 0
    finally:
        os.umask(old)
    assert set(_modes(tmp_path / "ph").values()) == {0o600}
