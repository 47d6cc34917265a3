"""The two-stage volume trainer: runs, resumes exactly, writes a loadable model folder without voxels."""

from __future__ import annotations

from dataclasses import replace
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from generator.volumes.model_folder import load_volume_model, read_volume_info
from generator.volumes.models import VolumeModelConfig, get_volume_preset
from generator.volumes.pipeline import VolumePipeline
from generator.volumes.training import VolumeTrainConfig, VolumeTrainer, VolumeTrainingData
from tests.volumes.conftest import TINY_TRAIN


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("vae", "unet"):
        out.update({f"{part}.{k}": v for k, v in load_file(str(folder / part / "model.safetensors")).items()})
    return out


def test_model_folder_layout_and_info(tiny_volume_model, phantom_data):
    files = sorted(str(p.relative_to(tiny_volume_model)) for p in tiny_volume_model.rglob("*") if p.is_file())
    model_files = [f for f in files if not f.startswith(("checkpoints/", "tokenizer/", "text_encoder/"))]
    assert model_files == ["README.md", "radsynth.json", "scheduler/scheduler_config.json", "train_log.csv",
                           "unet/config.json", "unet/model.safetensors", "vae/config.json", "vae/model.safetensors"]
    assert not any(f.endswith((".npy", ".npz", ".nii.gz", ".pt", ".bin", ".pkl")) for f in files)
    info = read_volume_info(tiny_volume_model)
    assert info["dims"] == 3 and info["shape"] == [16, 16, 16]
    assert info["spacing"] == pytest.approx(list(phantom_data.spacing))
    assert info["intensity"]["kind"] == "ct_window" and info["intensity"]["unit"] == "HU"
    assert info["scaling_factor"] > 0 and info["text_encoder"] == {"name": "tiny_text_encoder0"}
    assert "/" not in json.dumps(info["text_encoder"])
    # the EMA UNet is what is saved, and it differs from the raw UNet of the last checkpoint
    ckpt = json.loads((tiny_volume_model / "checkpoints" / "latest" / "state.json").read_text())
    assert ckpt["unet_step"] == 8 and ckpt["vae_step"] == 6 and ckpt["unet_done"] and ckpt["kind"] == "volume"
    assert sorted(ckpt["files"]) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors"]


def test_loaded_model_samples(tiny_volume_model):
    pipe = VolumePipeline.from_pretrained(tiny_volume_model)
    out = pipe(["chest CT, nodule", "chest CT, no acute findings"], seed=5, num_inference_steps=3)
    assert out.volumes.shape == (2, 16, 16, 16) and out.volumes.dtype == np.float32
    assert 0.0 <= out.volumes.min() and out.volumes.max() <= 1.0
    hu = out.to_physical()
    assert hu.min() >= -1024 - 1e-3 and hu.max() <= 1024 + 1e-3
    assert out.spacing == pytest.approx(tuple(read_volume_info(tiny_volume_model)["spacing"]))


def test_resume_equals_uninterrupted(tmp_path, phantom_data, tiny_text_encoder, tiny_volume_model):
    preset, cfg = get_volume_preset("tiny"), VolumeTrainConfig(**TINY_TRAIN)
    out = tmp_path / "resumed"
    # stop mid-VAE (after 2 steps), then mid-UNet (5 more: 4 VAE + 1 UNet), then finish in a fresh trainer
    for max_steps in (2, 5, None):
        res = VolumeTrainer(phantom_data, out, preset, cfg, text_encoder=str(tiny_text_encoder),
                            resume=True).run(max_steps=max_steps)
        assert res.finished == (max_steps is None)
    assert (res.vae_step, res.unet_step) == (6, 8)
    a, b = _weights(tiny_volume_model), _weights(out)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6
    ia, ib = read_volume_info(tiny_volume_model), read_volume_info(out)
    assert ia["scaling_factor"] == pytest.approx(ib["scaling_factor"], abs=1e-6)
    # the log has one row per step, none repeated
    rows = (out / "train_log.csv").read_text().splitlines()[1:]
    assert len(rows) == 14


def test_damaged_or_old_checkpoint_is_refused_by_name(tmp_path, phantom_data, tiny_text_encoder):
    """A truncated checkpoint file, or a checkpoint of the earlier volume layout, stops ``resume`` with
    an error naming the file or folder (never a silent restart from scratch or a half-loaded model)."""
    preset, cfg = get_volume_preset("tiny"), VolumeTrainConfig(**TINY_TRAIN)
    out = tmp_path / "o"
    VolumeTrainer(phantom_data, out, preset, cfg, text_encoder=str(tiny_text_encoder)).run(max_steps=3)
    weights = out / "checkpoints" / "latest" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors.*damaged"):
        VolumeTrainer(phantom_data, out, preset, cfg, text_encoder=str(tiny_text_encoder), resume=True)
    (out / "checkpoints" / "state.json").write_text("{}")
    with pytest.raises(ValueError, match="earlier RadSynth layout"):
        VolumeTrainer(phantom_data, out, preset, cfg, text_encoder=str(tiny_text_encoder), resume=True)


def test_different_seed_trains_differently(tmp_path, phantom_data, tiny_text_encoder, tiny_volume_model):
    cfg = VolumeTrainConfig(**{**TINY_TRAIN, "seed": 1, "unet_steps": 2, "vae_steps": 2})
    VolumeTrainer(phantom_data, tmp_path / "s1", get_volume_preset("tiny"), cfg,
                  text_encoder=str(tiny_text_encoder)).run()
    a, b = _weights(tiny_volume_model), _weights(tmp_path / "s1")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-3


def test_resume_refuses_other_settings(tmp_path, phantom_data, tiny_text_encoder):
    out = tmp_path / "o"
    preset = get_volume_preset("tiny")
    VolumeTrainer(phantom_data, out, preset, VolumeTrainConfig(**TINY_TRAIN),
                  text_encoder=str(tiny_text_encoder)).run(max_steps=1)
    other = VolumeTrainConfig(**{**TINY_TRAIN, "unet_lr": 5e-4})
    with pytest.raises(ValueError, match="train_config differs"):
        VolumeTrainer(phantom_data, out, preset, other, text_encoder=str(tiny_text_encoder), resume=True)


def test_time_budget_stops_training(tmp_path, phantom_data, tiny_text_encoder):
    cfg = VolumeTrainConfig(**{**TINY_TRAIN, "vae_steps": 10_000, "unet_steps": 10_000, "max_minutes": 0.05})
    trainer = VolumeTrainer(phantom_data, tmp_path / "b", get_volume_preset("tiny"), cfg,
                            text_encoder=str(tiny_text_encoder))
    lrs: list[float] = []
    res = trainer.run(callback=lambda stage, step, loss: lrs.append(trainer._unet_lr()) if stage == "unet" else None)
    assert res.finished and 0 < res.vae_step < 10_000 and 0 < res.unet_step < 10_000
    assert res.seconds < 15
    load_volume_model(tmp_path / "b")
    # the UNet's cosine was fitted to the clock (not to the 10,000-step cap): its LR fell towards 10%
    if res.unet_step > 20:  # the first fit comes after 20 steps (a very slow machine may not get there)
        assert trainer._unet_plan.fits >= 1 and trainer._unet_plan.total < 10_000
        assert min(lrs) < 0.5 * cfg.unet_lr


def test_bad_configs_and_data():
    with pytest.raises(ValueError, match="unet_lr"):
        VolumeTrainConfig(unet_lr=0)
    with pytest.raises(ValueError, match="prompt_dropout"):
        VolumeTrainConfig(prompt_dropout=1.5)
    with pytest.raises(ValueError, match="unet_attention"):
        VolumeModelConfig(unet_attention=(True,))
    with pytest.raises(ValueError, match="divisible"):
        get_volume_preset("tiny").latent_shape((16, 16, 18))
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        get_volume_preset("tinny")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        from generator.volumes.records import ct_mapping

        VolumeTrainingData(np.full((1, 4, 4, 4), 2.0), ["x"], (1, 1, 1), ct_mapping())


def test_lean_preset_keeps_thin_structures_in_16_cubed_latents():
    lean = get_volume_preset("lean")
    assert lean.vae_factor == 2 and lean.latent_shape((32, 32, 32)) == (4, 16, 16, 16)
    assert lean.unet_attention == (False, False, True)  # attention only at the lowest level
    with pytest.raises(ValueError, match="divisible by 8"):
        lean.latent_shape((32, 32, 36))
    recipe = VolumeTrainConfig.for_preset("lean", seed=3)
    assert recipe.vae_fg_weight > 1 and recipe.snr_gamma > 0 and recipe.seed == 3
    assert lean.prediction_type == "v_prediction"
    assert VolumeTrainConfig.for_preset("small") == VolumeTrainConfig()
    with pytest.raises(ValueError, match="did you mean 'lean'"):
        VolumeTrainConfig.for_preset("lena")
    with pytest.raises(ValueError, match="vae_fg_weight"):
        VolumeTrainConfig(vae_fg_weight=0.5)
    with pytest.raises(ValueError, match="snr_gamma"):
        VolumeTrainConfig(snr_gamma=-1.0)


def test_weighted_vae_loss_and_min_snr_change_training(tmp_path, phantom_data, tiny_text_encoder):
    """``vae_fg_weight`` weighs bright voxels more (a larger loss on the same first batch, other weights);
    ``snr_gamma`` reweights the UNet loss (other weights, finite, and resumable like the plain run)."""
    base = {**TINY_TRAIN, "vae_steps": 2, "unet_steps": 2}
    losses: dict[str, list[float]] = {"plain": [], "fg": [], "snr": []}
    runs = {"plain": {}, "fg": {"vae_fg_weight": 10.0}, "snr": {"snr_gamma": 5.0}}
    for name, extra in runs.items():
        trainer = VolumeTrainer(phantom_data, tmp_path / name, get_volume_preset("tiny"),
                                VolumeTrainConfig(**base, **extra), text_encoder=str(tiny_text_encoder))
        trainer.run(callback=lambda stage, step, loss, n=name: losses[n].append(loss))
        assert all(np.isfinite(losses[name]))
    assert losses["fg"][0] > losses["plain"][0] * 1.5  # the phantom's bright voxels now weigh up to 10x
    assert losses["snr"][:2] == losses["plain"][:2]  # same VAE stage
    assert losses["snr"][2] != pytest.approx(losses["plain"][2], rel=1e-3)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "snr")
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("unet.")) > 1e-5


@pytest.mark.skipif(not __import__("generator._utils", fromlist=["x"]).bf16_supported(torch.device("cpu")),
                    reason="no native bfloat16 on this CPU")
def test_bf16_training_resumes_exactly_and_stays_close_to_fp32(tmp_path, phantom_data, tiny_text_encoder,
                                                                tiny_volume_model):
    """``mixed_precision="bf16"`` autocasts the forward passes of both stages: other weights than the
    float32 run, finite and close losses, float32 weights on disk, and an exact resume."""
    cfg = VolumeTrainConfig(**TINY_TRAIN, mixed_precision="bf16")
    whole = tmp_path / "whole"
    losses: list[float] = []
    res = VolumeTrainer(phantom_data, whole, get_volume_preset("tiny"), cfg, text_encoder=str(tiny_text_encoder)
                        ).run(callback=lambda stage, step, loss: losses.append(loss))
    assert res.finished and all(np.isfinite(losses))
    a, f32 = _weights(whole), _weights(tiny_volume_model)
    assert all(v.dtype == torch.float32 for v in a.values())
    assert max(float((a[k] - f32[k]).abs().max()) for k in a) > 1e-4  # the arithmetic did change
    assert read_volume_info(whole)["training"]["mixed_precision"] == "bf16"
    parts = tmp_path / "parts"
    for max_steps in (4, None):
        VolumeTrainer(phantom_data, parts, get_volume_preset("tiny"), cfg, text_encoder=str(tiny_text_encoder),
                      resume=True).run(max_steps=max_steps)
    b = _weights(parts)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    with pytest.raises(ValueError, match="mixed_precision.*fp16"):
        VolumeTrainConfig(mixed_precision="fp16")


def test_oversampled_texts_are_drawn_more_often(tmp_path, phantom_data, tiny_text_encoder, monkeypatch):
    """``oversample``: the UNet stage draws volumes whose text names the term about ``weight`` times as
    often (one normal study in six, weight 50: expected share 50/55); radsynth.json records the setting;
    a term in no text is refused."""
    import generator.volumes.training as vt

    drawn: list[torch.Tensor] = []
    real = vt.draw_records
    monkeypatch.setattr(vt, "draw_records", lambda g, n, b, w=None: drawn.append(real(g, n, b, w)) or drawn[-1])
    cfg = VolumeTrainConfig(**{**TINY_TRAIN, "vae_steps": 1, "unet_steps": 6, "unet_batch_size": 32},
                            oversample={"No Acute Findings": 50})
    VolumeTrainer(phantom_data, tmp_path / "m", get_volume_preset("tiny"), cfg, text_encoder=str(tiny_text_encoder)).run()
    idx = torch.cat(drawn)
    assert idx.numel() == 6 * 32
    share = np.mean(["no acute findings" in phantom_data.texts[int(i)] for i in idx])
    assert 0.8 < share < 0.98  # uniform draws: 1/6
    info = read_volume_info(tmp_path / "m")
    assert info["training"]["oversample"] == [["no acute findings", 50.0]]
    with pytest.raises(ValueError, match="'pleural effusion' is in none of the 6"):
        VolumeTrainer(phantom_data, tmp_path / "n", get_volume_preset("tiny"),
                      VolumeTrainConfig(**TINY_TRAIN, oversample=[["pleural effusion", 2]]),
                      text_encoder=str(tiny_text_encoder))


def _checkpoint_lacking(out, data, preset, cfg, encoder, section: str, field: str) -> None:
    """Train 2 steps into ``out``, then delete ``field`` from the checkpoint's ``section`` of state.json:
    a checkpoint written before that field existed."""
    VolumeTrainer(data, out, preset, cfg, text_encoder=str(encoder)).run(max_steps=2)
    state_json = out / "checkpoints" / "latest" / "state.json"
    state = json.loads(state_json.read_text())
    del state[section][field]
    state_json.write_text(json.dumps(state))


def test_checkpoint_from_before_a_config_field_resumes(tmp_path, phantom_data, tiny_text_encoder):
    """A checkpoint whose train_config lacks a field added since (here ``oversample``) resumes with the
    field's default, which is what the older version did (a mismatch would raise ValueError)."""
    preset, cfg = get_volume_preset("tiny"), VolumeTrainConfig(**TINY_TRAIN)
    out = tmp_path / "m"
    _checkpoint_lacking(out, phantom_data, preset, cfg, tiny_text_encoder, "train_config", "oversample")
    res = VolumeTrainer(phantom_data, out, preset, cfg, text_encoder=str(tiny_text_encoder), resume=True).run()
    assert res.finished and (res.vae_step, res.unet_step) == (6, 8)


def test_checkpoint_from_before_a_model_config_field_resumes(tmp_path, phantom_data, tiny_text_encoder):
    """A checkpoint whose model_config lacks a field added since (here ``pooled_text``) resumes with the
    field's default; a checkpoint whose model_config differs in a known field is still refused."""
    preset, cfg = get_volume_preset("tiny"), VolumeTrainConfig(**TINY_TRAIN)
    out = tmp_path / "m"
    _checkpoint_lacking(out, phantom_data, preset, cfg, tiny_text_encoder, "model_config", "pooled_text")
    with pytest.raises(ValueError, match="model_config differs"):
        VolumeTrainer(phantom_data, out, replace(preset, pooled_text=True), cfg,
                      text_encoder=str(tiny_text_encoder), resume=True)
    res = VolumeTrainer(phantom_data, out, preset, cfg, text_encoder=str(tiny_text_encoder), resume=True).run()
    assert res.finished and (res.vae_step, res.unet_step) == (6, 8)
