"""3D networks of the volume model: configuration, presets and builders.

MONAI's ``AutoencoderKL`` and ``DiffusionModelUNet`` with ``spatial_dims=3`` (diffusers has no
volumetric UNet); the UNet cross-attends to the frozen text encoder's hidden states
(``cross_attention_dim`` = the encoder's hidden size). The noise schedule is a diffusers
``DDPMScheduler`` (diffusers schedulers work on ``(B, C, d, h, w)`` latents unchanged).

Shapes: volumes ``(B, 1, D, H, W)`` in ``[-1, 1]`` enter the VAE; latents are
``(B, latent_channels, D/f, H/f, W/f)`` with ``f = 2 ** (len(vae_channels) - 1)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, TypeVar

import torch
from diffusers import DDPMScheduler
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from torch import nn

from generator._utils import look_up_option

__all__ = [
    "VolumeModelConfig",
    "VOLUME_PRESETS",
    "get_volume_preset",
    "build_vae",
    "build_unet",
    "build_noise_scheduler",
    "vae_kwargs",
    "unet_kwargs",
    "to_fast_layout",
    "PooledTextUNet",
    "UNET_CLASSES",
]

_Net = TypeVar("_Net", bound=nn.Module)


@dataclass(frozen=True)
class VolumeModelConfig:
    """Architecture and noise schedule of a 3D latent diffusion model (the saved config).

    Attributes:
        vae_channels: Channels per VAE level; ``len - 1`` halvings (factor ``f``).
        vae_res_blocks: Residual blocks per VAE level.
        latent_channels: Channels of the latent volume.
        vae_norm_groups: GroupNorm groups in the VAE (divides every ``vae_channels`` entry).
        unet_channels: Channels per UNet level.
        unet_res_blocks: Residual blocks per UNet level.
        unet_attention: Whether each UNet level has (self + cross) attention.
        unet_norm_groups: GroupNorm groups in the UNet (divides every ``unet_channels`` entry).
        num_head_channels: Channels per attention head.
        num_train_timesteps: Diffusion steps of the training schedule.
        beta_schedule: diffusers beta schedule name (``"scaled_linear"``, ``"linear"``, ...).
        beta_start: First beta.
        beta_end: Last beta.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        pooled_text: Also give the UNet the prompt as one vector: a learned projection of the mean of
            its text states added to the time embedding (:class:`PooledTextUNet`), so every residual
            block sees the prompt, not only the attention levels.

    Raises:
        ValueError: on construction, for inconsistent values (naming the field).
    """

    vae_channels: tuple[int, ...] = (16, 32)
    vae_res_blocks: int = 1
    latent_channels: int = 3
    vae_norm_groups: int = 8
    unet_channels: tuple[int, ...] = (32, 64)
    unet_res_blocks: int = 1
    unet_attention: tuple[bool, ...] = (False, True)
    unet_norm_groups: int = 8
    num_head_channels: int = 16
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "epsilon"
    pooled_text: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "vae_channels", tuple(int(c) for c in self.vae_channels))
        object.__setattr__(self, "unet_channels", tuple(int(c) for c in self.unet_channels))
        object.__setattr__(self, "unet_attention", tuple(bool(a) for a in self.unet_attention))
        for name, chans, groups in (("vae_channels", self.vae_channels, self.vae_norm_groups),
                                    ("unet_channels", self.unet_channels, self.unet_norm_groups)):
            if not chans or any(c < 1 or c % groups for c in chans):
                raise ValueError(f"{name} must be positive multiples of the norm groups ({groups}), got {chans}")
        if len(self.unet_attention) != len(self.unet_channels):
            raise ValueError(f"unet_attention needs one flag per unet_channels level ({len(self.unet_channels)}), "
                             f"got {self.unet_attention}")
        for c, att in zip(self.unet_channels, self.unet_attention):
            if att and c % self.num_head_channels:
                raise ValueError(f"num_head_channels={self.num_head_channels} must divide unet_channels {c}")
        if self.latent_channels < 1 or self.vae_res_blocks < 1 or self.unet_res_blocks < 1:
            raise ValueError("latent_channels, vae_res_blocks and unet_res_blocks must be >= 1, got "
                             f"{self.latent_channels}, {self.vae_res_blocks}, {self.unet_res_blocks}")
        look_up_option(self.prediction_type, ("epsilon", "v_prediction"), name="prediction_type")

    @property
    def vae_factor(self) -> int:
        """Voxels per latent cell along each axis."""
        return 2 ** (len(self.vae_channels) - 1)

    def latent_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
        """``(C, d, h, w)`` latent shape of a ``(D, H, W)`` volume.

        Raises:
            ValueError: a side not divisible by ``vae_factor * 2 ** (len(unet_channels) - 1)``.
        """
        f = self.vae_factor
        need = f * 2 ** (len(self.unet_channels) - 1)
        if any(s % need for s in shape):
            raise ValueError(f"shape {tuple(shape)} must be divisible by {need} on every axis "
                             f"(VAE factor {f} x UNet levels {len(self.unet_channels)})")
        return (self.latent_channels, *(s // f for s in shape))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VolumeModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them.

        Raises:
            ValueError: unknown keys.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown volume model config keys {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


#: Named configurations: ``tiny`` for tests (16^3, seconds); ``small`` for 32^3-64^3 CPU runs (VAE factor 4:
#: 8^3 latents at 32^3; about 1 s per UNet step of 16 latents on one core, scripts/bench_3d.py); ``lean``
#: for 32^3 masks and other small structures on CPU (VAE factor 2: 16^3x4 latents, so thin shapes survive
#: the autoencoder; a narrow 3-level UNet with attention only at the lowest level, 4^3; v-prediction;
#: about 0.5 s per UNet step of 8 latents on one core; sides a multiple of 8). Its training settings
#: (intensity-weighted VAE loss, min-SNR) are ``VolumeTrainConfig.for_preset("lean")``; recipe and
#: results on AdrenalMNIST3D in docs/volumes.md.
VOLUME_PRESETS: dict[str, VolumeModelConfig] = {
    "tiny": VolumeModelConfig(vae_channels=(4, 8), latent_channels=2, vae_norm_groups=4,
                              unet_channels=(8, 16), unet_attention=(False, True), unet_norm_groups=4,
                              num_head_channels=8),
    "small": VolumeModelConfig(vae_channels=(8, 16, 32), latent_channels=4, vae_norm_groups=8,
                               unet_channels=(32, 64, 64), unet_attention=(False, True, True), unet_norm_groups=8,
                               num_head_channels=32),
    "lean": VolumeModelConfig(vae_channels=(8, 16), latent_channels=4, vae_norm_groups=8,
                              unet_channels=(16, 32, 64), unet_attention=(False, False, True), unet_norm_groups=8,
                              num_head_channels=32, prediction_type="v_prediction"),
}


def get_volume_preset(name: str) -> VolumeModelConfig:
    """The preset ``name`` (``"tiny"``, ``"small"``, ``"lean"``).

    Raises:
        ValueError: unknown name, with a "did you mean".
    """
    return VOLUME_PRESETS[look_up_option(name, list(VOLUME_PRESETS), name="preset")]


def vae_kwargs(config: VolumeModelConfig) -> dict[str, Any]:
    """Constructor arguments of the MONAI ``AutoencoderKL`` (saved as ``vae/config.json``)."""
    n = len(config.vae_channels)
    return {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "num_res_blocks": [config.vae_res_blocks] * n,
            "channels": list(config.vae_channels), "attention_levels": [False] * n,
            "latent_channels": config.latent_channels, "norm_num_groups": config.vae_norm_groups,
            "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False}


def unet_kwargs(config: VolumeModelConfig, cross_attention_dim: int) -> dict[str, Any]:
    """Constructor arguments of the MONAI ``DiffusionModelUNet`` (saved as ``unet/config.json``).

    Raises:
        ValueError: ``cross_attention_dim`` < 1.
    """
    if int(cross_attention_dim) < 1:
        raise ValueError(f"cross_attention_dim must be >= 1, got {cross_attention_dim!r}")
    n = len(config.unet_channels)
    return {"spatial_dims": 3, "in_channels": config.latent_channels, "out_channels": config.latent_channels,
            "num_res_blocks": [config.unet_res_blocks] * n, "channels": list(config.unet_channels),
            "attention_levels": list(config.unet_attention), "norm_num_groups": config.unet_norm_groups,
            "num_head_channels": config.num_head_channels, "with_conditioning": True,
            "transformer_num_layers": 1, "cross_attention_dim": int(cross_attention_dim)}


def build_vae(config: VolumeModelConfig) -> AutoencoderKL:
    """A fresh 3D ``AutoencoderKL`` (1 channel in and out)."""
    return AutoencoderKL(**vae_kwargs(config))


class PooledTextUNet(DiffusionModelUNet):
    """MONAI's ``DiffusionModelUNet`` that also adds a projection of the prompt's mean text state to its
    time embedding: a global path for the prompt beside cross-attention (as SDXL adds a pooled text
    embedding), reaching every residual block of every level, where cross-attention is only at the
    attention levels (the lowest one in ``lean``).

    Same constructor arguments and ``forward(x, timesteps, context)`` as ``DiffusionModelUNet``;
    ``context`` ``(B, L, cross_attention_dim)`` is required and its mean over the ``L`` positions (padding
    included: a fixed function of the prompt) goes through ``class_embedding``, a ``Linear(cross_attention_dim,
    time_embed_dim)`` initialised to zero, so an untrained projection leaves the plain UNet. It uses
    MONAI's class-conditioning hook (``num_class_embeds`` set: ``forward`` adds
    ``class_embedding(class_labels)`` to the time embedding) with the pooled states as ``class_labels``.

    Raises:
        ValueError: built without ``with_conditioning`` / ``cross_attention_dim``, or ``forward``
            without ``context`` or with ``class_labels``.
    """

    def __init__(self, **kwargs: Any) -> None:
        if not kwargs.get("with_conditioning") or not kwargs.get("cross_attention_dim"):
            raise ValueError("PooledTextUNet needs with_conditioning=True and a cross_attention_dim, got "
                             f"{kwargs.get('with_conditioning')!r}, {kwargs.get('cross_attention_dim')!r}")
        if kwargs.get("num_class_embeds") is not None:
            raise ValueError(f"PooledTextUNet uses the class embedding itself; num_class_embeds must be None, "
                             f"got {kwargs['num_class_embeds']!r}")
        super().__init__(**kwargs)
        dim = int(kwargs["cross_attention_dim"])
        self.num_class_embeds = dim  # turns on MONAI's "emb + class_embedding(class_labels)"
        self.class_embedding = nn.Linear(dim, self.time_embed[-1].out_features)
        nn.init.zeros_(self.class_embedding.weight)
        nn.init.zeros_(self.class_embedding.bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if context is None:
            raise ValueError("PooledTextUNet needs context (B, L, cross_attention_dim) text states")
        if class_labels is not None:
            raise ValueError("PooledTextUNet takes no class_labels: the pooled text states take their place")
        return super().forward(x, timesteps, context=context, class_labels=context.mean(dim=1), **kwargs)


#: UNet classes a volume model folder may name in ``unet/config.json`` (``_class_name``).
UNET_CLASSES: dict[str, type[DiffusionModelUNet]] = {"DiffusionModelUNet": DiffusionModelUNet,
                                                     "PooledTextUNet": PooledTextUNet}


def build_unet(config: VolumeModelConfig, cross_attention_dim: int) -> DiffusionModelUNet:
    """A fresh 3D ``DiffusionModelUNet`` cross-attending to ``(B, L, cross_attention_dim)`` text states
    (a :class:`PooledTextUNet` when ``config.pooled_text``)."""
    cls = PooledTextUNet if config.pooled_text else DiffusionModelUNet
    return cls(**unet_kwargs(config, cross_attention_dim))


def build_noise_scheduler(config: VolumeModelConfig) -> DDPMScheduler:
    """The training noise schedule (a diffusers ``DDPMScheduler``; samplers take its schedule)."""
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         beta_start=config.beta_start, beta_end=config.beta_end,
                         prediction_type=config.prediction_type, clip_sample=False)


def to_fast_layout(net: _Net, device: str | torch.device) -> _Net:
    """``net`` with its 5-D weights in channels-last order (NDHWC) when it runs on a CPU; as it is elsewhere.

    oneDNN's 3D convolutions are faster on channels-last weights (one thread, AVX2 CPU, ``lean`` preset,
    fp32: VAE training step 1.4x, VAE decoding 1.5x, UNet forward 1.2x, UNet training step 1.05x; outputs
    equal up to float rounding, 1e-5). Nothing changes for callers: inputs may stay contiguous, outputs may
    come back channels-last (any strided tensor), and saved weights are made contiguous
    (``state_dict`` values are converted on save). Not applied on GPUs, where it was not measured.
    Converts in place and returns ``net``.
    """
    if torch.device(device).type == "cpu":
        net.to(memory_format=torch.channels_last_3d)
    return net
