"""Builders for the two networks and the noise schedulers, from a :class:`TrainConfig`.

The VAE is a single-channel ``diffusers.AutoencoderKL``; the denoiser a
``diffusers.UNet2DConditionModel`` with cross-attention on text-encoder hidden states. Sampling
schedulers are in :mod:`generator.models.samplers`.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from generator.models.config import TrainConfig

def build_vae(cfg: TrainConfig, resolution: int, channels: int = 1) -> AutoencoderKL:
    """A fresh VAE mapping ``(B, channels, resolution, resolution)`` images in ``[-1, 1]`` to
    ``(B, cfg.latent_channels, cfg.latent_size, cfg.latent_size)`` latents."""
    blocks = cfg.vae_block_channels(resolution)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(cfg.norm_groups, blocks[0]),
        sample_size=resolution,
        mid_block_add_attention=cfg.vae_mid_block_attention,
    )


def build_unet(cfg: TrainConfig, cross_attention_dim: int) -> UNet2DConditionModel:
    """A fresh denoiser over ``(B, latent_channels, latent_size, latent_size)`` latents,
    cross-attending to ``(B, L, cross_attention_dim)`` text hidden states."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_attention))
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=cfg.norm_groups,
    )


def build_noise_scheduler(cfg: TrainConfig) -> DDPMScheduler:
    """The training noise schedule (1000 steps, scaled-linear betas as in Stable Diffusion)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )
