"""Training configuration and size presets (``--preset tiny|small|base``).

A :class:`TrainConfig` is plain data: it is saved verbatim in ``radsynth.json`` so that a model folder
says how it was made.

- ``tiny``: a few thousand parameters; for tests and smoke runs (seconds on a CPU).
- ``small``: trains usefully on 2 CPU cores in 20 minutes (64 px -> 16x16x4 latents).
- ``base``: what a GPU user starts with (256 px -> 32x32x4 latents, a 164M-parameter UNet).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from generator._utils import did_you_mean


def _finite(value: Any) -> bool:
    """Whether ``value`` is a real number (not bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run, apart from the data and the seed.

    Attributes:
        preset: Name of the preset this config started from.
        latent_size: Side of the latent grid; the VAE downsamples ``resolution / latent_size`` times
            (a power of two).
        latent_channels: Channels of the VAE latent.
        vae_channels: Channel widths of the VAE blocks, coarsest last; trimmed or extended to the
            number of blocks that ``resolution / latent_size`` needs.
        vae_layers_per_block: ResNet layers per VAE block.
        vae_mid_block_attention: Whether the VAE's middle blocks (encoder and decoder) have a
            self-attention layer (``AutoencoderKL(mid_block_add_attention=...)``). Model folders written
            before this field existed get it from their preset name (``True`` for ``base`` only).
        vae_kl_weight: Weight of the KL term (the reconstruction term is L1 on ``[-1, 1]`` pixels).
        vae_ssim_weight: Weight of a ``1 - SSIM`` term (0 disables it).
        vae_lr: AdamW learning rate of the VAE.
        vae_batch_size: Images per VAE step (per process).
        unet_channels: ``block_out_channels`` of the UNet.
        unet_attention: For each UNet level, whether it has cross-attention.
        unet_layers_per_block: ResNet layers per UNet block.
        unet_heads: Attention heads per transformer block.
        unet_lr: AdamW learning rate of the UNet (cosine decay after a linear warm-up).
        unet_batch_size: Latents per UNet step (per process).
        warmup_steps: Linear learning-rate warm-up of both stages.
        norm_groups: GroupNorm groups in both networks.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        min_snr_gamma: Min-SNR loss weighting gamma (Hang et al. 2023); ``None`` disables it.
        prompt_dropout: Probability of training on the null prompt (classifier-free guidance).
        ema_decay: Maximum decay of the exponential moving average of UNet weights.
        text_augment: Reword prompts from structured attributes during training, when the data has
            them (``conditioning.prompts.paraphrase_prompt``).
        vae_share: Share of ``--max-minutes`` given to the VAE stage.
        vae_steps: Default number of VAE steps (``--max-steps`` bounds it).
        unet_steps: Default number of UNet steps (``--max-steps`` bounds it).
        checkpoint_every: Save an ``accelerate`` checkpoint every this many steps of a stage.
    """

    preset: str = "small"
    latent_size: int = 16
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_layers_per_block: int = 1
    vae_mid_block_attention: bool = False
    vae_kl_weight: float = 1e-6
    vae_ssim_weight: float = 0.2
    vae_lr: float = 1e-3
    vae_batch_size: int = 32
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_attention: tuple[bool, ...] = (False, True, True)
    unet_layers_per_block: int = 1
    unet_heads: int = 8
    unet_lr: float = 5e-4
    unet_batch_size: int = 32
    warmup_steps: int = 100
    norm_groups: int = 16
    prediction_type: str = "epsilon"
    min_snr_gamma: float | None = 5.0
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    text_augment: bool = True
    vae_share: float = 0.25
    vae_steps: int = 1500
    unet_steps: int = 6000
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}"
            )
        if len(self.unet_attention) != len(self.unet_channels):
            raise ValueError(
                f"unet_attention has {len(self.unet_attention)} entries but unet_channels has "
                f"{len(self.unet_channels)}"
            )
        if not _finite(self.prompt_dropout) or not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if not _finite(self.vae_share) or not 0.0 < self.vae_share < 1.0:
            raise ValueError(f"vae_share must be in (0, 1), got {self.vae_share}")
        for name in ("vae_batch_size", "unet_batch_size", "checkpoint_every", "latent_size", "latent_channels",
                     "vae_layers_per_block", "unet_layers_per_block", "unet_heads", "norm_groups",
                     "vae_steps", "unet_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        for name in ("vae_lr", "unet_lr"):
            value = getattr(self, name)
            if not _finite(value) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be a finite number in (0, 1], got {value!r}")
        for name in ("vae_kl_weight", "vae_ssim_weight"):
            value = getattr(self, name)
            if not _finite(value) or value < 0.0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not _finite(self.ema_decay) or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.min_snr_gamma is not None and (not _finite(self.min_snr_gamma) or self.min_snr_gamma <= 0):
            raise ValueError(f"min_snr_gamma must be a finite number > 0 or None, got {self.min_snr_gamma!r}")
        for name in ("vae_channels", "unet_channels"):
            value = getattr(self, name)
            if not value or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in value):
                raise ValueError(f"{name} must be a non-empty tuple of integers >= 1, got {value!r}")
        for name in ("vae_mid_block_attention", "text_augment"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def vae_block_channels(self, resolution: int) -> tuple[int, ...]:
        """VAE ``block_out_channels`` for ``resolution`` (one block more than downsamplings).

        Raises:
            ValueError: ``resolution / latent_size`` is not a power of two >= 1.
        """
        ratio = resolution / self.latent_size
        levels = math.log2(ratio) if ratio >= 1 else -1
        if levels < 0 or levels != int(levels):
            raise ValueError(
                f"resolution {resolution} must be latent_size ({self.latent_size}) times a power of two"
            )
        n = int(levels) + 1
        chans = list(self.vae_channels[:n])
        while len(chans) < n:
            chans.append(self.vae_channels[-1])
        return tuple(chans)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` with a suggestion.

        Fields missing from ``d`` take their defaults, except ``vae_mid_block_attention``: configs
        saved before it existed (the bundled demo model's) used ``preset == "base"`` for it, so it is
        derived from ``d["preset"]`` to rebuild the same architecture.
        """
        names = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        if "vae_mid_block_attention" not in d:
            kwargs["vae_mid_block_attention"] = d.get("preset", cls.preset) == "base"
        for key, value in d.items():
            if key not in names:
                raise ValueError(f"unknown training option {key!r}{did_you_mean(key, names)}")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(
        preset="tiny",
        latent_size=8,
        latent_channels=4,
        vae_channels=(8, 16),
        vae_ssim_weight=0.0,
        vae_batch_size=8,
        unet_channels=(16, 32),
        unet_attention=(False, True),
        unet_heads=2,
        unet_batch_size=8,
        norm_groups=4,
        warmup_steps=2,
        vae_steps=20,
        unet_steps=20,
        checkpoint_every=10,
    ),
    "small": TrainConfig(),
    "base": TrainConfig(
        preset="base",
        latent_size=32,
        vae_channels=(64, 128, 256, 256),
        vae_layers_per_block=2,
        vae_lr=5e-4,
        vae_batch_size=16,
        unet_channels=(128, 256, 512, 512),
        unet_attention=(False, True, True, True),
        unet_layers_per_block=2,
        unet_lr=1e-4,
        unet_batch_size=32,
        norm_groups=32,
        vae_mid_block_attention=True,
        warmup_steps=500,
        vae_steps=20000,
        unet_steps=100000,
        checkpoint_every=2000,
    ),
}


def get_preset(name: str, **overrides: Any) -> TrainConfig:
    """A preset by name, with fields overridden.

    Raises:
        ValueError: unknown preset (with a "did you mean") or unknown field.
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}{did_you_mean(name, PRESETS)}")
    base = PRESETS[name]
    if not overrides:
        return base
    bad = [k for k in overrides if k not in {f.name for f in fields(TrainConfig)}]
    if bad:
        raise ValueError(f"unknown training option(s) {bad}")
    return replace(base, **overrides)

