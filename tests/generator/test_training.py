"""Two-stage training: outputs, determinism, resume, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from generator.models.config import TrainConfig, get_preset
from generator.data import load_dataset
from generator._utils import bf16_supported, resolve_mixed_precision
from generator.training import Trainer, _step_generator


def _weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(next((folder / part).glob("*.safetensors")))


def _train(data_dir, out, enc, **kw):
    data = load_dataset(data_dir, resolution=16, progress=False)
    kw.setdefault("max_steps", 6)
    return Trainer(data, out, get_preset("tiny", checkpoint_every=2), resolution=16,
                   text_encoder=str(enc), seed=0, progress=False, **kw).run()


def test_model_folder_layout(tiny_model: Path):
    for part in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model / part).is_dir(), part
    assert list((tiny_model / "unet").glob("*.safetensors"))
    assert not list(tiny_model.rglob("*.bin")) and not list(tiny_model.rglob("*.pt"))
    info = json.loads((tiny_model / "radsynth.json").read_text())
    assert info["resolution"] == 16 and info["channels"] == 1
    assert info["intensity"]["kind"] == "png8"
    assert info["data"]["num_images"] == 24 and len(info["data"]["fingerprint"]) == 64
    assert info["training"]["steps"] == {"vae": 6, "unet": 6}
    assert TrainConfig.from_dict(info["train_config"]) == get_preset("tiny")
    assert "No training image" in (tiny_model / "README.md").read_text()
    assert not (tiny_model / "checkpoints").exists()
    vae_cfg = json.loads((tiny_model / "vae" / "config.json").read_text())
    assert vae_cfg["in_channels"] == 1 and vae_cfg["scaling_factor"] != 0.18215
    rows = list(csv.DictReader(open(tiny_model / "train_log.csv")))
    assert {r["stage"] for r in rows} == {"vae", "unet"}
    assert all(float(r["steps_per_s"]) > 0 for r in rows)


def test_no_training_pixels_in_model_folder(tiny_model: Path, square_data: Path):
    raw = (square_data / "img001.png").read_bytes()
    for f in tiny_model.rglob("*"):
        if f.is_file():
            assert raw[-200:] not in f.read_bytes()


def test_same_seed_same_weights(tmp_path, square_data, tiny_text_encoder):
    _train(square_data, tmp_path / "a", tiny_text_encoder, max_steps=3)
    _train(square_data, tmp_path / "b", tiny_text_encoder, max_steps=3)
    wa, wb = _weights(tmp_path / "a", "unet"), _weights(tmp_path / "b", "unet")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("stop_at", [("vae", 3), ("unet", 3)])
def test_resume_matches_uninterrupted(tmp_path, square_data, tiny_text_encoder, stop_at):
    _train(square_data, tmp_path / "full", tiny_text_encoder)

    def interrupt(stage, step):
        if (stage, step) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(square_data, tmp_path / "cut", tiny_text_encoder, step_hook=interrupt)
    ckpts = [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()]
    assert f"{stop_at[0]}-2" in ckpts  # the last checkpoint before the interruption
    seen = []
    _train(square_data, tmp_path / "cut", tiny_text_encoder, resume=True,
           step_hook=lambda s, n: seen.append((s, n)))
    assert seen[0] == (stop_at[0], 3)  # continued from step 2's checkpoint, not from 0
    for part in ("vae", "unet"):
        full, cut = _weights(tmp_path / "full", part), _weights(tmp_path / "cut", part)
        for k in full:
            torch.testing.assert_close(cut[k], full[k], rtol=0, atol=1e-6, msg=f"{part}.{k}")


def test_time_budget_refits_after_a_slow_start(tmp_path, square_data, tiny_text_encoder):
    """The first 20 UNet steps are slow (another job held the cores): the first fit of the schedule
    expects few steps, the next fits see the real speed, and the run uses its budget instead of ending
    seconds early."""
    import time as _time

    data = load_dataset(square_data, resolution=16, progress=False)
    slow = lambda stage, step: _time.sleep(0.15) if stage == "unet" and step <= 20 else None  # noqa: E731
    trainer = Trainer(data, tmp_path / "m", get_preset("tiny"), resolution=16, text_encoder=str(tiny_text_encoder),
                      max_minutes=0.2, progress=False, mixed_precision="no", step_hook=slow)
    t0 = _time.monotonic()
    res = trainer.run()
    elapsed = _time.monotonic() - t0
    # a single fit after the slow start (~6 steps/s) plans too few steps and stops ~3 s early
    assert elapsed >= 0.2 * 60 - 1.0, (elapsed, res.steps)


def test_time_budget_stops(tmp_path, square_data, tiny_text_encoder):
    data = load_dataset(square_data, resolution=16, progress=False)
    cfg = get_preset("tiny")
    budget = 0.05 * 60.0  # seconds
    res = Trainer(data, tmp_path / "m", cfg, resolution=16, text_encoder=str(tiny_text_encoder),
                  max_minutes=0.05, progress=False, mixed_precision="no").run()
    assert res.steps["vae"] >= 1 and res.steps["unet"] >= 1
    # the clock ended the VAE stage at its deadline: it used its share of the budget (a step count would
    # have stopped it early) and overran it by at most a few steps
    vae_step = res.seconds["vae"] / res.steps["vae"]
    assert budget * cfg.vae_share - 0.5 <= res.seconds["vae"] <= budget * cfg.vae_share + 3 * vae_step + 1.0
    assert (tmp_path / "m" / "model_index.json").is_file()


@pytest.mark.parametrize("kw, msg", [
    ({"max_minutes": 0}, "max_minutes must be a finite number in \\(0, 1e6\\], got 0"),
    ({"max_minutes": float("nan")}, "max_minutes must be a finite number in \\(0, 1e6\\], got nan"),
    ({"max_minutes": float("inf")}, "max_minutes must be a finite number in \\(0, 1e6\\], got inf"),
    ({"max_steps": 0}, "max_steps must be an integer >= 1, got 0"),
    ({"max_steps": 2.5}, "max_steps must be an integer >= 1, got 2.5"),
    ({"seed": -1}, r"seed must be an integer in \[0, 4294967295\], got -1"),
    ({"seed": 2**64}, r"seed must be an integer in \[0, 4294967295\], got 18446744073709551616"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1, got 0"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of .*, got 'fp8'"),
    ({"save_dtype": torch.int8}, "save_dtype must be"),
    ({"resolution": 24}, "resolution 24"),
])
def test_bad_arguments(tmp_path, square_data, kw, msg):
    data = load_dataset(square_data, resolution=16, progress=False)
    kw.setdefault("resolution", 16)
    with pytest.raises(ValueError, match=msg):
        Trainer(data, tmp_path / "m", get_preset("tiny"), **kw)


def test_preset_errors():
    with pytest.raises(ValueError, match="did you mean 'small'"):
        get_preset("smal")
    with pytest.raises(ValueError, match="prediction_type"):
        get_preset("tiny", prediction_type="x0")
    assert get_preset("small").vae_block_channels(64) == (16, 32, 64)
    assert get_preset("small").vae_block_channels(128) == (16, 32, 64, 64)


def test_trainer_is_valid_once_constructed(tmp_path, square_data, tiny_text_encoder):
    data = load_dataset(square_data, resolution=16, progress=False)
    t = Trainer(data, tmp_path / "m", get_preset("tiny"), resolution=16, text_encoder=str(tiny_text_encoder),
                progress=False)
    assert not (tmp_path / "m").exists()  # constructing writes nothing
    assert t.log.path == tmp_path / "m" / "train_log.csv" and t.run_start > 0
    assert t.noise_scheduler.config.num_train_timesteps == 1000
    assert t.mixed_precision == resolve_mixed_precision("auto", torch.device("cpu"))
    info = t.model_info()  # usable before run()
    assert info["training"]["steps"] == {} and info["text_encoder"]["name"] == tiny_text_encoder.name
    assert info["train_config"]["vae_mid_block_attention"] is False


def test_mixed_precision_choice_recorded(tmp_path, tiny_model, square_data, tiny_text_encoder):
    data = load_dataset(square_data, resolution=16, progress=False)
    auto = Trainer(data, tmp_path / "m", get_preset("tiny"), resolution=16, text_encoder=str(tiny_text_encoder),
                   progress=False).model_info()  # the default is "auto"
    expected = "bf16" if bf16_supported(torch.device("cpu")) else "no"
    assert auto["training"]["mixed_precision"] == expected
    assert auto["training"]["mixed_precision_requested"] == "auto"
    info = json.loads((tiny_model / "radsynth.json").read_text())  # the fixture asks for fp32 explicitly
    assert info["training"]["mixed_precision"] == "no" and info["training"]["mixed_precision_requested"] == "no"


def test_resolve_mixed_precision():
    cpu = torch.device("cpu")
    assert resolve_mixed_precision("no", cpu) == "no"
    assert resolve_mixed_precision("auto", cpu) == ("bf16" if bf16_supported(cpu) else "no")
    assert resolve_mixed_precision("auto", torch.device("mps")) == "no"
    with pytest.raises(ValueError, match="mixed_precision 'bf16' needs a device with native bfloat16"):
        resolve_mixed_precision("bf16", torch.device("mps"))
    with pytest.raises(ValueError, match="got 'half'"):
        resolve_mixed_precision("half", cpu)


def test_large_seeds_give_distinct_generators():
    a = torch.rand(3, generator=_step_generator(2**32 - 1, "unet", 10**6, 63))
    b = torch.rand(3, generator=_step_generator(2**32 - 2, "unet", 10**6, 63))
    assert not torch.equal(a, b)
    # small seeds keep the values they always had
    assert _step_generator(0, "vae", 3, 0).initial_seed() == ((0 * 1_000_003 + 1) * 1_000_033 + 3) * 64


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="no native bfloat16 on this CPU")
def test_fp32_and_bf16_runs_in_one_process(tmp_path, square_data, tiny_text_encoder):
    _train(square_data, tmp_path / "fp32", tiny_text_encoder, max_steps=2, mixed_precision="no")
    _train(square_data, tmp_path / "bf16", tiny_text_encoder, max_steps=2, mixed_precision="bf16")
    for name in ("fp32", "bf16"):
        info = json.loads((tmp_path / name / "radsynth.json").read_text())
        assert info["training"]["mixed_precision"] == {"fp32": "no", "bf16": "bf16"}[name]
    a, b = _weights(tmp_path / "fp32", "unet"), _weights(tmp_path / "bf16", "unet")
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < gap < 1e-2  # bf16 autocast really ran, and trained the same model
