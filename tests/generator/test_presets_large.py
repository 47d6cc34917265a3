"""Resolution presets (cxr128, cxr256, cxr512): architecture, size, latent shapes, refusals; and the
general presets (tiny, small, base) unchanged."""

from __future__ import annotations

import pytest
import torch

from conditioning.attributes import ATTRIBUTE_DIM
from generator.models.build import build_unet, build_vae
from generator.models.config import PRESET_DOWNSAMPLING, PRESETS, TrainConfig, get_preset

#: The general presets as they were before the resolution presets existed (issue 9): the bundled demo
#: model and saved checkpoints rebuild their networks from these values.
UNCHANGED = {
    "tiny": {"preset": "tiny", "latent_size": 8, "latent_channels": 4, "vae_channels": (8, 16),
             "vae_layers_per_block": 1, "vae_mid_block_attention": False, "vae_kl_weight": 1e-06,
             "vae_ssim_weight": 0.0, "vae_lr": 0.001, "vae_batch_size": 8, "unet_channels": (16, 32),
             "unet_attention": (False, True), "unet_layers_per_block": 1, "unet_heads": 2, "unet_lr": 0.0005,
             "unet_batch_size": 8, "warmup_steps": 2, "norm_groups": 4, "prediction_type": "epsilon",
             "min_snr_gamma": 5.0, "prompt_dropout": 0.1, "ema_decay": 0.999, "text_augment": True, "attribute_conditioning": False,
             "vae_share": 0.25, "vae_steps": 20, "unet_steps": 20, "checkpoint_every": 10},
    "small": {"preset": "small", "latent_size": 16, "latent_channels": 4, "vae_channels": (16, 32, 64),
              "vae_layers_per_block": 1, "vae_mid_block_attention": False, "vae_kl_weight": 1e-06,
              "vae_ssim_weight": 0.2, "vae_lr": 0.001, "vae_batch_size": 32, "unet_channels": (64, 128, 128),
              "unet_attention": (False, True, True), "unet_layers_per_block": 1, "unet_heads": 8,
              "unet_lr": 0.0005, "unet_batch_size": 32, "warmup_steps": 100, "norm_groups": 16,
              "prediction_type": "epsilon", "min_snr_gamma": 5.0, "prompt_dropout": 0.1, "ema_decay": 0.999,
              "text_augment": True, "attribute_conditioning": False, "vae_share": 0.25, "vae_steps": 1500, "unet_steps": 6000,
              "checkpoint_every": 500},
    "base": {"preset": "base", "latent_size": 32, "latent_channels": 4, "vae_channels": (64, 128, 256, 256),
             "vae_layers_per_block": 2, "vae_mid_block_attention": True, "vae_kl_weight": 1e-06,
             "vae_ssim_weight": 0.2, "vae_lr": 0.0005, "vae_batch_size": 16, "unet_channels": (128, 256, 512, 512),
             "unet_attention": (False, True, True, True), "unet_layers_per_block": 2, "unet_heads": 8,
             "unet_lr": 0.0001, "unet_batch_size": 32, "warmup_steps": 500, "norm_groups": 32,
             "prediction_type": "epsilon", "min_snr_gamma": 5.0, "prompt_dropout": 0.1, "ema_decay": 0.999,
             "text_augment": True, "attribute_conditioning": False, "vae_share": 0.25, "vae_steps": 20000, "unet_steps": 100000,
             "checkpoint_every": 2000},
}

#: preset -> (resolution, VAE block channels, latent side, VAE params range, UNet params range with a
#: 384-wide text encoder), written out so that a preset edited by accident fails here.
EXPECTED = {
    "cxr128": (128, (64, 128, 256), 32, (12e6, 16e6), (22e6, 29e6)),
    "cxr256": (256, (64, 128, 256, 256), 32, (19e6, 23e6), (58e6, 72e6)),
    "cxr512": (512, (64, 128, 256, 256), 64, (19e6, 23e6), (93e6, 114e6)),
}
TEXT_WIDTH = 384  # MiniLM, the packaged text encoder


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(UNCHANGED))
def test_general_presets_unchanged(name):
    assert PRESETS[name].to_dict() == {**UNCHANGED[name], "oversample": ()}  # a later field, uniform draws
    assert get_preset(name) is PRESETS[name]
    assert TrainConfig.from_dict(UNCHANGED[name]) == PRESETS[name]  # radsynth.json from before the field


def test_resolution_presets_are_all_tested():
    assert sorted(PRESET_DOWNSAMPLING) == sorted(EXPECTED)
    assert set(PRESETS) == set(UNCHANGED) | set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_builds_at_its_resolution(name):
    res, blocks, side, vae_range, unet_range = EXPECTED[name]
    cfg = get_preset(name)
    assert cfg.preset == name and cfg.latent_channels == 4 and cfg.latent_size == side
    assert res == side * PRESET_DOWNSAMPLING[name]
    assert cfg.vae_block_channels(res) == blocks
    vae = build_vae(cfg, res)
    assert tuple(vae.config.block_out_channels) == blocks and vae.config.latent_channels == 4
    assert 2 ** (len(blocks) - 1) == res // side  # the pipeline's vae_scale_factor
    unet = build_unet(cfg, TEXT_WIDTH)
    n_vae, n_unet = _count(vae), _count(unet)
    assert vae_range[0] <= n_vae <= vae_range[1], n_vae
    assert unet_range[0] <= n_unet <= unet_range[1], n_unet
    # A config round-trips through radsynth.json's dict form.
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # One denoising forward at the preset's latent shape (batch 1).
    torch.manual_seed(0)
    z = torch.randn(1, 4, side, side)
    with torch.no_grad():
        labels = torch.zeros(1, ATTRIBUTE_DIM) if cfg.attribute_conditioning else None
        out = unet.eval()(z, torch.tensor([500]), encoder_hidden_states=torch.randn(1, 6, TEXT_WIDTH),
                          class_labels=labels).sample
    assert out.shape == (1, 4, side, side) and torch.isfinite(out).all()


def test_cxr128_vae_round_trip_shapes():
    """The full-width VAE at its resolution: (1, 1, 128, 128) -> (1, 4, 32, 32) -> (1, 1, 128, 128)."""
    torch.manual_seed(0)
    vae = build_vae(get_preset("cxr128"), 128).eval()
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 1, 128, 128) * 2 - 1).latent_dist.mean
        x = vae.decode(z).sample
    assert z.shape == (1, 4, 32, 32) and x.shape == (1, 1, 128, 128) and torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["cxr256", "cxr512"])
def test_f8_vae_at_reduced_width(name):
    """256 / 512 px through the preset's VAE layout (4 blocks, f=8, mid attention) with narrow channels,
    so that it runs on one CPU thread in about a second (the full-width VAE: ~2 s / ~8 s a forward)."""
    res, _, side, _, _ = EXPECTED[name]
    cfg = get_preset(name, vae_channels=(8, 16, 32, 32), norm_groups=8)
    torch.manual_seed(0)
    vae = build_vae(cfg, res).eval()
    assert len(vae.config.block_out_channels) == 4 and vae.config.mid_block_add_attention
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 1, res, res) * 2 - 1).latent_dist.mean
        x = vae.decode(z).sample
    assert z.shape == (1, 4, side, side) and x.shape == (1, 1, res, res) and torch.isfinite(x).all()


@pytest.mark.parametrize("name, resolution, hint", [
    ("cxr256", 512, "preset 'cxr512' is made for 512 px"),
    ("cxr512", 256, "preset 'cxr256' is made for 256 px"),
    ("cxr128", 256, "preset 'cxr256' is made for 256 px"),
    ("cxr256", 128, "preset 'cxr128' is made for 128 px"),
    ("cxr512", 1024, "allowed resolutions: 512$"),
    ("cxr128", 64, "allowed resolutions: 128$"),
])
def test_resolution_preset_refuses_other_resolutions(name, resolution, hint):
    cfg = get_preset(name)
    allowed = cfg.latent_size * PRESET_DOWNSAMPLING[name]
    pattern = rf"preset '{name}' is for {allowed} px images only .*got resolution {resolution}"
    with pytest.raises(ValueError, match=pattern):
        cfg.vae_block_channels(resolution)
    with pytest.raises(ValueError, match=hint):
        build_vae(cfg, resolution)


def test_general_presets_still_take_any_power_of_two_multiple():
    assert PRESETS["small"].vae_block_channels(32) == (16, 32)
    assert PRESETS["small"].vae_block_channels(128) == (16, 32, 64, 64)
    assert PRESETS["base"].vae_block_channels(512) == (64, 128, 256, 256, 256)
    with pytest.raises(ValueError, match="latent_size \\(16\\) times a power of two"):
        PRESETS["small"].vae_block_channels(48)


def test_overridden_latent_size_keeps_the_downsampling():
    cfg = get_preset("cxr128", latent_size=16)
    assert cfg.vae_block_channels(64) == (64, 128, 256)  # f=4 at 64 px
    with pytest.raises(ValueError, match="for 64 px images only"):
        cfg.vae_block_channels(128)


def test_misspelled_preset_suggests():
    with pytest.raises(ValueError, match="did you mean 'cxr256'"):
        get_preset("cxr265")
