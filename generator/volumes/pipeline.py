"""The volume sampling pipeline: prompts in, ``(B, D, H, W)`` volumes in ``[0, 1]`` plus their physical
mapping and geometry out.

:class:`VolumePipeline` mirrors :class:`generator.models.pipeline.RadSynthPipeline` (numbered steps,
per-image seeds, classifier-free guidance with the empty prompt as null) over MONAI 3D networks with a
diffusers scheduler on 5D latents ``(B, C, d, h, w)``.

Reproducibility: volume ``i``'s initial latent noise comes from ``torch.Generator().manual_seed(seeds[i])``
on the CPU, and stochastic samplers (DDPM) draw its step noise from the same generator afterwards, so
a volume depends on its seed, prompt and settings only, not on the batch it was made in (float32;
batches are split by ``batch_size`` and the result is the same for any split up to float rounding).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from conditioning.text_encoder import encode_prompts
from generator.data.records import IntensityMapping
from generator.models.samplers import Sampler, make_sampler
from generator.volumes.geometry import centred_affine, parse_shape, parse_spacing
from generator.volumes.records import Volume

__all__ = ["VolumePipeline", "VolumePipelineOutput", "DEFAULT_VOLUME_SAMPLER"]

#: DDIM (deterministic, eta 0) by default: robust at few steps on small 3D models.
DEFAULT_VOLUME_SAMPLER = Sampler.DDIM


@dataclass
class VolumePipelineOutput:
    """Output of :class:`VolumePipeline`.

    Attributes:
        volumes: ``(B, D, H, W)`` float32 in ``[0, 1]`` (model range; see ``intensity``).
        seeds: Seed of each volume.
        affine: ``(4, 4)`` RAS+ mm affine shared by the volumes (standard layout, centred at 0).
        spacing: ``(slice, row, column)`` mm.
        intensity: Maps ``[0, 1]`` to physical units (HU for CT).
        sampler: Sampler name used.
        num_inference_steps: Steps run.
        guidance_scale: Classifier-free guidance scale used.
    """

    volumes: np.ndarray
    seeds: list[int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    intensity: IntensityMapping
    sampler: str
    num_inference_steps: int
    guidance_scale: float

    def to_physical(self) -> np.ndarray:
        """``(B, D, H, W)`` float32 in physical units (``intensity.low`` .. ``intensity.high``)."""
        return self.intensity.to_physical(self.volumes).astype(np.float32)

    def volume(self, index: int, *, text: str = "", file_name: str = "") -> Volume:
        """Volume ``index`` as a :class:`~generator.volumes.records.Volume` in physical units (HU for CT),
        with the output's affine and spacing: what the exporters and previews take.

        Raises:
            ValueError: ``index`` out of range.
        """
        if not 0 <= int(index) < len(self.volumes):
            raise ValueError(f"index must be in [0, {len(self.volumes)}), got {index!r}")
        return Volume(array=self.intensity.to_physical(self.volumes[int(index)]).astype(np.float32),
                      affine=self.affine, spacing=self.spacing, intensity=self.intensity, text=text,
                      file_name=file_name, extra={"seed": self.seeds[int(index)]})


class VolumePipeline:
    """Text-conditioned 3D latent diffusion.

    Args:
        vae: 3D MONAI ``AutoencoderKL`` (volumes in ``[-1, 1]``).
        unet: 3D MONAI ``DiffusionModelUNet`` with cross-attention to the text states.
        scheduler: A diffusers scheduler holding the training noise schedule.
        tokenizer: The text encoder's tokenizer.
        text_encoder: Frozen text encoder.
        shape: Volume shape ``(D, H, W)``.
        spacing: ``(slice, row, column)`` mm of the generated grid.
        intensity: Mapping from ``[0, 1]`` to physical units.
        scaling_factor: Latents are ``z * scaling_factor`` (unit variance in training).

    Raises:
        ValueError: a ``shape`` the networks cannot handle, bad ``spacing`` or ``scaling_factor``.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: DiffusionModelUNet,
        scheduler: SchedulerMixin,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: PreTrainedModel,
        *,
        shape: Sequence[int],
        spacing: Sequence[float],
        intensity: IntensityMapping,
        scaling_factor: float = 1.0,
    ) -> None:
        sh, sp = parse_shape(tuple(shape)), parse_spacing(tuple(spacing))
        if sh is None or sp is None:
            raise ValueError(f"shape and spacing are required, got {shape!r}, {spacing!r}")
        if not (np.isfinite(scaling_factor) and scaling_factor > 0):
            raise ValueError(f"scaling_factor must be a positive number, got {scaling_factor!r}")
        self.vae, self.unet, self.scheduler = vae.eval(), unet.eval(), scheduler
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval()
        self.shape, self.spacing, self.intensity = sh, sp, intensity
        self.scaling_factor = float(scaling_factor)
        down = _vae_factor(vae)
        levels = len(unet.down_blocks)
        need = down * 2 ** (levels - 1)
        if any(s % need for s in sh):
            raise ValueError(f"shape {sh} must be divisible by {need} on every axis")
        self.latent_shape = (int(unet.in_channels), *(s // down for s in sh))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, text_encoder: str | Path | None = None,
                        device: str = "cpu") -> "VolumePipeline":
        """Load a volume model folder (:func:`generator.volumes.model_folder.load_volume_model`)."""
        from generator.volumes.model_folder import load_volume_model

        m = load_volume_model(path, text_encoder=text_encoder, device=device)
        return cls(m.vae, m.unet, m.scheduler, m.tokenizer, m.text_encoder, shape=m.info["shape"],
                   spacing=m.info["spacing"], intensity=IntensityMapping.from_dict(m.info["intensity"]),
                   scaling_factor=float(m.info["scaling_factor"]))

    @property
    def device(self) -> torch.device:
        """Device of the UNet."""
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------------------ building blocks
    def check_inputs(self, prompt: Sequence[str], negative_prompt: Sequence[str] | None, num_inference_steps: int,
                     guidance_scale: float, seeds: Sequence[int], batch_size: int) -> None:
        """Raise ``ValueError`` naming the argument for any invalid input."""
        if isinstance(prompt, str) or len(prompt) == 0:
            raise ValueError(f"prompt must be a non-empty list of strings, got {prompt!r}")
        for p in prompt:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"every prompt must be a non-empty string, got {p!r}")
        if negative_prompt is not None and len(negative_prompt) != len(prompt):
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {len(prompt)}")
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not (np.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if len(seeds) != len(prompt):
            raise ValueError(f"seeds has {len(seeds)} entries but prompt has {len(prompt)}")
        if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
            raise ValueError(f"seeds must be non-negative integers, got {list(seeds)[:8]}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, L, hidden)`` text states on the UNet's device (``""`` is the null prompt)."""
        return encode_prompts(self.tokenizer, self.text_encoder, list(prompts), device=self.device,
                              dtype=torch.float32)

    def make_noise(self, seeds: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Initial standard-normal latents ``(B, C, d, h, w)`` (CPU, float32), one generator per seed;
        the generators are returned for the sampler's later draws."""
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens]), gens

    @torch.no_grad()
    def encode_volumes(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W)`` in ``[0, 1]`` -> scaled latents ``(B, C, d, h, w)`` (posterior mean)."""
        x = volumes.to(self.device, torch.float32).unsqueeze(1) * 2.0 - 1.0
        z_mu, _ = self.vae.encode(x)
        return z_mu * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> ``(B, D, H, W)`` float32 in ``[0, 1]``."""
        x = self.vae.decode(latents.to(self.device, torch.float32) / self.scaling_factor)
        return ((x[:, 0] + 1.0) / 2.0).clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------ the loop
    @torch.no_grad()
    def __call__(
        self,
        prompt: Sequence[str],
        *,
        seeds: Sequence[int] | None = None,
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        sampler: str = DEFAULT_VOLUME_SAMPLER,
        negative_prompt: Sequence[str] | None = None,
        batch_size: int = 8,
        callback: Callable[[int, int], None] | None = None,
    ) -> VolumePipelineOutput:
        """Generate one volume per prompt.

        Args:
            prompt: Prompts, one per volume.
            seeds: Seed of each volume; default ``seed + i``.
            seed: Base seed when ``seeds`` is not given.
            num_inference_steps: Sampler steps.
            guidance_scale: Classifier-free guidance (``<= 1`` turns it off: one UNet pass per step).
            sampler: A :class:`generator.models.samplers.Sampler` name (``"ddim"``, ``"ddpm"``,
                ``"dpm"``, ``"dpm++2m-karras"``, ...).
            negative_prompt: Replaces the null prompt per volume.
            batch_size: Volumes per forward pass (the output does not depend on it).
            callback: Called as ``callback(step, total)`` after each step of each batch.

        Returns:
            :class:`VolumePipelineOutput`.

        Raises:
            ValueError: invalid arguments (named), an unknown sampler.
        """
        # 1. Check inputs and resolve seeds.
        seeds = [int(seed) + i for i in range(len(prompt))] if seeds is None else [int(s) for s in seeds]
        self.check_inputs(prompt, negative_prompt, num_inference_steps, guidance_scale, seeds, batch_size)
        scheduler = make_sampler(sampler, self.scheduler)
        use_cfg = guidance_scale > 1.0

        # 2. Encode prompts and the null prompt (classifier-free guidance).
        cond = self.encode_prompt(prompt)
        uncond = self.encode_prompt(list(negative_prompt) if negative_prompt is not None else [""] * len(prompt))

        out = []
        for start in range(0, len(prompt), int(batch_size)):
            sl = slice(start, start + int(batch_size))
            # 3. Per-volume initial latents from CPU generators seeded by each volume's seed.
            noise, gens = self.make_noise(seeds[sl])
            latents = noise.to(self.device) * scheduler.init_noise_sigma
            context = torch.cat([uncond[sl], cond[sl]]) if use_cfg else cond[sl]

            # 4. Denoise on 5D latents with the diffusers scheduler (stochastic samplers use each
            #    volume's own generator).
            scheduler.set_timesteps(int(num_inference_steps), device=self.device)
            stochastic = "generator" in inspect.signature(scheduler.step).parameters
            step_kwargs = {"generator": gens} if stochastic else {}
            for i, t in enumerate(scheduler.timesteps):
                model_in = torch.cat([latents] * 2) if use_cfg else latents
                model_in = scheduler.scale_model_input(model_in, t)
                tt = torch.full((model_in.shape[0],), int(t), device=self.device, dtype=torch.long)
                pred = self.unet(model_in, timesteps=tt, context=context)
                if use_cfg:
                    p_uncond, p_cond = pred.chunk(2)
                    pred = p_uncond + guidance_scale * (p_cond - p_uncond)
                latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
                if callback is not None:
                    callback(i, len(scheduler.timesteps))

            # 5. Decode to [0, 1].
            out.append(self.decode_latents(latents).cpu())

        # 6. Attach the geometry and physical mapping.
        volumes = torch.cat(out).numpy().astype(np.float32)
        return VolumePipelineOutput(volumes=volumes, seeds=seeds, affine=centred_affine(self.shape, self.spacing),
                                    spacing=self.spacing, intensity=self.intensity, sampler=str(sampler),
                                    num_inference_steps=int(num_inference_steps),
                                    guidance_scale=float(guidance_scale))


def _vae_factor(vae: AutoencoderKL) -> int:
    """Downsampling factor of a MONAI AutoencoderKL: 2 per downsampling block of the encoder."""
    n = sum(1 for b in vae.encoder.blocks if "Downsample" in type(b).__name__)
    return 2 ** n
