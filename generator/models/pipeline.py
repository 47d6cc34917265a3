"""The sampling pipeline: prompts in, grayscale images in ``[0, 1]`` out.

:class:`RadSynthPipeline` is a ``diffusers.DiffusionPipeline`` with the Stable Diffusion components
(``vae``, ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``), so ``from_pretrained`` /
``save_pretrained`` work on RadSynth model folders and on any Stable-Diffusion-layout checkpoint (a
3-channel VAE's output is converted to grayscale).

Reproducibility: every image has its own seed. The initial latent of image ``i`` is drawn from
``torch.Generator().manual_seed(seeds[i])`` on the CPU, and the samplers offered are deterministic, so
an image does not depend on the batch it was made in or on the device's random generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from conditioning.text_encoder import encode_prompts


@dataclass
class RadSynthPipelineOutput(BaseOutput):
    """Output of :class:`RadSynthPipeline`.

    Attributes:
        images: ``(B, H, W)`` float32 numpy array in ``[0, 1]`` (0 = black), or a list of ``PIL``
            images (mode ``"L"``) with ``output_type="pil"``, or a ``(B, 1, H, W)`` tensor with
            ``output_type="pt"``.
        seeds: The seed of each image.
    """

    images: np.ndarray | list | torch.Tensor
    seeds: list[int]


class RadSynthPipeline(DiffusionPipeline):
    """Text-conditioned latent diffusion for grayscale radiology images.

    Args:
        vae: ``AutoencoderKL`` (1 or 3 channels); ``vae.config.scaling_factor`` scales latents to unit
            variance.
        unet: ``UNet2DConditionModel`` denoiser over the VAE's latents.
        text_encoder: Frozen ``transformers`` text encoder (its ``last_hidden_state`` conditions the UNet).
        tokenizer: The encoder's tokenizer.
        scheduler: A diffusers scheduler (DPM-Solver++, DDIM, Euler, DDPM).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: SchedulerMixin,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )

    @property
    def resolution(self) -> int:
        """Side of the images this pipeline makes, in pixels."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size) * factor

    def check_inputs(
        self,
        prompt: Sequence[str],
        negative_prompt: Sequence[str] | None,
        num_inference_steps: int,
        guidance_scale: float,
        seeds: Sequence[int],
    ) -> None:
        """Raise ``ValueError`` naming the argument for any invalid input."""
        if len(prompt) == 0:
            raise ValueError("prompt must not be empty")
        for p in prompt:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"every prompt must be a non-empty string, got {p!r}")
        if negative_prompt is not None and len(negative_prompt) != len(prompt):
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but prompt has {len(prompt)}"
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if len(seeds) != len(prompt):
            raise ValueError(f"seeds has {len(seeds)} entries but prompt has {len(prompt)}")

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, L, D)`` text hidden states on the UNet's device and dtype."""
        return encode_prompts(
            self.tokenizer,
            self.text_encoder,
            list(prompts),
            device=self._execution_device,
            dtype=self.unet.dtype,
        )

    def prepare_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """Initial noise ``(B, C, h, w)``, one CPU generator per seed, scaled for the scheduler."""
        shape = (
            int(self.unet.config.in_channels),
            int(self.unet.config.sample_size),
            int(self.unet.config.sample_size),
        )
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        )
        noise = noise.to(device=self._execution_device, dtype=self.unet.dtype)
        return noise * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> ``(B, 1, H, W)`` float32 images in ``[0, 1]`` (RGB VAEs averaged to gray)."""
        scaled = latents / self.vae.config.scaling_factor
        decoded = self.vae.decode(scaled.to(self.vae.dtype)).sample.float()
        if decoded.shape[1] == 3:
            decoded = decoded.mean(dim=1, keepdim=True)
        return ((decoded + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        seeds: Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
        output_type: str = "np",
        autocast_bf16: bool = False,
        callback: Callable[[int, int], None] | None = None,
        return_dict: bool = True,
    ) -> RadSynthPipelineOutput | tuple:
        """Generate one image per prompt.

        Args:
            prompt: One prompt or a list (one image each).
            seeds: One seed per image (default ``0..B-1``).
            negative_prompt: Prompt(s) to steer away from; default the null prompt ``""``.
            num_inference_steps: Sampler steps.
            guidance_scale: Classifier-free guidance weight (1 = no guidance, 0 = unconditional).
            output_type: ``"np"`` (``(B, H, W)`` float32 in ``[0, 1]``), ``"pil"`` or ``"pt"``.
            autocast_bf16: Run the UNet under ``torch.autocast(dtype=torch.bfloat16)`` (CPU with
                AMX/AVX-512 or CUDA); the VAE decode stays in float32.
            callback: Called as ``callback(step_index, num_steps)`` after each step.
            return_dict: Return a :class:`RadSynthPipelineOutput` (else a tuple).
        """
        # 1. Check inputs.
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        self.check_inputs(prompts, negative_prompt, num_inference_steps, guidance_scale, seeds)
        if output_type not in ("np", "pil", "pt"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'pt', got {output_type!r}")

        # 2. Encode the prompts (and the negative/null prompts for guidance).
        cond = self.encode_prompt(prompts)
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            uncond = self.encode_prompt(negative_prompt or [""] * len(prompts))
            context = torch.cat([uncond, cond])
        else:
            context = cond

        # 3. Timesteps.
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        timesteps = self.scheduler.timesteps

        # 4. Initial latents, one generator per image.
        latents = self.prepare_latents(seeds)

        # 5. Denoise with classifier-free guidance.
        device_type = self._execution_device.type
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([latents] * 2) if use_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast_bf16):
                pred = self.unet(model_in, t, encoder_hidden_states=context).sample
            pred = pred.to(latents.dtype)
            if use_cfg:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            latents = self.scheduler.step(pred, t, latents).prev_sample
            if callback is not None:
                callback(i, len(timesteps))

        # 6. Decode.
        images = self.decode_latents(latents)

        # 7. Post-process to the requested type.
        if output_type == "pt":
            out: np.ndarray | list | torch.Tensor = images.cpu()
        else:
            arr = images[:, 0].cpu().numpy().astype(np.float32)
            if output_type == "pil":
                from PIL import Image

                out = [Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in arr]
            else:
                out = arr
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out, seeds)
        return RadSynthPipelineOutput(images=out, seeds=seeds)
