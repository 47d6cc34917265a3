"""``radsynth stress-test`` end to end: example spec, exit codes, errors before any image, privacy gate."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from radsynth.cli import main

FAIR = "generator.stress.reference_models:fair_effusion"
LEFT_BLIND = "generator.stress.reference_models:left_blind_effusion"


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_init_spec_and_no_overwrite(tmp_path, capsys):
    path = tmp_path / "stress.yaml"
    assert main(["stress-test", "--init-spec", str(path)]) == 0
    assert "vary:" in path.read_text() and "# " in path.read_text()
    assert main(["stress-test", "--init-spec", str(path)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_fail_under_sets_the_exit_status(tmp_path, effusion_spec, capsys):
    effusion_spec["seeds"] = 6
    spec = _write(tmp_path / "s.yaml", effusion_spec)
    common = ["stress-test", "--spec", str(spec), "--model", "phantoms", "--quiet", "--bootstrap", "200"]
    rc = main(common + ["--classifier", LEFT_BLIND, "--output", str(tmp_path / "blind"),
                        "--fail-under", "sensitivity=0.9"])
    out = capsys.readouterr()
    assert rc == 1 and "FLAG finding: moderate left pleural effusion vs moderate right" in out.out
    assert "--fail-under sensitivity=0.9: 0.5 -> FAIL" in out.out
    rc = main(common + ["--classifier", FAIR, "--output", str(tmp_path / "fair"),
                        "--fail-under", "auroc=0.9", "--fail-under", "consistency.ci_low=0.9"])
    assert rc == 0 and "nothing flagged" in capsys.readouterr().out
    report = json.loads((tmp_path / "fair" / "report.json").read_text())
    assert [r["passed"] for r in report["summary"]["fail_under"]] == [True, True]
    html = (tmp_path / "blind" / "report.html").read_text()
    assert html.count("<figure>") > 0 and "images/n" in html  # the gallery of failed pairs


@pytest.mark.parametrize(
    "edit, extra, message",
    [
        (lambda d: d.update(prompt=d["prompt"] + " {view}"), [], r"placeholder \{view\}"),
        (lambda d: d["labels"]["finding"].pop("no acute findings"), [], "gives no label for the value"),
        (lambda d: d.update(seeds=0), [], "seeds must be >= 1"),
        (lambda d: d["vary"].update(finding=["no acute findings", "hemothorax"]) or d["labels"].update(
            finding={"no acute findings": 0, "hemothorax": 1}), [], "cannot draw 'hemothorax'"),
        (lambda d: None, ["--fail-under", "aurox=0.8"], "did you mean 'auroc'"),
        (lambda d: None, ["--fail-under", "auroc"], "METRIC=VALUE"),
        (lambda d: d["labels"]["finding"].update({"no acute findings": 1}), ["--fail-under", "auroc=0.8"],
         "auroc cannot be computed"),
    ],
)
def test_bad_input_fails_before_any_image(tmp_path, effusion_spec, capsys, edit, extra, message):
    edit(effusion_spec)
    spec = _write(tmp_path / "s.yaml", effusion_spec)
    out = tmp_path / "out"
    rc = main(["stress-test", "--spec", str(spec), "--classifier", FAIR, "--model", "phantoms",
               "--output", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert not out.exists()


def test_classifier_that_does_not_load_fails_before_any_image(tmp_path, effusion_spec, capsys):
    spec = _write(tmp_path / "s.yaml", effusion_spec)
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x00garbage")
    rc = main(["stress-test", "--spec", str(spec), "--classifier", str(bad), "--model", "phantoms",
               "--output", str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and "model.pt: not a TorchScript file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_privacy_index_rejects_copies_of_training_images(tmp_path, vocab_model, bright_torchscript, tiny_spec,
                                                         square_data, capsys):
    """Images identical to the index's training images are rejected, left out of the folder and of the
    statistics; kept images carry the privacy fields."""
    spec = _write(tmp_path / "s.yaml", tiny_spec)
    common = ["stress-test", "--spec", str(spec), "--classifier", str(bright_torchscript), "--model",
              str(vocab_model), "--steps", "4", "--quiet", "--bootstrap", "200", "--device", "cpu"]
    assert main(common + ["--output", str(tmp_path / "first")]) == 0
    assert main(["index", "--data", str(tmp_path / "first" / "images"), "--holdout", str(square_data),
                 "--resolution", "16", "--output", str(tmp_path / "idx"), "--alpha", "0.2", "--review-alpha", "0.3",
                 "--embedder-steps", "5", "--quiet"]) == 0
    capsys.readouterr()
    assert main(common + ["--output", str(tmp_path / "gated"), "--privacy-index", str(tmp_path / "idx")]) == 0
    report = json.loads((tmp_path / "gated" / "report.json").read_text())
    rejected = json.loads((tmp_path / "gated" / "privacy_rejected.json").read_text())
    assert report["summary"]["n_rejected_by_privacy"] == len(rejected) > 0
    kept = [json.loads(ln) for ln in (tmp_path / "gated" / "images" / "metadata.jsonl").read_text().splitlines()]
    assert len(kept) + len(rejected) == 12
    assert all("privacy_verdict" in ln and ln["privacy_verdict"] != "reject" for ln in kept)


def test_real_image_edits_from_the_command_line(tmp_path, vocab_model, bright_torchscript, tiny_spec, square_data):
    from PIL import Image

    tiny_spec["strength"] = 0.5
    spec = _write(tmp_path / "s.yaml", tiny_spec)
    mask = (tmp_path / "keep.png")
    Image.new("L", (24, 24), 0).save(mask)
    rc = main(["stress-test", "--spec", str(spec), "--classifier", str(bright_torchscript), "--model",
               str(vocab_model), "--steps", "4", "--quiet", "--bootstrap", "200", "--device", "cpu",
               "--images", str(square_data), "--max-images", "2", "--keep-mask", str(mask),
               "--threshold", "0.3", "--output", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["source"] == "images" and report["spec"]["threshold"] == 0.3
    assert len(report["edits"]) == 4 and all(r["n"] == 2 for r in report["edits"])
    names = sorted(p.name for p in (tmp_path / "out" / "images").glob("*.png"))
    assert names[:2] == ["e00000_c000.png", "e00000_c001.png"] and "o00001.png" in names and len(names) == 10
