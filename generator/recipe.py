"""The UNet training recipe shared by the 2D and volume trainers: objective, LR schedule, EMA.

One definition of what a UNet step optimises and how its weights are averaged, so that :class:`generator.training.Trainer` (images,
``accelerate``) and :class:`generator.volumes.training.VolumeTrainer` (volumes) cannot drift apart:

- :func:`denoising_target`: what the UNet predicts (``epsilon``: the noise; ``v_prediction``: the
  velocity ``alpha_t * noise - sigma_t * x0`` of Salimans & Ho 2022), from diffusers' scheduler;
- :func:`denoising_loss`: per-sample mean squared error, optionally weighted by min-SNR-gamma
  (Hang et al. 2023, via ``diffusers.training_utils.compute_snr``);
- :func:`warmup_cosine`: linear warm-up, then cosine decay to 10% of the peak learning rate;
- :func:`unet_ema`: the exponential moving average of the UNet's weights that the model folder keeps;
- :class:`StepPlan`: how many steps a stage under a wall-clock budget gets, refitted from its measured
  speed, so the cosine above ends when the clock does;
- :func:`oversample_weights` and :func:`draw_records`: which training records a UNet step draws
  (uniformly, or more often those whose text names a rare finding or class).

Shapes are generic: latents ``(B, C, *spatial)`` with any number of spatial axes (2 for images, 3 for
volumes); timesteps ``(B,)`` integers in ``[0, num_train_timesteps)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel, compute_snr

__all__ = ["PREDICTION_TYPES", "denoising_target", "denoising_loss", "warmup_cosine", "unet_ema", "StepPlan",
           "SCHEDULE_FITS", "oversample_weights", "draw_records"]

#: What the UNet can be trained to predict.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """The regression target of the UNet for clean latents ``x0`` noised with ``noise`` at ``timesteps``.

    Args:
        scheduler: A diffusers noise scheduler with ``get_velocity`` (``DDPMScheduler``).
        x0: Clean latents ``(B, C, *spatial)``.
        noise: Standard normal noise of the same shape.
        timesteps: ``(B,)`` integer timesteps.
        prediction_type: ``"epsilon"`` (returns ``noise``) or ``"v_prediction"`` (the velocity).

    Raises:
        ValueError: unknown ``prediction_type`` (named).
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, timesteps)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   prediction_type: str, snr_gamma: float | None) -> torch.Tensor:
    """Per-sample loss ``(B,)``: the MSE over all non-batch axes, in float32, times the min-SNR weight.

    With ``snr_gamma`` (``None`` or ``0``: plain MSE) each sample is weighted by
    ``min(SNR(t), gamma) / SNR(t)`` for epsilon prediction and ``min(SNR(t), gamma) / (SNR(t) + 1)`` for
    v-prediction, where ``SNR(t) = alpha_bar_t / (1 - alpha_bar_t)`` of ``scheduler``: both weight the
    implied x0 error by ``min(SNR, gamma)``, so the easy low-noise steps stop dominating.

    Args:
        pred, target: ``(B, C, *spatial)`` (any float dtype; computed in float32).
        timesteps: ``(B,)`` integer timesteps (on any device; the SNR is computed on the CPU).
        scheduler: The diffusers noise scheduler the noise came from (its ``alphas_cumprod``).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        snr_gamma: Min-SNR gamma > 0, or ``None`` / ``0`` for none.

    Raises:
        ValueError: unknown ``prediction_type``, or a negative ``snr_gamma`` (named).
    """
    _check_prediction_type(prediction_type)
    per = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if snr_gamma is None or snr_gamma == 0:
        return per
    if not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be > 0, 0 or None, got {snr_gamma!r}")
    snr = compute_snr(scheduler, timesteps.cpu()).to(per.device, torch.float32)
    weight = torch.clamp(snr, max=float(snr_gamma))
    weight = weight / snr if prediction_type == "epsilon" else weight / (snr + 1.0)
    return per * weight


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor of optimizer step ``step`` (0-based) of ``total``: linear warm-up over
    ``min(warmup, total // 10)`` steps (at least 1; short runs warm up for a tenth of their steps), then
    cosine decay from 1 to 0.1 at ``total`` (and 0.1 after it)."""
    warm = max(1, min(warmup, total // 10))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def unet_ema(model: torch.nn.Module, decay: float) -> EMAModel:
    """EMA of ``model``'s parameters (``diffusers.training_utils.EMAModel``) with warm-up: the decay of
    optimisation step ``s`` is ``min(decay, 1 - (1 + s) ** (-2 / 3))``, so early steps are averaged
    over a short window and a short run's EMA is not dominated by its random initialisation.

    Raises:
        ValueError: ``decay`` outside ``[0, 1)`` (named).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {decay!r}")
    return EMAModel(model.parameters(), decay=decay, use_ema_warmup=True, power=2 / 3)


#: How many times a time-budgeted stage fits its schedule to the remaining time (see :class:`StepPlan`).
SCHEDULE_FITS = 3


@dataclass
class StepPlan:
    """Step budget of one training stage.

    ``total`` is the number of steps the learning-rate schedule spans. Under a time budget
    (``deadline`` given, in the caller's clock: ``time.monotonic()`` or seconds of training) it is
    refitted from the speed measured so far: 20 steps after :meth:`begin`, then half-way to the fitted
    end, then half-way again (:data:`SCHEDULE_FITS` fits; ``fits`` so far, the next at step
    ``next_fit``, measured from ``fit_step`` at ``fit_time``). Without a deadline it never changes.
    """

    total: int
    deadline: float | None = None
    fits: int = 0
    next_fit: int = -1
    fit_step: int = -1
    fit_time: float = 0.0

    def begin(self, step: int, now: float) -> None:
        """Start measuring at ``step`` (the stage's first step of this run) and time ``now``."""
        if self.fits == 0:
            self.next_fit, self.fit_step, self.fit_time = step + 20, step, now

    def due(self, step: int) -> bool:
        """Whether the plan should be refitted after ``step``."""
        return self.deadline is not None and self.fits < SCHEDULE_FITS and step == self.next_fit

    def estimate(self, step: int, now: float) -> int:
        """The step the clock will reach ``deadline`` at, at the speed since the last fit (3% margin)."""
        if self.deadline is None:
            return self.total
        rate = (step - self.fit_step) / max(now - self.fit_time, 1e-9)
        return step + max(1, int(max(0.0, self.deadline - now) * rate * 0.97))

    def refit(self, total: int, step: int, now: float) -> None:
        """Adopt ``total`` (an :meth:`estimate`, possibly capped or agreed between processes) after
        ``step`` at ``now``, and schedule the next fit half-way to it."""
        self.total = int(total)
        self.fits += 1
        self.fit_step, self.fit_time = step, now
        self.next_fit = step + max(5, (self.total - step) // 2)


def oversample_weights(texts: Sequence[str], oversample: Sequence[tuple[str, float]]) -> torch.Tensor | None:
    """Draw weights of training records for the UNet stage, or ``None`` (uniform draws) without terms.

    Args:
        texts: Each record's own text (``N`` strings; for a record trained with paraphrases, the text it
            came with).
        oversample: ``((term, weight), ...)`` as :func:`generator.models.config.check_oversample` returns
            it: a record whose text contains ``term`` (case-insensitive substring) weighs ``weight``;
            weights of several matching terms multiply; a record without a match weighs 1.

    Returns:
        ``float64 (N,)`` weights (not normalised), or ``None`` when ``oversample`` is empty.

    Raises:
        ValueError: a term that no text contains (a typo would otherwise train silently without it),
            naming the term and an example text; or no texts.
    """
    if not oversample:
        return None
    if not texts:
        raise ValueError("oversample needs at least one training text, got none")
    lowered = [str(t).lower() for t in texts]
    weights = torch.ones(len(lowered), dtype=torch.float64)
    for term, weight in oversample:
        hit = torch.tensor([term in t for t in lowered])
        if not bool(hit.any()):
            raise ValueError(f"oversample term {term!r} is in none of the {len(lowered)} training texts "
                             f"(e.g. {texts[0]!r}); terms match text case-insensitively")
        weights[hit] *= float(weight)
    return weights


def draw_records(generator: torch.Generator, n: int, batch: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``batch`` training records of one UNet step, ``int64 (batch,)`` in ``[0, n)``.

    Uniform with replacement (``torch.randint``, the draws of every run before oversampling existed)
    without ``weights``; with ``weights`` (``(n,)``, from :func:`oversample_weights`) with replacement in
    proportion to them (``torch.multinomial``). Advances ``generator`` past the draws.

    Raises:
        ValueError: ``weights`` of another length than ``n``.
    """
    if weights is None:
        return torch.randint(0, n, (batch,), generator=generator)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    return torch.multinomial(weights, batch, replacement=True, generator=generator)
