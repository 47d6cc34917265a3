"""What a shared model folder may say and do: no paths of the training machine in it, and loading
never follows a path or hub id written in radsynth.json; architecture flags are config fields."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conditioning.text_encoder import DEFAULT_TEXT_ENCODER
from generator.demo import DEMO_MODEL_DIR
from generator.models.build import build_vae
from generator.models.config import PRESETS, TrainConfig, get_preset
from generator.models.model_folder import (
    absolute_paths,
    load_pipeline,
    save_model_folder,
    state_dict_hash,
    text_encoder_name,
)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _other_encoder(folder: Path, like: Path) -> Path:
    """A copy of the tiny encoder at ``like`` with different weights."""
    from transformers import AutoModel

    shutil.copytree(like, folder)
    model = AutoModel.from_pretrained(like)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _without_encoder(src: Path, dst: Path, text_encoder: dict) -> Path:
    """Copy of a model folder with no text_encoder/ and tokenizer/ and the given radsynth.json entry."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "text_encoder")
    shutil.rmtree(dst / "tokenizer")
    index = json.loads((dst / "model_index.json").read_text())
    index["text_encoder"] = index["tokenizer"] = [None, None]
    (dst / "model_index.json").write_text(json.dumps(index))
    info = json.loads((dst / "radsynth.json").read_text())
    info["text_encoder"] = text_encoder
    (dst / "radsynth.json").write_text(json.dumps(info))
    return dst


def test_no_absolute_path_in_model_folder(tiny_model, tiny_text_encoder, square_data):
    info = json.loads((tiny_model / "radsynth.json").read_text())
    assert info["text_encoder"] == {"name": tiny_text_encoder.name, "sha256": info["text_encoder"]["sha256"],
                                    "hidden_size": 16}
    assert len(info["text_encoder"]["sha256"]) == 64
    for f in tiny_model.rglob("*"):
        if f.suffix in (".json", ".md", ".csv", ".txt"):
            text = f.read_text()
            for path in (tiny_text_encoder, square_data, tiny_model, Path.home()):
                assert str(path) not in text, (f, path)
            if f.suffix == ".json":
                assert absolute_paths(json.loads(text)) == [], f


def test_recorded_hash_is_the_folder_encoder(tiny_model):
    pipe, info = load_pipeline(tiny_model, device="cpu")
    assert state_dict_hash(pipe.text_encoder) == info.raw["text_encoder"]["sha256"]


def test_paths_in_radsynth_json_are_never_followed(tmp_path, tiny_model, tiny_text_encoder):
    other = _other_encoder(tmp_path / "other_encoder", tiny_text_encoder)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    info = json.loads((copy / "radsynth.json").read_text())
    info["text_encoder"] = {"name_or_path": str(other), "resolved": str(other), "name": str(other)}
    (copy / "radsynth.json").write_text(json.dumps(info))
    pipe, _ = load_pipeline(copy, device="cpu")
    own, _ = load_pipeline(tiny_model, device="cpu")
    assert state_dict_hash(pipe.text_encoder) == state_dict_hash(own.text_encoder)
    from transformers import AutoModel

    assert state_dict_hash(pipe.text_encoder) != state_dict_hash(AutoModel.from_pretrained(other))

    # a folder without its encoder: a recorded path or a foreign "packaged" name is refused...
    bare = _without_encoder(tiny_model, tmp_path / "bare", {"name_or_path": str(other)})
    with pytest.raises(ValueError, match="no text_encoder/ and tokenizer/ and names no packaged text encoder"):
        load_pipeline(bare, device="cpu")
    evil = _without_encoder(tiny_model, tmp_path / "evil", {"packaged": str(other)})
    with pytest.raises(ValueError, match=f"names the packaged text encoder .*only '{DEFAULT_TEXT_ENCODER}'"):
        load_pipeline(evil, device="cpu")
    # ...and the user's explicit choice is used (here: the right one, so the images match)
    mine, _ = load_pipeline(bare, device="cpu", text_encoder=str(tiny_text_encoder))
    a = mine(["bright square"], seeds=[3], num_inference_steps=3).images
    b = own(["bright square"], seeds=[3], num_inference_steps=3).images
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_explicit_encoder_must_fit_the_unet(tiny_model):
    with pytest.raises(ValueError, match="hidden size 384, but the UNet .* cross-attends to 16"):
        load_pipeline(tiny_model, device="cpu", text_encoder=DEFAULT_TEXT_ENCODER)


def test_planted_pickles_in_model_folder_are_not_loaded(tmp_path, tiny_model):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), copy / "unet" / "diffusion_pytorch_model.bin")
    torch.save(_Payload(marker), copy / "text_encoder" / "pytorch_model.bin")
    pipe, _ = load_pipeline(copy, device="cpu")
    assert not marker.exists()
    assert pipe(["dark field"], seeds=[1], num_inference_steps=2).images.shape == (1, 16, 16)
    # with the safetensors gone, the pickle is still not loaded: the folder is refused
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="cannot be loaded: .*diffusion_pytorch_model.safetensors"):
        load_pipeline(copy, device="cpu")
    assert not marker.exists()


def test_demo_model_still_loads():
    pipe, info = load_pipeline(DEMO_MODEL_DIR, device="cpu")
    cfg = TrainConfig.from_dict(info.raw["train_config"])  # (configs older than a field: next test)
    assert cfg.vae_mid_block_attention is False
    rebuilt = build_vae(cfg, info.resolution)
    assert rebuilt.config.mid_block_add_attention == pipe.vae.config.mid_block_add_attention
    assert set(rebuilt.state_dict()) == set(pipe.vae.state_dict())
    images = pipe(["frontal chest radiograph, no acute findings"], seeds=[0], num_inference_steps=2).images
    assert images.shape == (1, 64, 64) and np.isfinite(images).all()


def test_mid_block_attention_is_a_config_field():
    base = PRESETS["base"]
    sizes = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "preset"}
    small_as_base = get_preset("small", **sizes)
    assert dataclasses.replace(small_as_base, preset="base") == base
    a, b = build_vae(small_as_base, 64), build_vae(base, 64)
    assert dict(a.config) == dict(b.config)
    assert set(a.state_dict()) == set(b.state_dict())
    assert any("mid_block.attentions" in k for k in a.state_dict())
    no_attn = build_vae(dataclasses.replace(base, vae_mid_block_attention=False), 64)
    assert not any("mid_block.attentions" in k for k in no_attn.state_dict())
    # configs saved before the field existed keep the architecture their preset name gave them
    legacy = {k: v for k, v in base.to_dict().items() if k != "vae_mid_block_attention"}
    assert TrainConfig.from_dict(legacy).vae_mid_block_attention is True
    assert TrainConfig.from_dict({**legacy, "preset": "small"}).vae_mid_block_attention is False
    assert TrainConfig.from_dict(base.to_dict()) == base
    with pytest.raises(ValueError, match="vae_mid_block_attention must be True or False, got 1"):
        get_preset("small", vae_mid_block_attention=1)


def test_model_folder_records_the_field(tiny_model):
    info = json.loads((tiny_model / "radsynth.json").read_text())
    assert info["train_config"]["vae_mid_block_attention"] is False
    assert json.loads((tiny_model / "vae" / "config.json").read_text())["mid_block_add_attention"] is False


def test_text_encoder_name(tmp_path):
    assert text_encoder_name(None) == DEFAULT_TEXT_ENCODER
    assert text_encoder_name(DEFAULT_TEXT_ENCODER) == DEFAULT_TEXT_ENCODER
    (tmp_path / "encoders" / "minilm").mkdir(parents=True)
    assert text_encoder_name(str(tmp_path / "encoders" / "minilm")) == "minilm"
    assert text_encoder_name("org/model") == "org/model"
    with pytest.raises(ValueError, match="text_encoder '/no/such/encoder' is a path that does not exist"):
        text_encoder_name("/no/such/encoder")


def test_save_refuses_absolute_paths(tmp_path, tiny_model):
    pipe, info = load_pipeline(tiny_model, device="cpu")
    with pytest.raises(ValueError, match=r"absolute paths .* found at data\.source, extra\[1\]"):
        save_model_folder(pipe, tmp_path / "out", info={**info.raw, "data": {"source": "/home/me/data"},
                                                         "extra": ["ok", "C:\\data"]}, card="")
    assert not (tmp_path / "out").exists()


def test_model_folder_files_get_the_umask_mode(tiny_model):
    """Weights are shareable like the other files (safetensors alone would write them 0o600)."""
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    modes = {p.relative_to(tiny_model).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in tiny_model.rglob("*") if p.is_file()}
    assert any(k.endswith(".safetensors") for k in modes)
    assert all(m == 0o666 & ~mask for m in modes.values()), modes



def test_saved_local_paths_are_dropped_relative_ones_too(tmp_path, monkeypatch):
    """``_name_or_path`` naming a folder of the training machine goes (absolute, or relative as after
    ``--init-from generator/demo_model``); a hub id stays."""
    import json

    from generator.models.model_folder import _drop_saved_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "src" / "unet").mkdir(parents=True)
    folder = tmp_path / "out"
    for part, value in (("unet", "src/unet"), ("vae", str(tmp_path / "src")), ("text_encoder", "owner/model")):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps({"_name_or_path": value, "x": 1}))
    _drop_saved_paths(folder)
    read = lambda part: json.loads((folder / part / "config.json").read_text())  # noqa: E731
    assert read("unet") == {"x": 1} and read("vae") == {"x": 1}
    assert read("text_encoder") == {"_name_or_path": "owner/model", "x": 1}
