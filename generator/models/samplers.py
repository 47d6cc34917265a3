"""Sampling schedulers: the names ``radsynth generate --sampler`` accepts.

A sampler name fully determines the scheduler: :func:`make_sampler` takes only the model's *noise
schedule* from ``base`` (:data:`SCHEDULE_KEYS`: betas, number of training timesteps, prediction type)
and sets every sampling option explicitly (:data:`SAMPLER_OPTIONS`), so the name recorded in a
manifest rebuilds exactly the same scheduler whatever scheduler the pipeline held before (the model
folder's, or another sampler), and ``--from-manifest`` regenerates identical pixels.

Names:
    ``"dpm"``: DPM-Solver++ 2M (multistep, second order), timesteps evenly spaced.
    ``"dpm++2m-karras"``: DPM-Solver++ 2M on the Karras et al. (2022) sigma schedule, which spends
    more steps at low noise (the default, at 10 steps).
    ``"unipc"``: UniPC (Zhao et al. 2023) predictor-corrector, order 2, ``bh2``, evenly spaced; the
    10-step solution nearest the converged one in ``scripts/bench_sample.py --accuracy-images``.
    ``"unipc-karras"``: UniPC on Karras sigmas.
    ``"ddim"``: DDIM (deterministic, eta 0).
    ``"euler"``: Euler (Karras et al. 2022 discretisation), evenly spaced.
    ``"ddpm"``: ancestral DDPM sampling (stochastic; per-image noise from the image's seed).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from generator._utils import look_up_option

if TYPE_CHECKING:  # diffusers is imported when a scheduler is made, not for --help or flag checks
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = [
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
    "MAX_GUIDANCE",
    "MAX_STEPS",
    "PRECISIONS",
    "Precision",
    "SAMPLERS",
    "SAMPLER_OPTIONS",
    "SCHEDULE_KEYS",
    "Sampler",
    "check_manifest_line",
    "check_sampling_settings",
    "make_sampler",
    "sampler_name",
]


class Sampler(StrEnum):
    """Sampler names (``radsynth generate --sampler``)."""

    DPM = "dpm"
    DPM_KARRAS = "dpm++2m-karras"
    UNIPC = "unipc"
    UNIPC_KARRAS = "unipc-karras"
    DDIM = "ddim"
    EULER = "euler"
    DDPM = "ddpm"


#: Recommended sampler and step count. In ``scripts/bench_sample.py`` (N=270, a 10-minute model) DPM-Solver++
#: 2M Karras at 10 steps had a lower Fréchet distance than ``"dpm"`` at 20 steps (21.5 vs 22.7).
DEFAULT_SAMPLER = Sampler.DPM_KARRAS
DEFAULT_STEPS = 10

#: Arithmetic of sampling (``radsynth generate --precision``; see :class:`RadSynthPipeline`).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")

#: Largest number of sampler steps and guidance scale accepted from a flag or a manifest line.
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0


def _scheduler_classes() -> dict[str, type["SchedulerMixin"]]:
    """Scheduler class of each sampler name (``SAMPLERS``; built on first use)."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    return {
        Sampler.DPM: DPMSolverMultistepScheduler,
        Sampler.DPM_KARRAS: DPMSolverMultistepScheduler,
        Sampler.UNIPC: UniPCMultistepScheduler,
        Sampler.UNIPC_KARRAS: UniPCMultistepScheduler,
        Sampler.DDIM: DDIMScheduler,
        Sampler.EULER: EulerDiscreteScheduler,
        Sampler.DDPM: DDPMScheduler,
    }


def __getattr__(name: str) -> Any:
    if name == "SAMPLERS":  # Scheduler class of each sampler name
        return _scheduler_classes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_sampling_settings(steps: Any, guidance_scale: Any, *, source: str = "") -> tuple[int, float]:
    """Validate the number of steps and the guidance scale (from a flag or a manifest line).

    Returns:
        ``(steps, guidance_scale)`` as ``int`` and ``float``.

    Raises:
        ValueError: ``steps`` not an integer in ``[1, MAX_STEPS]`` or ``guidance_scale`` not a
            finite number in ``[0, MAX_GUIDANCE]``; the message names the field and ``source``.
    """
    import numpy as np

    where = f" ({source})" if source else ""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= int(steps) <= MAX_STEPS:
        raise ValueError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}{where}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating)) \
            or not math.isfinite(float(guidance_scale)) or not 0.0 <= float(guidance_scale) <= MAX_GUIDANCE:
        raise ValueError(f"guidance_scale must be a finite number in [0, {MAX_GUIDANCE:g}], "
                         f"got {guidance_scale!r}{where}")
    return int(steps), float(guidance_scale)


def check_manifest_line(line: Any) -> tuple[str, int, str | None, int, float]:
    """The sampling fields of one ``metadata.jsonl`` line, validated (for ``--from-manifest``).

    Returns:
        ``(text, seed, negative_prompt, steps, guidance_scale)``.

    Raises:
        ValueError: ``line`` is not a dict, lacks ``text``, ``seed``, ``steps`` or ``guidance_scale``, or
            holds a value out of range (named: an empty text, a negative seed, a NaN guidance, ...).
    """
    import json

    if not isinstance(line, dict):
        raise ValueError(f"a manifest line must be a JSON object, got {type(line).__name__}")
    missing = [k for k in ("text", "seed", "steps", "guidance_scale") if k not in line]
    if missing:
        raise ValueError(f"manifest line lacks {missing}: {json.dumps(line)[:200]}")
    steps, guidance = check_sampling_settings(line["steps"], line["guidance_scale"], source="manifest line")
    text, seed, negative = line["text"], line["seed"], line.get("negative_prompt")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"manifest line: text must be a non-empty string, got {text!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"manifest line: seed must be a non-negative integer, got {seed!r}")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"manifest line: negative_prompt must be a string or null, got {negative!r}")
    return text, seed, negative, steps, guidance


#: Keys taken from the model's scheduler: its training noise schedule, nothing about sampling.
SCHEDULE_KEYS: tuple[str, ...] = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)

_SPACING: dict[str, Any] = {"timestep_spacing": "linspace", "steps_offset": 0}
_DPM: dict[str, Any] = {
    **_SPACING,
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "thresholding": False,
}
_UNIPC: dict[str, Any] = {
    **_SPACING,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "disable_corrector": [],
    "final_sigmas_type": "zero",
    "thresholding": False,
}

#: Every sampling option of each name (``use_karras_sigmas`` etc.), set explicitly on top of the
#: schedule so the name alone rebuilds the scheduler.
SAMPLER_OPTIONS: dict[str, dict[str, Any]] = {
    Sampler.DPM: {**_DPM, "use_karras_sigmas": False},
    Sampler.DPM_KARRAS: {**_DPM, "use_karras_sigmas": True},
    Sampler.UNIPC: {**_UNIPC, "use_karras_sigmas": False},
    Sampler.UNIPC_KARRAS: {**_UNIPC, "use_karras_sigmas": True},
    Sampler.DDIM: {**_SPACING, "clip_sample": False, "set_alpha_to_one": False, "thresholding": False},
    Sampler.EULER: {**_SPACING, "use_karras_sigmas": False, "interpolation_type": "linear"},
    Sampler.DDPM: {**_SPACING, "clip_sample": False, "variance_type": "fixed_small", "thresholding": False},
}


def make_sampler(name: str, base: SchedulerMixin) -> SchedulerMixin:
    """A sampling scheduler of kind ``name`` with ``base``'s noise schedule.

    Args:
        name: One of :class:`Sampler` (``"dpm"``, ``"dpm++2m-karras"``, ``"unipc"``, ...).
        base: Any diffusers scheduler carrying the model's training noise schedule (the model
            folder's scheduler, or one made by this function: only :data:`SCHEDULE_KEYS` are read).

    Returns:
        A new scheduler; ``make_sampler(n, make_sampler(m, base))`` equals ``make_sampler(n, base)``.

    Raises:
        ValueError: unknown sampler name, with a "did you mean".
    """
    key = look_up_option(name, list(Sampler), name="sampler")
    schedule = {k: base.config[k] for k in SCHEDULE_KEYS if k in base.config}
    return _scheduler_classes()[key](**schedule, **SAMPLER_OPTIONS[key])


def sampler_name(scheduler: SchedulerMixin) -> str | None:
    """The :class:`Sampler` name whose options ``scheduler`` has (``None`` if it matches none).

    Use it to record the sampler actually in a pipeline (e.g. in a manifest).
    """
    for name, cls in _scheduler_classes().items():
        if type(scheduler) is cls and all(
            _same(scheduler.config.get(k), v) for k, v in SAMPLER_OPTIONS[name].items()
        ):
            return str(name)
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
