"""Generation runs: manifest, determinism, resume without duplicates, privacy gate loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from generator.generation import (
    attempt_seed,
    generate_to_folder,
    make_requests,
    prepare_output,
)
from generator.manifest import read_manifest, sort_manifest
from generator.models.model_folder import load_pipeline


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_pipeline(tiny_model, device="cpu")


def _run(loaded, out, requests, **kw):
    pipe, info = loaded
    prepare_output(out, {"steps": 3}, requests, overwrite=kw.pop("overwrite", False))
    return generate_to_folder(pipe, info, requests, out, steps=3, progress=False, **kw)


def test_manifest_fields_and_seeds(loaded, tmp_path):
    reqs = make_requests([("bright square", {"sex": "F"}, 2), ("dark field", None, 1)], base_seed=10)
    s = _run(loaded, tmp_path, reqs, batch_size=2)
    assert s.written == 3
    lines = read_manifest(tmp_path)
    assert [ln["file_name"] for ln in lines] == ["000000.png", "000001.png", "000002.png"]
    assert [ln["seed"] for ln in lines] == [10, 11, 12]
    for key in ("text", "model", "sampler", "steps", "guidance_scale", "intensity"):
        assert key in lines[0]
    assert lines[0]["sex"] == "F" and lines[0]["attributes"] == {"sex": "F"}
    with Image.open(tmp_path / "000000.png") as im:
        assert im.size == (16, 16) and im.mode == "L"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_same_command_twice_identical_pixels(loaded, tmp_path):
    reqs = make_requests([("bright square", None, 3)], base_seed=0)
    _run(loaded, tmp_path / "a", reqs, batch_size=3)
    _run(loaded, tmp_path / "b", reqs, batch_size=1)
    for name in ("000000.png", "000001.png", "000002.png"):
        a = np.asarray(Image.open(tmp_path / "a" / name), dtype=int)
        b = np.asarray(Image.open(tmp_path / "b" / name), dtype=int)
        assert np.abs(a - b).max() <= 1  # batch size may flip a rounding step, nothing more


def test_resume_after_interruption(loaded, tmp_path):
    pipe, info = loaded
    reqs = make_requests([("dark field", None, 5)], base_seed=0)
    prepare_output(tmp_path, {"steps": 3}, reqs, overwrite=False)
    calls = {"n": 0}

    def boom(image, line):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        generate_to_folder(pipe, info, reqs, tmp_path, steps=3, batch_size=1, on_image=boom, progress=False)
    assert len(read_manifest(tmp_path)) == 2
    prepare_output(tmp_path, {"steps": 3}, reqs, overwrite=False)  # same run: allowed
    s = generate_to_folder(pipe, info, reqs, tmp_path, steps=3, batch_size=2, progress=False)
    assert s.skipped_done == 2 and s.written == 3
    sort_manifest(tmp_path)
    names = [ln["file_name"] for ln in read_manifest(tmp_path)]
    assert names == [f"{i:06d}.png" for i in range(5)]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == names


def test_other_run_needs_overwrite(loaded, tmp_path):
    reqs = make_requests([("dark field", None, 1)], base_seed=0)
    _run(loaded, tmp_path, reqs)
    other = make_requests([("bright square", None, 1)], base_seed=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_output(tmp_path, {"steps": 3}, other, overwrite=False)
    prepare_output(tmp_path, {"steps": 3}, other, overwrite=True)
    assert not (tmp_path / "000000.png").exists()


def test_gate_rejects_and_resamples_with_new_seed(loaded, tmp_path):
    seen = []

    def gate(images):
        out = []
        for _ in images:
            seen.append(1)
            out.append({"privacy_verdict": "reject" if len(seen) <= 2 else "keep"})
        return out

    reqs = make_requests([("dark field", None, 1)], base_seed=5)
    s = _run(loaded, tmp_path, reqs, gate=gate, batch_size=1, max_resample=3)
    line = read_manifest(tmp_path)[0]
    assert s.resampled == 2 and s.rejected == 0
    assert line["rejected_seeds"] == [5, attempt_seed(5, 1)] and line["seed"] == attempt_seed(5, 2)
    assert line["privacy_verdict"] == "keep"


def test_gate_bound_terminates(loaded, tmp_path):
    reqs = make_requests([("dark field", None, 2)], base_seed=0)
    s = _run(loaded, tmp_path, reqs, gate=lambda ims: [{"privacy_verdict": "reject"} for _ in ims],
             max_resample=2, batch_size=2)
    assert s.written == 0 and s.rejected == 2
    assert read_manifest(tmp_path) == []


def test_requests_errors():
    with pytest.raises(ValueError, match="num_images"):
        make_requests([("x", None, 0)], 0)
    with pytest.raises(ValueError, match="non-empty"):
        make_requests([("", None, 1)], 0)


def test_torn_manifest_line_ignored(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}) + "\n{\"file_na")
    assert read_manifest(tmp_path) == [{"file_name": "a.png"}]
