"""Oversampling of rare findings or classes in the UNet stage (``TrainConfig.oversample``)."""

from __future__ import annotations

import json

import pytest
import torch

import generator.training as training
from generator.data import load_dataset
from generator.models.config import TrainConfig, check_oversample, get_preset
from generator.recipe import draw_records, oversample_weights
from generator.training import Trainer


def test_weights_match_terms_case_insensitively_and_multiply():
    texts = ["Left NODULE", "normal", "nodule and effusion", "effusion"]
    w = oversample_weights(texts, (("nodule", 3.0), ("effusion", 2.0)))
    assert w.tolist() == [3.0, 1.0, 6.0, 2.0]
    assert oversample_weights(texts, ()) is None


def test_a_term_in_no_text_is_an_error():
    with pytest.raises(ValueError, match=r"'nodle' is in none of the 2 training texts"):
        oversample_weights(["nodule", "normal"], (("nodle", 2.0),))


def test_uniform_draws_are_those_of_before():
    """Without weights the draws are torch.randint's, so runs without oversampling keep their weights."""
    a = draw_records(torch.Generator().manual_seed(5), 10, 7)
    b = torch.randint(0, 10, (7,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_weighted_draws_follow_the_weights():
    g = torch.Generator().manual_seed(0)
    idx = draw_records(g, 3, 20000, torch.tensor([1.0, 1.0, 8.0], dtype=torch.float64))
    share = torch.bincount(idx, minlength=3).double() / idx.numel()
    assert abs(float(share[2]) - 0.8) < 0.02 and abs(float(share[0]) - 0.1) < 0.02
    with pytest.raises(ValueError, match=r"weights must have shape \(4,\)"):
        draw_records(g, 4, 2, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("value, msg", [
    ([("nodule",)], "pairs"),
    (["nodule=2"], "pairs"),
    ([("", 2.0)], "non-empty"),
    ([("nodule", 0.0)], "finite number > 0"),
    ([("nodule", float("nan"))], "finite number > 0"),
    ([("nodule", True)], "finite number > 0"),
    ([("Nodule", 2.0), ("nodule ", 3.0)], "twice"),
])
def test_bad_settings_are_named(value, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(oversample=value)


def test_setting_survives_radsynth_json():
    cfg = get_preset("tiny", oversample={" Nodule": 2})
    assert cfg.oversample == (("nodule", 2.0),)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert check_oversample(None) == ()


def test_trainer_draws_the_oversampled_records(tmp_path, square_data, tiny_text_encoder, monkeypatch):
    """The UNet stage draws records whose text names the term about ``weight`` times as often; the model
    folder records the setting (radsynth.json and card)."""
    drawn: list[torch.Tensor] = []
    real = training.draw_records

    def spy(g, n, batch, weights=None):
        idx = real(g, n, batch, weights)
        drawn.append(idx)
        return idx

    monkeypatch.setattr(training, "draw_records", spy)
    data = load_dataset(square_data, resolution=16, progress=False)
    texts = [r.text for r in data.records]
    cfg = get_preset("tiny", oversample=(("bright", 9.0),), unet_batch_size=64)
    out = tmp_path / "m"
    Trainer(data, out, cfg, resolution=16, text_encoder=str(tiny_text_encoder), seed=0, max_steps=4,
            progress=False, mixed_precision="no").run()
    idx = torch.cat(drawn)
    assert idx.numel() == 4 * 64
    bright = sum("bright" in texts[int(i)] for i in idx) / idx.numel()
    assert 0.8 < bright < 0.99  # half the records, weight 9: expected share 0.9 (uniform: 0.5)
    info = json.loads((out / "radsynth.json").read_text())
    assert info["train_config"]["oversample"] == [["bright", 9.0]]
    assert "'bright' x9" in (out / "README.md").read_text()


def test_trainer_refuses_a_term_before_training(tmp_path, square_data, tiny_text_encoder):
    data = load_dataset(square_data, resolution=16, progress=False)
    with pytest.raises(ValueError, match="'pneumothorax' is in none"):
        Trainer(data, tmp_path / "m", get_preset("tiny", oversample=(("pneumothorax", 2.0),)), resolution=16,
                text_encoder=str(tiny_text_encoder), seed=0, max_steps=2, progress=False).run()
    assert not list((tmp_path / "m").glob("**/*.safetensors"))
