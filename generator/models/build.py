"""Builders for the two networks and the noise schedulers, from a :class:`TrainConfig`.

The VAE is a single-channel ``diffusers.AutoencoderKL``; the denoiser a
``diffusers.UNet2DConditionModel`` with cross-attention on text-encoder hidden states. Sampling
schedulers are in :mod:`generator.models.samplers`.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from conditioning.attributes import ATTRIBUTE_DIM
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
    cross-attending to ``(B, L, cross_attention_dim)`` text hidden states; with
    ``cfg.attribute_conditioning`` it also takes ``class_labels``, the ``(B, ATTRIBUTE_DIM)`` attribute
    vectors of :mod:`conditioning.attributes`, projected and added to the timestep embedding."""
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
        **(attribute_embedding_config() if cfg.attribute_conditioning else {}),
    )


def attribute_embedding_config() -> dict[str, object]:
    """``UNet2DConditionModel`` keyword arguments of the attribute-vector input (a projection class
    embedding of :data:`conditioning.attributes.ATTRIBUTE_DIM` values)."""
    return {"class_embed_type": "projection", "projection_class_embeddings_input_dim": ATTRIBUTE_DIM}


def takes_attributes(unet: UNet2DConditionModel) -> bool:
    """Whether ``unet`` was built to take attribute vectors as ``class_labels``.

    Raises:
        ValueError: it has a projection class embedding of another width (another attribute layout).
    """
    if unet.config.get("class_embed_type") != "projection":
        return False
    width = unet.config.get("projection_class_embeddings_input_dim")
    if width != ATTRIBUTE_DIM:
        raise ValueError(
            f"the UNet's class embedding takes {width} values, but this RadSynth's attribute vectors have "
            f"{ATTRIBUTE_DIM} (conditioning.attributes); the model comes from another version"
        )
    return True


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
