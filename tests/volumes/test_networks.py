"""The 3D networks: channels-last weights on CPU, and the UNet with a pooled text path."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from generator.volumes.models import (
    PooledTextUNet,
    build_unet,
    build_vae,
    get_volume_preset,
    to_fast_layout,
)

from .conftest import TINY_TRAIN


def _inputs(cfg, batch=2, tokens=5, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, cfg.latent_channels, 8, 8, 8, generator=g)
    t = torch.tensor([10, 700][:batch])
    ctx = torch.randn(batch, tokens, dim, generator=g)
    return z, t, ctx


def test_fast_layout_is_channels_last_on_cpu_only_and_gives_the_same_outputs():
    cfg = get_volume_preset("tiny")
    torch.manual_seed(0)
    unet, vae = build_unet(cfg, 32).eval(), build_vae(cfg).eval()
    z, t, ctx = _inputs(cfg)
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        ref_u, ref_v = unet(z, timesteps=t, context=ctx), vae.decode(vae.encode(x)[0])
        kernel = next(p for p in unet.parameters() if p.dim() == 5)
        assert kernel.is_contiguous()
        assert to_fast_layout(unet, "cuda") is unet and kernel.is_contiguous()  # only CPUs are converted
        assert to_fast_layout(unet, torch.device("cpu")) is unet
        assert kernel.is_contiguous(memory_format=torch.channels_last_3d) and not kernel.is_contiguous()
        to_fast_layout(vae, "cpu")
        out_u, out_v = unet(z, timesteps=t, context=ctx), vae.decode(vae.encode(x)[0])
    torch.testing.assert_close(out_u, ref_u, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_v, ref_v, atol=1e-5, rtol=1e-4)


def test_pooled_text_unet_starts_as_the_plain_unet_and_then_reads_the_mean_text_state():
    cfg = replace(get_volume_preset("tiny"), pooled_text=True)
    torch.manual_seed(0)
    pooled = build_unet(cfg, 32).eval()
    assert isinstance(pooled, PooledTextUNet)
    assert pooled.class_embedding.weight.abs().sum() == 0
    _randomise(pooled)  # a fresh MONAI UNet outputs zeros (its last convolution starts at zero)
    torch.nn.init.zeros_(pooled.class_embedding.weight)
    torch.nn.init.zeros_(pooled.class_embedding.bias)
    plain = build_unet(replace(cfg, pooled_text=False), 32).eval()
    assert type(plain) is not PooledTextUNet
    missing, unexpected = plain.load_state_dict(pooled.state_dict(), strict=False)
    assert not missing and unexpected == ["class_embedding.weight", "class_embedding.bias"]
    z, t, ctx = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(pooled(z, timesteps=t, context=ctx), plain(z, timesteps=t, context=ctx))
        torch.nn.init.normal_(pooled.class_embedding.weight)
        moved = pooled(z, timesteps=t, context=ctx)
        assert (moved - plain(z, timesteps=t, context=ctx)).abs().max() > 1e-3
        # the pooled path depends on the prompt's mean state: shifting every token moves the output
        # even with cross-attention switched off (a UNet without attention levels)
        no_attn = _randomise(PooledTextUNet(**{**_kwargs(cfg), "attention_levels": [False, False]}).eval())
        a = no_attn(z, timesteps=t, context=ctx)
        b = no_attn(z, timesteps=t, context=ctx + 1.0)
        assert (a - b).abs().max() > 1e-3


def _randomise(net):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def _kwargs(cfg):
    from generator.volumes.models import unet_kwargs

    return unet_kwargs(cfg, 32)


def test_pooled_text_unet_refuses_bad_use():
    cfg = replace(get_volume_preset("tiny"), pooled_text=True)
    unet = build_unet(cfg, 32)
    z, t, ctx = _inputs(cfg)
    with pytest.raises(ValueError, match="needs context"):
        unet(z, timesteps=t)
    with pytest.raises(ValueError, match="class_labels"):
        unet(z, timesteps=t, context=ctx, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="with_conditioning"):
        PooledTextUNet(**{**_kwargs(cfg), "with_conditioning": False, "cross_attention_dim": None})
    with pytest.raises(ValueError, match="num_class_embeds"):
        PooledTextUNet(**_kwargs(cfg), num_class_embeds=3)


def test_pooled_text_model_trains_saves_loads_and_samples(tmp_path, phantom_data, tiny_text_encoder):
    from generator.volumes.model_folder import load_volume_model
    from generator.volumes.pipeline import VolumePipeline
    from generator.volumes.training import VolumeTrainConfig, VolumeTrainer

    cfg = replace(get_volume_preset("tiny"), pooled_text=True)
    out = tmp_path / "m"
    res = VolumeTrainer(phantom_data, out, cfg, VolumeTrainConfig(**TINY_TRAIN), text_encoder=str(tiny_text_encoder)).run()
    assert res.finished
    info = json.loads((out / "radsynth.json").read_text())
    assert info["config"]["pooled_text"] is True
    assert json.loads((out / "unet" / "config.json").read_text())["_class_name"] == "PooledTextUNet"
    model = load_volume_model(out)
    assert isinstance(model.unet, PooledTextUNet)
    assert model.unet.class_embedding.weight.abs().sum() > 0  # the projection trained away from zero
    pipe = VolumePipeline.from_pretrained(out)
    vols = pipe(["chest CT"], num_inference_steps=2, seeds=[1]).volumes
    assert vols.shape == (1, 16, 16, 16) and torch.isfinite(torch.as_tensor(vols)).all()

    # a folder whose parts disagree is refused, naming the file
    cfg_path = out / "unet" / "config.json"
    unet_cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**unet_cfg, "_class_name": "DiffusionModelUNet"}))
    with pytest.raises(ValueError, match="do not fit the DiffusionModelUNet"):
        load_volume_model(out)
    cfg_path.write_text(json.dumps(unet_cfg))
    info["config"]["pooled_text"] = False
    (out / "radsynth.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="pooled_text=False"):
        load_volume_model(out)


def test_saving_a_unet_of_another_class_than_the_config_builds_is_refused(tmp_path):
    from generator.volumes.model_folder import save_volume_model
    from generator.volumes.models import build_noise_scheduler

    cfg = get_volume_preset("tiny")
    info = {"shape": [16, 16, 16], "spacing": [1.0, 1.0, 1.0], "intensity": {}, "modality": "CT",
            "scaling_factor": 1.0}
    with pytest.raises(ValueError, match="must be a PooledTextUNet"):
        save_volume_model(tmp_path / "m", vae=build_vae(cfg), unet=build_unet(cfg, 32),
                          scheduler=build_noise_scheduler(cfg), config=replace(cfg, pooled_text=True), info=info)
    assert not any((tmp_path / "m").iterdir())  # nothing half-written
