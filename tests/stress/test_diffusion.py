"""Counterfactuals from the tiny 16 px diffusion model: shared seeds, manifest, resume, vocabulary
check, real-image edits, privacy rejections."""

from __future__ import annotations

import json

import numpy as np
import pytest

from generator.manifest import load_png, read_manifest
from generator.models.model_folder import load_pipeline
from generator.stress import StressSpec, UserClassifier, run_stress_test
from generator.stress.counterfactuals import IMAGES_DIR, REJECTED_FILE
from generator.stress.sources import DiffusionSource

STEPS = 4


@pytest.fixture(scope="module")
def source(vocab_model):
    pipe, info = load_pipeline(vocab_model, device="cpu")
    return DiffusionSource(pipe, info, steps=STEPS, guidance_scale=2.0)


@pytest.fixture(scope="module")
def classifier(bright_torchscript):
    return UserClassifier.load(str(bright_torchscript), probe_size=16)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, source, classifier, spec_data):
    out = tmp_path_factory.mktemp("reference")
    spec = StressSpec.from_mapping(spec_data("tiny"))
    return spec, out, run_stress_test(spec, source, classifier, out, batch_size=5, n_boot=200, progress=False)


def test_sets_share_seeds_and_manifest_has_generate_fields(reference_run, source):
    spec, out, run = reference_run
    lines = read_manifest(out / IMAGES_DIR)
    assert len(lines) == len(spec.cells) * len(spec.seeds) == run.made.written
    for key in ("file_name", "text", "seed", "model", "sampler", "steps", "guidance_scale", "resolution",
                "intensity", "set_id", "cell_id", "varied", "expected_label", "attributes"):
        assert all(key in ln for ln in lines), key
    by_set: dict[str, set[int]] = {}
    for ln in lines:
        by_set.setdefault(ln["set_id"], set()).add(ln["seed"])
        assert ln["text"] == spec.cells[ln["cell_id"]].prompt and ln["shade"] == ln["varied"]["shade"]
    assert all(len(seeds) == 1 for seeds in by_set.values()) and len(by_set) == len(spec.seeds)
    # any image again from its line: same seed, same prompt -> same pixels (8-bit PNG)
    ln = lines[5]
    again = source.from_noise([ln["text"]], [ln["seed"]])[0]
    assert np.abs(load_png(out / IMAGES_DIR / ln["file_name"]) - again).max() <= 0.5 / 255 + 1e-6
    # one set's images differ (the prompt matters) but come from the same noise: closer to each other
    # than to another seed's image of the same prompt
    img = {(ln["set_id"], ln["cell_id"]): load_png(out / IMAGES_DIR / ln["file_name"]) for ln in lines}
    same_seed = np.abs(img[("noise-0", 0)] - img[("noise-0", 2)]).mean()
    other_seed = np.abs(img[("noise-0", 0)] - img[("noise-1", 0)]).mean()
    assert 0 < same_seed < other_seed
    assert (out / "report.json").is_file() and (out / "report.html").is_file() and (out / "scores.csv").is_file()


def test_imagefolder_loads_for_training(reference_run):
    from generator.data import load_dataset

    _, out, _ = reference_run
    data = load_dataset(out / IMAGES_DIR, progress=False)
    assert len(data.records) == 12 and data.records[0].image.shape == (16, 16)


class _Interrupting:
    """A source that stops the run (KeyboardInterrupt) after ``n`` calls."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0
        self.resolution = inner.resolution

    def manifest_fields(self):
        return self.inner.manifest_fields()

    def from_noise(self, prompts, seeds):
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt
        return self.inner.from_noise(prompts, seeds)


def test_interrupted_run_continues_with_same_images_and_pairs(tmp_path, reference_run, source, classifier):
    spec, ref_out, ref = reference_run
    stopping = _Interrupting(source, 1)
    with pytest.raises(KeyboardInterrupt):
        run_stress_test(spec, stopping, classifier, tmp_path, batch_size=5, n_boot=200, progress=False)
    assert len(read_manifest(tmp_path / IMAGES_DIR)) == 5
    counting = _Interrupting(source, 10**6)
    again = run_stress_test(spec, counting, classifier, tmp_path, batch_size=5, n_boot=200, progress=False)
    assert again.made.skipped_done == 5 and again.made.written == 7 and counting.calls == 2
    for ln in read_manifest(ref_out / IMAGES_DIR):  # same batches as the uninterrupted run: same bytes
        assert (tmp_path / IMAGES_DIR / ln["file_name"]).read_bytes() == (ref_out / IMAGES_DIR / ln["file_name"]).read_bytes()
    assert again.report["pairs"] == ref.report["pairs"] and again.report["cells"] == ref.report["cells"]


def test_other_run_in_output_needs_overwrite(tmp_path, reference_run, source, classifier, spec_data):
    _, ref_out, _ = reference_run
    other = StressSpec.from_mapping({**spec_data("tiny"), "seeds": [7]})
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_stress_test(other, source, classifier, ref_out, n_boot=200, progress=False)


def test_model_without_the_vocabulary_is_refused(source, tiny_model, spec_data):
    spec = spec_data("tiny")
    spec["vary"]["shade"] = ["dark", "hemothorax"]
    spec["labels"]["shade"] = {"dark": 0, "hemothorax": 1}
    with pytest.raises(ValueError, match=r"lacks the vocabulary of vary.shade 'hemothorax'"):
        source.check_spec(StressSpec.from_mapping(spec))
    spec["vary"]["shade"] = ["dark", "DARK"]  # the tokenizer lower-cases: one conditioning for two values
    spec["labels"]["shade"] = {"dark": 0, "DARK": 1}
    with pytest.raises(ValueError, match="same text conditioning"):
        source.check_spec(StressSpec.from_mapping(spec))
    source.check_spec(StressSpec.from_mapping(spec_data("tiny")))
    # the session's tiny_model has a tokenizer that knows no word (transformers 5): refused up front
    pipe, info = load_pipeline(tiny_model, device="cpu")
    if pipe.tokenizer("dark", add_special_tokens=False)["input_ids"] == [pipe.tokenizer.unk_token_id]:
        with pytest.raises(ValueError, match="lacks the vocabulary of vary.shade 'dark'"):
            DiffusionSource(pipe, info).check_spec(StressSpec.from_mapping(spec_data("tiny")))


def test_real_image_edits_keep_mask_and_strength(tmp_path, square_data, source, classifier, spec_data):
    from generator.data import load_dataset

    data = load_dataset(square_data, resolution=16, progress=False)
    originals = np.stack([r.image for r in data.records[:2]])
    keep = np.zeros_like(originals)
    keep[:, :, :8] = 1.0  # keep the image's left half
    light = source.edit(originals, ["bright field, woman"] * 2, [0, 1], strength=0.25)
    full = source.edit(originals, ["bright field, woman"] * 2, [0, 1], strength=1.0)
    assert np.abs(light - originals).mean() < np.abs(full - originals).mean()

    spec = StressSpec.from_mapping({**spec_data("tiny"), "strength": 0.75})
    run = run_stress_test(spec, source, classifier, tmp_path, originals=originals,
                          original_texts=[r.text for r in data.records[:2]], original_labels=[0, 1],
                          keep_masks=keep, n_boot=200, progress=False)
    lines = {ln["file_name"]: ln for ln in read_manifest(tmp_path / IMAGES_DIR)}
    assert len(lines) == 2 * (1 + len(spec.cells))
    for j in range(2):
        orig = load_png(tmp_path / IMAGES_DIR / f"o{j:05d}.png")
        for c in range(len(spec.cells)):
            ln = lines[f"e{j:05d}_c{c:03d}.png"]
            assert ln["original_file"] == f"o{j:05d}.png" and ln["set_id"] == f"image-{j}" and ln["strength"] == 0.75
            edit = load_png(tmp_path / IMAGES_DIR / ln["file_name"])
            assert np.abs(edit[:, :8] - orig[:, :8]).max() <= 1 / 255 + 1e-6  # kept half unchanged
            assert np.abs(edit[:, 8:] - orig[:, 8:]).mean() > 0.01  # edited half changed
    assert len(run.report["edits"]) == len(spec.cells)
    assert all("flip_rate" in row and row["n"] == 2 for row in run.report["edits"])


def test_privacy_rejections_are_left_out_and_not_remade(tmp_path, source, classifier, spec_data):
    spec = StressSpec.from_mapping(spec_data("tiny"))
    calls = []

    def gate(images):
        calls.append(len(images))
        # reject the brightest image of each batch: a stand-in for "a copy of a training image"
        worst = int(np.argmax(images.reshape(len(images), -1).mean(axis=1)))
        return [{"privacy_verdict": "reject" if i == worst else "keep"} for i in range(len(images))]

    run = run_stress_test(spec, source, classifier, tmp_path, gate=gate, batch_size=4, n_boot=200, progress=False)
    rejected = json.loads((tmp_path / REJECTED_FILE).read_text())
    assert len(rejected) == 3 and run.made.rejected == 3
    assert all(not (tmp_path / IMAGES_DIR / r["file_name"]).exists() for r in rejected)
    assert len(read_manifest(tmp_path / IMAGES_DIR)) == 9
    assert run.report["summary"]["n_rejected_by_privacy"] == 3
    assert sum(p["n"] for p in run.report["pairs"]) < 2 * 2 * 3  # pairs with a rejected image are left out
    n_calls = len(calls)
    again = run_stress_test(spec, source, classifier, tmp_path, gate=gate, batch_size=4, n_boot=200, progress=False)
    assert len(calls) == n_calls and again.made.written == 0
