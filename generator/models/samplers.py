"""Sampling schedulers: the names ``radsynth generate --sampler`` accepts, built from a model's
training noise schedule (diffusers ``cls.from_config(base.config)``)."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from generator._utils import look_up_option

__all__ = ["SAMPLERS", "make_sampler"]

#: Sampler names accepted by ``radsynth generate --sampler``.
SAMPLERS = {
    "dpm": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "ddpm": DDPMScheduler,
}


def make_sampler(name: str, base: SchedulerMixin) -> SchedulerMixin:
    """A sampling scheduler of kind ``name`` sharing ``base``'s noise schedule.

    Raises:
        ValueError: unknown sampler name, with a "did you mean".
    """
    name = look_up_option(name, SAMPLERS, name="sampler")
    cls = SAMPLERS[name]
    extra = {}
    if name == "dpm":
        extra = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    elif name == "ddim":
        extra = {"clip_sample": False, "set_alpha_to_one": False}
    return cls.from_config(base.config, **extra)
