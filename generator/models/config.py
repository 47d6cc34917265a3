"""Training configuration and size presets (``--preset tiny|small|base|cxr128|cxr256|cxr512``).

A :class:`TrainConfig` is plain data: it is saved verbatim in ``radsynth.json`` so that a model folder
says how it was made.

General presets (any resolution ``latent_size * 2**k``):

- ``tiny``: a few thousand parameters; for tests and smoke runs (seconds on a CPU).
- ``small``: trains usefully on 2 CPU cores in 20 minutes (64 px -> 16x16x4 latents).
- ``base``: what a GPU user starts with (256 px -> 32x32x4 latents, a 164M-parameter UNet).

Resolution presets for real archives (one resolution each, see :data:`PRESET_DOWNSAMPLING`). They follow
the Stable Diffusion / RoentGen recipe (a KL autoencoder with 4 latent channels, f=8 at 256-512 px, 2
ResNet layers per block and self-attention in its middle block; a UNet with cross-attention on every
level but the finest) and MONAI's 2D latent diffusion tutorials (f=4 for small images), scaled down for
one 24-80 GB GPU. UNet parameter counts are with a 384-wide text encoder (the packaged MiniLM;
cross-attention weights grow with the width). Batch sizes come from the peak memory of one
bf16-autocast training step measured on a CPU (VAE: ~0.7 GB per 256 px image, so ~0.17 GB at 128 px and
~2.7 GB at 512 px; UNet: ~35 MB per 32x32 latent, ~170 MB per 64x64 latent) and keep a step under ~12 GB
on a 24 GB card; raise them (or ``--gradient-accumulation-steps``) on 80 GB. Learning rates are those of
MONAI's tutorials and Stable Diffusion fine-tuning (1e-4), a little higher for the smaller cxr128.

- ``cxr128``: 128x128 -> 32x32x4 latents (f=4). VAE (64, 128, 256), 13.9M parameters; UNet
  (64, 128, 256), cross-attention at 16x16 and 8x8, 25.4M. Batches VAE 32 / UNet 64; lr 2e-4 / 2e-4;
  EMA 0.9995; 10k VAE + 50k UNet steps. For MIMIC/CheXpert-size archives on one GPU in hours.
- ``cxr256``: 256x256 -> 32x32x4 latents (f=8). VAE (64, 128, 256, 256), 20.9M; UNet (128, 256, 384),
  cross-attention at 16x16 and 8x8, 65.1M. Batches VAE 16 / UNet 64; lr 1e-4 / 1e-4; EMA 0.9999; 20k +
  100k steps. A smaller, faster alternative to ``base`` (same VAE, 164M UNet) at the same resolution.
- ``cxr512``: 512x512 -> 64x64x4 latents (f=8, RoentGen's resolution). The ``cxr256`` VAE; UNet
  (128, 256, 384, 384), cross-attention at 32x32, 16x16 and 8x8 (none at 64x64), 103.1M. Batches VAE 4 /
  UNet 32; lr 1e-4 / 1e-4; EMA 0.9999; 30k + 150k steps. Sampling decodes large batches one image at a
  time (``RadSynthPipeline(vae_slicing=None)``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from generator._utils import did_you_mean


def _finite(value: Any) -> bool:
    """Whether ``value`` is a real number (not bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_oversample(value: Any, name: str = "oversample") -> tuple[tuple[str, float], ...]:
    """The ``oversample`` setting of a training config as ``((term, weight), ...)``: terms lower-cased and
    stripped, in the order given, weights finite and > 0.

    Accepts a mapping ``{term: weight}``, a sequence of ``(term, weight)`` pairs (JSON gives lists) or an
    empty value. A record whose text contains ``term`` (case-insensitive) is drawn ``weight`` times as
    often by the denoiser stage (:func:`generator.recipe.oversample_weights`).

    Raises:
        ValueError: names ``name`` and the offending entry (not a pair, an empty or repeated term, a weight
            that is not a finite number > 0).
    """
    if value is None:
        return ()
    items = list(value.items()) if isinstance(value, Mapping) else list(value)
    out: list[tuple[str, float]] = []
    for item in items:
        if isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) != 2:
            raise ValueError(f"{name} entries must be (term, weight) pairs, got {item!r}")
        term, weight = item
        if not isinstance(term, str) or not term.strip():
            raise ValueError(f"{name} term must be a non-empty string, got {term!r}")
        if not _finite(weight) or weight <= 0:
            raise ValueError(f"{name} weight of {term!r} must be a finite number > 0, got {weight!r}")
        key = term.strip().lower()
        if any(key == t for t, _ in out):
            raise ValueError(f"{name} names the term {key!r} twice")
        out.append((key, float(weight)))
    return tuple(out)


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
        oversample: ``((term, weight), ...)``: the UNet stage draws a training record whose text contains
            ``term`` (case-insensitive) ``weight`` times as often (weights of several matching terms
            multiply; the VAE stage draws uniformly). ``()`` (default): every record equally often. For a
            rare class or finding (``(("nodule", 2.0),)``); see :func:`check_oversample`.
        attribute_conditioning: Also condition the UNet on the attributes read back from each prompt
            (``conditioning.attributes``: finding, side, lobe, size, sex, age) through its class
            embedding (``class_embed_type="projection"``). Off by default: in the demo-model ablation
            (README, issue 12) it added nothing over the text states (sides right in 100% either way)
            and drew nodules slightly less often. Model folders written before the field get ``False``.
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
    attribute_conditioning: bool = False
    oversample: tuple[tuple[str, float], ...] = ()
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
        for name in ("vae_mid_block_attention", "text_augment", "attribute_conditioning"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "oversample", check_oversample(self.oversample))

    def vae_block_channels(self, resolution: int) -> tuple[int, ...]:
        """VAE ``block_out_channels`` for ``resolution`` (one block more than downsamplings).

        A resolution preset (``preset`` in :data:`PRESET_DOWNSAMPLING`) allows one resolution only:
        ``latent_size`` times its downsampling factor (128 for ``cxr128``; with ``latent_size``
        overridden, e.g. to 16, ``cxr128`` makes 64 px images at the same f=4).

        Raises:
            ValueError: ``resolution / latent_size`` is not a power of two >= 1, or a resolution preset
                is asked for another resolution than its own (the message names the preset, the
                resolution it allows and a preset made for ``resolution``, if any).
        """
        factor = PRESET_DOWNSAMPLING.get(self.preset)
        if factor is not None and resolution != self.latent_size * factor:
            fits = [
                name for name, f in PRESET_DOWNSAMPLING.items()
                if PRESETS[name].latent_size * f == resolution
            ]
            hint = f"; preset {fits[0]!r} is made for {resolution} px" if fits else ""
            raise ValueError(
                f"preset {self.preset!r} is for {self.latent_size * factor} px images only (VAE "
                f"downsampling {factor} to {self.latent_size}x{self.latent_size} latents), got resolution "
                f"{resolution!r}{hint}; allowed resolutions: {self.latent_size * factor}"
            )
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
    # Resolution presets (module docstring; parameter counts are asserted in
    # tests/generator/test_presets_large.py). Each allows latent_size * PRESET_DOWNSAMPLING[name] px.
    "cxr128": TrainConfig(
        preset="cxr128",
        latent_size=32,
        latent_channels=4,
        vae_channels=(64, 128, 256),
        vae_layers_per_block=2,
        vae_mid_block_attention=True,
        vae_lr=2e-4,
        vae_batch_size=32,
        unet_channels=(64, 128, 256),
        unet_attention=(False, True, True),
        unet_layers_per_block=2,
        unet_heads=8,
        unet_lr=2e-4,
        unet_batch_size=64,
        norm_groups=32,
        ema_decay=0.9995,
        warmup_steps=500,
        vae_steps=10000,
        unet_steps=50000,
        checkpoint_every=2000,
    ),
    "cxr256": TrainConfig(
        preset="cxr256",
        latent_size=32,
        latent_channels=4,
        vae_channels=(64, 128, 256, 256),
        vae_layers_per_block=2,
        vae_mid_block_attention=True,
        vae_lr=1e-4,
        vae_batch_size=16,
        unet_channels=(128, 256, 384),
        unet_attention=(False, True, True),
        unet_layers_per_block=2,
        unet_heads=8,
        unet_lr=1e-4,
        unet_batch_size=64,
        norm_groups=32,
        ema_decay=0.9999,
        warmup_steps=1000,
        vae_steps=20000,
        unet_steps=100000,
        checkpoint_every=2000,
    ),
    "cxr512": TrainConfig(
        preset="cxr512",
        latent_size=64,
        latent_channels=4,
        vae_channels=(64, 128, 256, 256),
        vae_layers_per_block=2,
        vae_mid_block_attention=True,
        vae_lr=1e-4,
        vae_batch_size=4,
        unet_channels=(128, 256, 384, 384),
        unet_attention=(False, True, True, True),
        unet_layers_per_block=2,
        unet_heads=8,
        unet_lr=1e-4,
        unet_batch_size=32,
        norm_groups=32,
        ema_decay=0.9999,
        warmup_steps=1000,
        vae_steps=30000,
        unet_steps=150000,
        checkpoint_every=2000,
    ),
}

#: VAE downsampling factor of each resolution preset: it makes ``latent_size * factor`` px images only
#: (``cxr128``: 128 px, f=4; ``cxr256``: 256 px, f=8; ``cxr512``: 512 px, f=8). The general presets
#: (``tiny``, ``small``, ``base``) are absent: any ``latent_size * 2**k`` is valid for them.
PRESET_DOWNSAMPLING: dict[str, int] = {"cxr128": 4, "cxr256": 8, "cxr512": 8}


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

