"""Checkpoints hold safetensors and JSON only; resume never unpickles anything and checks what it loads."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from generator.data import load_dataset
from generator.models.config import get_preset
from generator.training import Trainer

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this creates ``marker`` (what a planted checkpoint pickle could do with a shell)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _train(data_dir, out, enc, **kw):
    data = load_dataset(data_dir, resolution=16, progress=False)
    kw.setdefault("max_steps", 6)
    config = kw.pop("config", get_preset("tiny", checkpoint_every=2))
    return Trainer(data, out, config, resolution=16, text_encoder=str(enc), progress=False,
                   **{"seed": 0, "mixed_precision": "no", **kw}).run()


def _interrupted(tmp_path: Path, square_data, enc, stop_at=("unet", 3)) -> Path:
    def interrupt(stage, step):
        if (stage, step) == stop_at:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _train(square_data, out, enc, step_hook=interrupt)
    return out


def _weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(next((folder / part).glob("*.safetensors")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, square_data, tiny_text_encoder) -> Path:
    out = tmp_path_factory.mktemp("full")
    _train(square_data, out / "m", tiny_text_encoder)
    return out / "m"


def test_checkpoint_layout_is_safetensors_and_json(tmp_path, square_data, tiny_text_encoder):
    out = _interrupted(tmp_path, square_data, tiny_text_encoder)
    files = sorted(p.relative_to(out / "checkpoints").as_posix() for p in (out / "checkpoints").rglob("*")
                   if p.is_file())
    assert files == [
        "latents-mean.npy", "latents-std.npy", "latents.json",  # the latent cache (plain .npy, no pickle)
        "run.json", "text-embeds.json", "text-embeds.npy",  # prompt hidden states (memory-mapped) and their hashes
        "unet-2/ema.safetensors", "unet-2/model.safetensors", "unet-2/optimizer.safetensors", "unet-2/state.json",
        "vae-final/model.safetensors", "vae-final/state.json",
    ]
    state = json.loads((out / "checkpoints" / "unet-2" / "state.json").read_text())
    assert state["step"] == 2 and state["stage"] == "unet"
    assert state["scheduler"]["last_epoch"] == 2
    assert state["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    assert state["ema"]["optimization_step"] == 2
    opt = load_file(out / "checkpoints" / "unet-2" / "optimizer.safetensors")
    assert {k.split(".", 2)[2] for k in opt} == {"step", "exp_avg", "exp_avg_sq"}
    ema = load_file(out / "checkpoints" / "unet-2" / "ema.safetensors")
    model = load_file(out / "checkpoints" / "unet-2" / "model.safetensors")
    assert {k.removeprefix("shadow.") for k in ema} == set(model)  # one EMA tensor per parameter
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())  # no temp folders left


@pytest.mark.parametrize("stop_at", [("vae", 3), ("unet", 3)])
def test_planted_pickles_neither_run_nor_needed(tmp_path, square_data, tiny_text_encoder, uninterrupted, stop_at):
    out = _interrupted(tmp_path, square_data, tiny_text_encoder, stop_at)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()  # the payload works when something unpickles it
    planted = 0
    folders = [out / "checkpoints", *(p for p in (out / "checkpoints").iterdir() if p.is_dir())]
    for ckpt in folders:
        for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "pytorch_model.bin", "optimizer.bin",
                     "scheduler.bin", "model.pt"):
            if name.endswith(".pkl"):
                (ckpt / name).write_bytes(payload)
            else:
                torch.save(_Payload(marker), ckpt / name)
            planted += 1
    assert planted >= 12
    seen = []
    _train(square_data, out, tiny_text_encoder, resume=True, step_hook=lambda s, n: seen.append((s, n)))
    assert not marker.exists()
    assert seen[0] == (stop_at[0], 3)
    for part in ("vae", "unet"):
        full, cut = _weights(uninterrupted, part), _weights(out, part)
        for k in full:
            torch.testing.assert_close(cut[k], full[k], rtol=0, atol=1e-6, msg=f"{part}.{k}")


@pytest.mark.parametrize("victim", ["unet-2/optimizer.safetensors", "unet-2/model.safetensors",
                                    "unet-2/ema.safetensors", "vae-final/model.safetensors", "unet-2/state.json"])
def test_truncated_checkpoint_file_is_named(tmp_path, square_data, tiny_text_encoder, victim):
    out = _interrupted(tmp_path, square_data, tiny_text_encoder)
    path = out / "checkpoints" / victim
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=victim.split("/")[1].replace(".", r"\.")) as err:
        _train(square_data, out, tiny_text_encoder, resume=True)
    assert victim.split("/")[0] in str(err.value)


def test_altered_checkpoint_file_is_refused(tmp_path, square_data, tiny_text_encoder):
    out = _interrupted(tmp_path, square_data, tiny_text_encoder)
    path = out / "checkpoints" / "unet-2" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors.*SHA-256"):
        _train(square_data, out, tiny_text_encoder, resume=True)


@pytest.mark.parametrize("change, msg", [
    ({"seed": 1}, "seed: 0 in the checkpoints, 1 now"),
    ({"config": get_preset("tiny", checkpoint_every=2, unet_lr=1e-3)}, "unet_lr: 0.0005 in the checkpoints, 0.001 now"),
    ({"data": True}, "data differ"),
])
def test_resume_other_run_refused(tmp_path, square_data, tiny_text_encoder, change, msg):
    from tests.conftest import make_square_folder

    out = _interrupted(tmp_path, square_data, tiny_text_encoder)
    data_dir = make_square_folder(tmp_path / "other", seed=5) if change.pop("data", None) else square_data
    with pytest.raises(ValueError, match=msg):
        _train(data_dir, out, tiny_text_encoder, resume=True, **change)
    assert (out / "checkpoints" / "unet-2" / "state.json").is_file()  # nothing was deleted


def test_fresh_run_clears_stale_checkpoints(tmp_path, square_data, tiny_text_encoder):
    out = _interrupted(tmp_path, square_data, tiny_text_encoder)
    seen = []
    _train(square_data, out, tiny_text_encoder, max_steps=3, keep_checkpoints=True,
           step_hook=lambda s, n: seen.append((s, n)))
    assert seen[0] == ("vae", 1)  # started over
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["latents-mean.npy", "latents-std.npy", "latents.json", "run.json", "text-embeds.json", "text-embeds.npy",
                    "unet-2", "vae-final"]


def _unsafe_loads(tree: ast.AST) -> list[int]:
    """Lines of ``torch.load(...)`` without ``weights_only=True`` and of ``pickle.load(s)``."""
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        if name == "torch" and node.func.attr == "load":
            ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                     for k in node.keywords)
            if not ok:
                bad.append(node.lineno)
        if name in ("pickle", "dill", "cloudpickle") and node.func.attr in ("load", "loads", "Unpickler"):
            bad.append(node.lineno)
    return bad


def test_no_unsafe_deserialisation_in_the_code():
    found = {}
    for package in ("generator", "conditioning", "privacy", "exporters", "radsynth", "scripts"):
        for f in sorted((ROOT / package).rglob("*.py")):
            lines = _unsafe_loads(ast.parse(f.read_text(), filename=str(f)))
            if lines:
                found[f.relative_to(ROOT).as_posix()] = lines
    assert found == {}
    # the scanner itself finds what it should
    assert _unsafe_loads(ast.parse("torch.load(p)\ntorch.load(p, weights_only=True)\npickle.loads(b)")) == [1, 3]
