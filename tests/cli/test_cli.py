"""The radsynth command line: verbs end to end on tiny data, errors, several processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generator.gallery import privacy_caption
from radsynth.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_help_and_unknown_verb(capsys):
    assert main([]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["generat"]) == 2
    assert "Did you mean 'generate'" in capsys.readouterr().err
    assert main(["generate", "--help"]) == 0
    assert "examples:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- train
def test_train_errors(tmp_path, capsys, square_data):
    assert main(["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "m")]) == 2
    assert "missing" in capsys.readouterr().err

    bad = tmp_path / "notext"
    bad.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad / "a.png")
    (bad / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "x"}) + "\n")
    assert main(["train", "--data", str(bad), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "text" in err and "metadata.jsonl" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", str(empty), "--output", str(tmp_path / "m")]) == 2
    assert "error" in capsys.readouterr().err

    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["train", "--data", str(square_data), "--output", str(out), "--resolution", "16",
                 "--preset", "tiny"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()

    assert main(["train", "--data", str(square_data), "--output", str(tmp_path / "m"), "--preset", "smal"]) == 2
    assert "did you mean 'small'" in capsys.readouterr().err


def test_train_npz_label_text(tmp_path, tiny_text_encoder):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mini.npz", train_images=rng.integers(0, 255, (8, 16, 16), dtype=np.uint8),
             train_labels=np.array([[0], [1]] * 4, dtype=np.uint8))
    rc = main(["train", "--data", str(tmp_path / "mini.npz"), "--output", str(tmp_path / "m"),
               "--resolution", "16", "--preset", "tiny", "--max-steps", "2", "--quiet",
               "--text-encoder", str(tiny_text_encoder),
               "--label-text", "0=normal chest radiograph", "--label-text", "1=pneumonia"])
    assert rc == 0
    info = json.loads((tmp_path / "m" / "radsynth.json").read_text())
    assert info["data"]["source"] == "npz" and info["data"]["num_images"] == 8
    assert main(["train", "--data", str(tmp_path / "mini.npz"), "--output", str(tmp_path / "m2"),
                 "--label-text", "zero=x"]) == 2


# ----------------------------------------------------------------------------- generate
def test_generate_errors(tmp_path, capsys, tiny_model):
    base = ["generate", "--model", str(tiny_model), "--output", str(tmp_path / "o")]
    assert main(base + ["--prompt", "  "]) == 2
    assert "--prompt must not be empty" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nomodel"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(base + ["--prompt", "x", "--num-images", "0"]) == 2
    assert "argument --num-images: must be an integer in [1, 100000], got 0" in capsys.readouterr().err
    assert main(base + ["--prompt", "x", "--sampler", "eulr"]) == 2
    assert "did you mean 'euler'" in capsys.readouterr().err
    assert main(base) == 2
    assert "--prompt" in capsys.readouterr().err


def test_generate_end_to_end_with_exports_and_regeneration(tmp_path, tiny_model):
    out = tmp_path / "synth"
    prompts = tmp_path / "p.csv"
    prompts.write_text("text,num_images\nbright square,2\ndark field,1\n")
    rc = main(["generate", "--model", str(tiny_model), "--prompts", str(prompts), "--output", str(out),
               "--steps", "3", "--format", "png", "--format", "dicom", "--format", "nifti",
               "--grid", str(tmp_path / "sheet.png"), "--quiet", "--modality", "DX"])
    assert rc == 0
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for ln in lines:
        assert (out / ln["dicom_file"]).is_file() and (out / ln["nifti_file"]).is_file()
    assert Image.open(tmp_path / "sheet.png").size[0] > 100
    # same command again: nothing to do, nothing duplicated
    assert main(["generate", "--model", str(tiny_model), "--prompts", str(prompts), "--output", str(out),
                 "--steps", "3", "--format", "png", "--format", "dicom", "--format", "nifti", "--quiet",
                 "--modality", "DX"]) == 0
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 3
    # one image regenerated alone from its manifest line
    rc = main(["generate", "--model", str(tiny_model), "--from-manifest", json.dumps(lines[1]),
               "--output", str(tmp_path / "one")])
    assert rc == 0
    a = np.asarray(Image.open(out / lines[1]["file_name"]))
    b = np.asarray(Image.open(tmp_path / "one" / lines[1]["file_name"]))
    np.testing.assert_array_equal(a, b)
    # the output is an imagefolder that datasets and radsynth train accept
    from datasets import load_dataset

    ds = load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 3 and "text" in ds.column_names
    from generator.data import load_dataset as ingest

    assert len(ingest(out, resolution=16, progress=False).records) == 3


# ----------------------------------------------------------------------------- several processes
def _two_procs(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "radsynth", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.mark.slow
def test_two_process_train_and_generate(tmp_path, square_data, tiny_text_encoder):
    model = tmp_path / "m"
    r = _two_procs(["train", "--data", str(square_data), "--output", str(model), "--resolution", "16",
                    "--preset", "tiny", "--max-steps", "3", "--text-encoder", str(tiny_text_encoder), "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((model / "radsynth.json").read_text())
    assert info["training"]["num_processes"] == 2

    out = tmp_path / "g"
    r = _two_procs(["generate", "--model", str(model), "--prompt", "bright square", "--num-images", "5",
                    "--output", str(out), "--steps", "2", "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [ln["file_name"] for ln in lines] == [f"{i:06d}.png" for i in range(5)]
    assert sorted(ln["seed"] for ln in lines) == list(range(5))
    assert "2 process(es)" in r.stdout


def test_generate_with_privacy_index(tmp_path, tiny_model, capsys):
    phantoms = tmp_path / "phantoms"  # varied training-like data for the index
    assert main(["phantoms", "--num-images", "40", "--size", "32", "--output", str(phantoms)]) == 0
    idx = tmp_path / "idx"
    # 40 phantoms leave 8 held-out images: enough to resolve alpha 0.2, not 0.01 (refused, tested in privacy)
    assert main(["index", "--data", str(phantoms), "--output", str(idx), "--resolution", "16", "--quiet",
                 "--embedder-steps", "20", "--alpha", "0.2", "--review-alpha", "0.3"]) == 0
    out = tmp_path / "gated"
    assert main(["generate", "--model", str(tiny_model), "--prompt", "bright square", "--num-images", "3",
                 "--steps", "2", "--output", str(out), "--privacy-index", str(idx), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "3 images written" in printed and "0 dropped after" in printed  # nothing here copies phantoms
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for ln in lines:
        assert ln["privacy_verdict"] in ("keep", "review")
        assert isinstance(ln["nearest_train_similarity"], float) and "privacy_threshold" in ln
        view = ln["privacy_view"]  # the deciding view: its own similarity beside its own threshold
        assert ln["nearest_train_similarity"] == ln[f"privacy_similarity_{view}"]
        assert ln["privacy_threshold"] == ln[f"privacy_threshold_{view}"]
        assert privacy_caption(ln).startswith(f"nearest training image: {view} ")
        assert "phantom_0" not in json.dumps(ln)  # no training file name in the shareable manifest
    idx32 = tmp_path / "idx32"
    assert main(["index", "--data", str(phantoms), "--output", str(idx32), "--resolution", "32", "--quiet",
                 "--embedder-steps", "5", "--alpha", "0.2", "--review-alpha", "0.3"]) == 0
    assert main(["generate", "--model", str(tiny_model), "--prompt", "x", "--output", str(tmp_path / "o2"),
                 "--privacy-index", str(idx32)]) == 2
    assert "built at 32 px" in capsys.readouterr().err
