"""The sampling pipeline: prompts in, grayscale images in ``[0, 1]`` out.

:class:`RadSynthPipeline` is a ``diffusers.DiffusionPipeline`` with the Stable Diffusion components
(``vae``, ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``), so ``from_pretrained`` /
``save_pretrained`` work on RadSynth model folders and on any Stable-Diffusion-layout checkpoint (a
3-channel VAE's output is converted to grayscale).

Reproducibility: every image has its own seed. The initial noise of image ``i`` is drawn from
``torch.Generator().manual_seed(seeds[i])`` on the CPU (:meth:`RadSynthPipeline.make_noise`; it depends
on the seed only, not on the prompt, the batch or the device's random generator), and the samplers
offered are deterministic (DDPM's step noise also comes from the image's generator). In float32 an
image does not depend on the batch it was made in. In bfloat16 (``precision="auto"`` on AMX CPUs) the
UNet runs with bfloat16 weights; images differ from float32 by ~0.001 on average (up to about two
8-bit grey levels) and were batch-size invariant in our tests, but kernels are chosen by shape, so
record the resolved precision (:attr:`RadSynthPipelineOutput.precision`) to regenerate identical pixels.

Speed: each distinct prompt is encoded once per pipeline (cached across calls), classifier-free
guidance runs the conditional and unconditional halves in one UNet call, and the bfloat16 UNet copy is
made once.

Memory of the VAE decode (:meth:`RadSynthPipeline.decode_latents`): a batch whose decoded pixels exceed
:data:`VAE_SLICE_PIXELS` is decoded one image at a time (diffusers' ``AutoencoderKL`` slicing; the same
pixels as a whole-batch decode within 1e-5, not bit for bit: float32 kernels are chosen by batch shape), and a latent larger
than :data:`VAE_TILE_LATENT` cells a side is decoded in overlapping tiles blended linearly (diffusers'
tiling; pixels change near tile seams, so :attr:`RadSynthPipelineOutput.vae_tiled` records it). A
float16 VAE whose config says ``force_upcast`` (all RadSynth VAEs, Stable Diffusion's) decodes and
encodes in float32: float16 activations of the decoder can overflow to inf/NaN on CUDA.

Image-to-image (SDEdit) and region editing (RePaint-style latent blending) share the text-to-image loop:
``image`` with ``strength < 1`` starts the sampler part-way from the re-noised image, and ``keep_mask``
pins the kept region to the re-noised original after every step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from conditioning.attributes import prompt_vectors
from conditioning.text_encoder import encode_prompts
from generator._utils import look_up_option
from generator.models.build import takes_attributes
from generator.models.samplers import DEFAULT_STEPS, PRECISIONS, Precision  # "auto" resolves per device

__all__ = [
    "PRECISIONS",
    "Precision",
    "RadSynthPipeline",
    "RadSynthPipelineOutput",
    "VAE_SLICE_PIXELS",
    "VAE_TILE_LATENT",
    "check_guidance_interval",
    "cpu_has_bf16",
]


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Text states kept per pipeline (prompt strings -> ``(L, D)`` hidden states).
_PROMPT_CACHE_SIZE = 4096

#: ``vae_slicing=None`` decodes one image at a time when a batch has more decoded pixels than this
#: (2**20: 4 images of 512 px, 16 of 256 px, 64 of 128 px).
VAE_SLICE_PIXELS = 2**20

#: ``vae_tiling=None`` decodes in tiles when the latent side exceeds this many cells (512 px at f=8,
#: as Stable Diffusion's own tile); it is also the default tile side. Tiles overlap by 25 %.
VAE_TILE_LATENT = 64


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX-512-BF16).

    Reads the ``flags`` of ``/proc/cpuinfo`` (Linux); elsewhere falls back to torch's CPU capability
    (``"AVX512"`` or better).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"amx_bf16", "avx512_bf16"})
    try:
        return "AVX512" in str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # noqa: BLE001 - old torch without get_cpu_capability
        return False


@dataclass
class RadSynthPipelineOutput(BaseOutput):
    """Output of :class:`RadSynthPipeline`.

    Attributes:
        images: ``(B, H, W)`` float32 numpy array in ``[0, 1]`` (0 = black), or a list of ``PIL``
            images (mode ``"L"``) with ``output_type="pil"``, or a ``(B, 1, H, W)`` tensor with
            ``output_type="pt"``, or ``(B, C, h, w)`` latents with ``output_type="latent"``.
        seeds: The seed of each image.
        precision: The precision the UNet ran in (``"fp32"``, ``"bf16"`` or ``"fp16"``; ``"auto"``
            resolved). Pass it back as ``precision=`` to regenerate the same pixels.
        vae_tiled: Whether the VAE decoded in tiles (pixels near tile seams differ from an untiled
            decode); pass it back as ``vae_tiling=`` (with the same ``vae_tile_size``) to regenerate
            the same pixels.
    """

    images: np.ndarray | list | torch.Tensor
    seeds: list[int]
    precision: str = "fp32"
    vae_tiled: bool = False


def check_guidance_interval(value: Sequence[float] | None) -> tuple[float, float] | None:
    """``None``, or ``(low, high)`` as floats with ``0 <= low <= high`` (``high`` may be ``inf``).

    Raises:
        ValueError: not two numbers, a negative or NaN bound, or ``low > high`` (names the value).
    """
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two noise levels (low, high), got {value!r}") from None
    if math.isnan(low) or math.isnan(high) or low < 0 or low > high:
        raise ValueError(f"guidance_interval must satisfy 0 <= low <= high, got {value!r}")
    return low, high


class RadSynthPipeline(DiffusionPipeline):
    """Text-conditioned latent diffusion for grayscale radiology images.

    Args:
        vae: ``AutoencoderKL`` (1 or 3 channels); ``vae.config.scaling_factor`` scales latents to unit
            variance.
        unet: ``UNet2DConditionModel`` denoiser over the VAE's latents.
        text_encoder: Frozen ``transformers`` text encoder (its ``last_hidden_state`` conditions the UNet).
        tokenizer: The encoder's tokenizer.
        scheduler: A diffusers scheduler (see :func:`generator.models.samplers.make_sampler`).
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
        self._prompt_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._unet_copies: dict[torch.dtype, tuple[tuple, UNet2DConditionModel]] = {}

    # ------------------------------------------------------------------------------ properties
    @property
    def resolution(self) -> int:
        """Side of the images this pipeline makes, in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along a side (``2 ** (len(vae.block_out_channels) - 1)``)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def resolve_precision(self, precision: str = "auto") -> str:
        """The concrete precision ``precision`` means on this pipeline's device.

        ``"auto"``: ``"fp16"`` when the UNet's weights are float16; on CUDA ``"bf16"`` if the GPU
        supports it; on a CPU with AMX-BF16/AVX-512-BF16 (:func:`cpu_has_bf16`) ``"bf16"``; otherwise
        ``"fp32"``.

        Raises:
            ValueError: unknown ``precision``, or ``"fp16"`` on a CPU.
        """
        precision = look_up_option(precision, PRECISIONS, name="precision")
        device = self._execution_device
        if precision == "auto":
            if self.unet.dtype == torch.float16:
                return "fp16"
            if device.type == "cuda":
                return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
            if device.type == "cpu":
                return "bf16" if cpu_has_bf16() else "fp32"
            return "fp32"
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("precision='fp16' needs a CUDA or MPS device; use 'bf16' or 'fp32' on a CPU")
        return precision

    # ------------------------------------------------------------------------------ checks
    def check_inputs(
        self,
        prompt: Sequence[str],
        negative_prompt: Sequence[str] | None,
        num_inference_steps: int,
        guidance_scale: float,
        seeds: Sequence[int],
        strength: float = 1.0,
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
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0.0 <= strength <= 1.0):
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")

    def _pixel_batch(self, value: np.ndarray | torch.Tensor, batch: int, name: str) -> torch.Tensor:
        """``(B, H, W)`` or ``(H, W)`` array in ``[0, 1]`` -> ``(B, 1, H, W)`` float32 CPU tensor."""
        t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
        t = t.detach().to("cpu", torch.float32)
        given = tuple(t.shape)
        res = self.resolution
        if t.ndim == 2:
            t = t.unsqueeze(0).expand(batch, -1, -1)
        if t.ndim != 3 or tuple(t.shape) != (batch, res, res):
            raise ValueError(
                f"{name} must have shape ({batch}, {res}, {res}) (one {res}x{res} image per prompt) or "
                f"({res}, {res}), got {given}"
            )
        if not torch.isfinite(t).all() or t.min() < 0.0 or t.max() > 1.0:
            raise ValueError(
                f"{name} must hold finite values in [0, 1], got range "
                f"[{float(t.min()):.4g}, {float(t.max()):.4g}]"
            )
        return t.unsqueeze(1).contiguous()

    # ------------------------------------------------------------------------------ building blocks
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, L, D)`` text hidden states on the UNet's device and dtype.

        Each distinct prompt is encoded once and kept (up to 4096 prompts per pipeline), so repeated
        prompts within a call and across calls cost nothing. :meth:`clear_prompt_cache` empties it.
        """
        device, dtype = self._execution_device, self.unet.dtype
        tag = (id(self.text_encoder), id(self.tokenizer), str(device), dtype)
        missing = list(dict.fromkeys(p for p in prompts if (tag, p) not in self._prompt_cache))
        if missing:
            states = encode_prompts(self.tokenizer, self.text_encoder, missing, device=device, dtype=dtype)
            for p, s in zip(missing, states):
                self._prompt_cache[(tag, p)] = s
        out = []
        for p in prompts:
            self._prompt_cache.move_to_end((tag, p))
            out.append(self._prompt_cache[(tag, p)])
        while len(self._prompt_cache) > _PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return torch.stack(out)

    def clear_prompt_cache(self) -> None:
        """Forget the text states kept by :meth:`encode_prompt` (e.g. after changing the encoder's
        weights in place) and the reduced-precision UNet copies kept by :meth:`denoiser`."""
        self._prompt_cache.clear()
        self._unet_copies.clear()

    def denoiser(self, precision: str) -> tuple[UNet2DConditionModel, torch.dtype, bool]:
        """The UNet to run at a resolved ``precision``, its input dtype, and whether to autocast.

        The UNet itself when its weights already have that dtype; otherwise a copy with weights cast
        to it (bf16 weights run about 1.2x faster than autocast on AMX CPUs at the same error), made
        once and kept until the UNet is replaced or its weights change in place (tensor versions are
        checked). A UNet under accelerate offload hooks is not copied: it runs under autocast.
        """
        dtype = _DTYPES[precision]
        unet = self.unet
        if unet.dtype == dtype:
            return unet, dtype, False
        if hasattr(unet, "_hf_hook"):
            return unet, unet.dtype, True
        params = list(unet.parameters())
        key = (id(unet), str(params[0].device), sum(int(p._version) for p in params))
        cached = self._unet_copies.get(dtype)
        if cached is None or cached[0] != key:
            low = copy.deepcopy(unet)
            torch.nn.Module.to(low, dtype=dtype)  # plain cast; diffusers' to() warns about keep-in-fp32 lists
            low.eval().requires_grad_(False)
            self._unet_copies[dtype] = cached = (key, low)
        return cached[1], dtype, False

    def make_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """The standard-normal starting noise of each seed: ``(B, C, h, w)`` float32 on the CPU.

        Image ``i``'s noise comes from ``torch.Generator().manual_seed(seeds[i])`` alone, so the same
        seed gives the same noise under any prompt, batch, device, ``image`` or ``strength``.
        """
        return self._draw_noise([torch.Generator().manual_seed(int(s)) for s in seeds])

    def _draw_noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        shape = (
            int(self.unet.config.in_channels),
            int(self.unet.config.sample_size),
            int(self.unet.config.sample_size),
        )
        return torch.stack([torch.randn(shape, generator=g) for g in generators])

    def prepare_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """Text-to-image initial latents: :meth:`make_noise` scaled by the scheduler's
        ``init_noise_sigma``, on the UNet's device and dtype, ``(B, C, h, w)``."""
        noise = self.make_noise(seeds).to(device=self._execution_device, dtype=self.unet.dtype)
        return noise * self.scheduler.init_noise_sigma

    @contextlib.contextmanager
    def _vae_in_float32_if_needed(self) -> Iterator[torch.dtype]:
        """Run the VAE in float32 when it is float16 and its config has ``force_upcast`` (diffusers'
        Stable Diffusion pattern: float16 decoder activations overflow); yields the dtype to feed it.
        The weights are cast back afterwards (float16 -> float32 -> float16 is exact)."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if upcast:
            torch.nn.Module.to(vae, dtype=torch.float32)  # plain cast, as in denoiser()
        try:
            yield vae.dtype
        finally:
            if upcast:
                torch.nn.Module.to(vae, dtype=torch.float16)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` images in ``[0, 1]`` -> ``(B, C, h, w)`` latents (VAE posterior mean times
        ``scaling_factor``, the training convention), float32 on the execution device. A float16
        VAE with ``force_upcast`` encodes in float32."""
        with self._vae_in_float32_if_needed() as vae_dtype:
            x = images.to(device=self._execution_device, dtype=vae_dtype) * 2.0 - 1.0
            if int(self.vae.config.in_channels) == 3:
                x = x.expand(-1, 3, -1, -1)
            mean = self.vae.encode(x).latent_dist.mean
        return mean.float() * float(self.vae.config.scaling_factor)

    def vae_decode_plan(
        self,
        latent_shape: Sequence[int],
        vae_slicing: bool | None = None,
        vae_tiling: bool | None = None,
        vae_tile_size: int | None = None,
    ) -> tuple[bool, int | None]:
        """How :meth:`decode_latents` decodes ``(B, C, h, w)`` latents: ``(sliced, tile)``.

        Args:
            latent_shape: ``(B, C, h, w)`` of the latents.
            vae_slicing: ``True``: one image per VAE call; ``False``: the whole batch in one call;
                ``None``: sliced when ``B > 1`` and the batch has more than :data:`VAE_SLICE_PIXELS`
                decoded pixels, or when ``vae.enable_slicing()`` was called.
            vae_tiling: ``True``: tiles of ``vae_tile_size`` latent cells (default
                :data:`VAE_TILE_LATENT`, or half the latent side when that is smaller, so that
                ``True`` always tiles); ``False``: never; ``None``: tiles of ``vae_tile_size`` (default
                :data:`VAE_TILE_LATENT`) when ``max(h, w)`` exceeds it.
            vae_tile_size: Tile side in latent cells (``vae_scale_factor`` times that in pixels), >= 2.

        Returns:
            Whether to slice, and the tile side in latent cells, or ``None`` when the latent is decoded
            whole. Under ``vae_tiling=None`` a VAE on which ``enable_tiling()`` was called keeps its own
            tile side.

        Raises:
            ValueError: ``vae_slicing``/``vae_tiling`` not a bool or None, ``vae_tile_size`` not an
                integer >= 2, or ``latent_shape`` not 4 positive sizes.
        """
        for name, value in (("vae_slicing", vae_slicing), ("vae_tiling", vae_tiling)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True, False or None, got {value!r}")
        if vae_tile_size is not None and (
            isinstance(vae_tile_size, bool) or not isinstance(vae_tile_size, int) or vae_tile_size < 2
        ):
            raise ValueError(f"vae_tile_size must be an integer >= 2 (latent cells), got {vae_tile_size!r}")
        shape = tuple(int(n) for n in latent_shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"latent_shape must be (B, C, h, w) with sizes >= 1, got {tuple(latent_shape)}")
        batch, side = shape[0], max(shape[2], shape[3])
        pixels = batch * shape[2] * shape[3] * self.vae_scale_factor**2
        if vae_slicing is None:
            sliced = batch > 1 and (pixels > VAE_SLICE_PIXELS or bool(getattr(self.vae, "use_slicing", False)))
        else:
            sliced = vae_slicing and batch > 1
        tile = vae_tile_size or VAE_TILE_LATENT
        if vae_tiling is False:
            return sliced, None
        if vae_tiling is None:
            if vae_tile_size is None and getattr(self.vae, "use_tiling", False):
                tile = int(self.vae.tile_latent_min_size)  # the user's vae.enable_tiling()
            return sliced, (tile if side > tile else None)
        if vae_tile_size is None and side <= tile:
            tile = max(2, -(-side // 2))
        return sliced, (tile if side > tile else None)

    @torch.no_grad()
    def decode_latents(
        self,
        latents: torch.Tensor,
        *,
        vae_slicing: bool | None = None,
        vae_tiling: bool | None = None,
        vae_tile_size: int | None = None,
    ) -> torch.Tensor:
        """``(B, C, h, w)`` latents (scaled by ``scaling_factor``) -> ``(B, 1, H, W)`` float32 images
        in ``[0, 1]`` on the execution device (RGB VAEs averaged to gray).

        Sliced and tiled as :meth:`vae_decode_plan` says, with diffusers' own ``AutoencoderKL`` slicing
        and tiling (tile overlap 25 %, linear blending); the VAE's slicing/tiling settings are restored
        afterwards. A float16 VAE with ``force_upcast`` decodes in float32.
        """
        sliced, tile = self.vae_decode_plan(tuple(latents.shape), vae_slicing, vae_tiling, vae_tile_size)
        vae = self.vae
        names = ("use_slicing", "use_tiling", "tile_sample_min_size", "tile_latent_min_size")
        saved = {k: getattr(vae, k) for k in names}
        scaled = latents / vae.config.scaling_factor
        try:
            vae.use_slicing = sliced
            vae.use_tiling = tile is not None
            if tile is not None:
                vae.tile_latent_min_size = tile
                vae.tile_sample_min_size = tile * self.vae_scale_factor
            with self._vae_in_float32_if_needed() as vae_dtype:
                decoded = vae.decode(scaled.to(vae_dtype)).sample.float()
        finally:
            for k, v in saved.items():
                setattr(vae, k, v)
        if decoded.shape[1] == 3:
            decoded = decoded.mean(dim=1, keepdim=True)
        return ((decoded + 1.0) / 2.0).clamp(0.0, 1.0)

    def get_timesteps(self, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
        """Set the scheduler's timesteps and return the ones to run and the index they start at.

        ``int(num_inference_steps * strength)`` steps are run (all of them at ``strength=1``, none at
        ``strength=0``); the scheduler's ``begin_index`` is set so ``add_noise`` matches the start.
        """
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        run = min(int(num_inference_steps * strength), num_inference_steps)
        order = int(getattr(self.scheduler, "order", 1))
        t_start = (num_inference_steps - run) * order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start)
        return self.scheduler.timesteps[t_start:], t_start

    def _sigma(self, t: torch.Tensor | int) -> float:
        """Noise level ``sqrt((1 - alpha_bar_t) / alpha_bar_t)`` of training timestep ``t`` (the
        sampler's ``alphas_cumprod``; fractional timesteps of Karras schedules are rounded)."""
        ac = float(self.scheduler.alphas_cumprod[int(round(float(t)))])
        return math.sqrt((1.0 - ac) / ac)

    # ------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        seeds: Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = 2.0,
        guidance_interval: tuple[float, float] | None = None,
        guidance_rescale: float = 0.0,
        image: np.ndarray | torch.Tensor | None = None,
        strength: float = 1.0,
        keep_mask: np.ndarray | torch.Tensor | None = None,
        precision: Precision = "auto",
        output_type: str = "np",
        autocast_bf16: bool | None = None,
        callback: Callable[[int, int], None] | None = None,
        return_dict: bool = True,
        vae_slicing: bool | None = None,
        vae_tiling: bool | None = None,
        vae_tile_size: int | None = None,
    ) -> RadSynthPipelineOutput | tuple:
        """Generate one image per prompt, from noise or from a starting ``image``.

        Args:
            prompt: One prompt or a list (one image each).
            seeds: One seed per image (default ``0..B-1``); the starting noise depends on it alone.
            negative_prompt: Prompt(s) to steer away from; default the null prompt ``""``.
            num_inference_steps: Sampler steps of a full (``strength=1``) run.
            guidance_scale: Classifier-free guidance weight (1 = no guidance, 0 = unconditional).
            guidance_interval: ``(low, high)`` noise levels: guidance applies only at steps whose
                ``sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` lies in ``[low, high]``; the other
                steps use the conditional prediction alone, in one UNet pass instead of two
                (Kynkaenniemi et al. 2024, "Applying guidance in a limited interval"). ``None``
                (default): every step. Images are the same with any interval that holds every step's
                sigma.
            guidance_rescale: ``phi`` in ``[0, 1]`` of Lin et al. 2023 ("Common diffusion noise schedules
                and sample steps are flawed", §3.4; diffusers' ``rescale_noise_cfg``): each image's guided
                prediction is rescaled to the standard deviation of its conditional prediction and mixed
                with the unscaled one, ``phi * rescaled + (1 - phi) * guided``, which undoes the contrast
                that strong guidance adds. ``0`` (default): plain guidance. Per image, so images do not
                depend on the batch.
            image: Starting images for image-to-image, ``(B, H, W)`` (or one ``(H, W)`` for all)
                float in ``[0, 1]`` at the model's :attr:`resolution`. Encoded with the VAE (posterior
                mean times ``scaling_factor``).
            strength: How much of ``image`` to redo (SDEdit): the encoded image is noised with the
                seed's noise to the sampler's timestep at ``strength`` and the last
                ``int(num_inference_steps * strength)`` steps run under the prompt. ``1`` ignores the
                image's content (exactly text-to-image with the same seed); ``0`` runs no step and
                returns the VAE reconstruction of ``image``. Values below 1 need ``image``.
            keep_mask: Region to keep, ``(B, H, W)`` (or ``(H, W)``) in ``[0, 1]``, 1 = keep the
                original (needs ``image``). After every step the latent outside the editable region is
                replaced by the original's latent re-noised to that step (same seed noise; RePaint-style
                blending without resampling jumps), the mask averaged down to latent size; the last
                step blends in the clean latent. Kept pixels are the VAE reconstruction of ``image``
                (paste ``image`` back yourself for exact pixels).
            precision: UNet arithmetic: ``"auto"`` (bf16 autocast where the hardware has it, see
                :meth:`resolve_precision`), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA/MPS) autocast.
                The sampler's arithmetic stays float32, and so does the VAE's unless it was loaded in
                float16 without ``force_upcast``.
            output_type: ``"np"`` (``(B, H, W)`` float32 in ``[0, 1]``), ``"pil"``, ``"pt"``
                (``(B, 1, H, W)`` tensor) or ``"latent"`` (the undecoded ``(B, C, h, w)`` float32
                latents, scaled like :meth:`encode_images`' output).
            autocast_bf16: Deprecated switch kept for callers of older versions: ``True`` means
                ``precision="bf16"``, ``False`` means ``precision="fp32"``; ``None`` (default) defers
                to ``precision``.
            callback: Called as ``callback(step_index, num_steps_run)`` after each step.
            return_dict: Return a :class:`RadSynthPipelineOutput` (else ``(images, seeds)``).
            vae_slicing: Decode one image per VAE call (bounded memory for large batches; the same
                pixels within 1e-5). ``None`` (default): when the batch exceeds :data:`VAE_SLICE_PIXELS`
                decoded pixels. See :meth:`vae_decode_plan`.
            vae_tiling: Decode each image in overlapping tiles (bounded memory for large images;
                pixels near seams change). ``None`` (default): when the latent side exceeds
                ``vae_tile_size`` (default :data:`VAE_TILE_LATENT`). Recorded in
                :attr:`RadSynthPipelineOutput.vae_tiled`.
            vae_tile_size: Tile side in latent cells (pixels: times :attr:`vae_scale_factor`).

        Raises:
            ValueError: an invalid argument (named in the message).
        """
        # 1. Check inputs.
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        self.check_inputs(prompts, negative_prompt, num_inference_steps, guidance_scale, seeds, strength)
        interval = check_guidance_interval(guidance_interval)
        if not 0.0 <= float(guidance_rescale) <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        rescale_cfg = None
        if guidance_rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as rescale_cfg
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil', 'pt' or 'latent', got {output_type!r}")
        if autocast_bf16 is not None:
            precision = "bf16" if autocast_bf16 else "fp32"
        precision = self.resolve_precision(precision)
        if image is None and strength < 1.0:
            raise ValueError(f"strength={strength} needs an image (strength < 1 edits a starting image)")
        if image is None and keep_mask is not None:
            raise ValueError("keep_mask needs an image (the original to keep)")
        pixels = None if image is None else self._pixel_batch(image, len(prompts), "image")
        mask = None if keep_mask is None else self._pixel_batch(keep_mask, len(prompts), "keep_mask")
        side = int(self.unet.config.sample_size)
        latent_shape = (len(prompts), int(self.unet.config.in_channels), side, side)
        _, tile = self.vae_decode_plan(latent_shape, vae_slicing, vae_tiling, vae_tile_size)

        # 2. Encode the prompts (and the negative/null prompts for guidance), each distinct one once.
        #    A UNet with an attribute input also gets each prompt's attribute vector (side, size, ...).
        cond = self.encode_prompt(prompts)
        use_cfg = guidance_scale != 1.0
        negatives = negative_prompt or [""] * len(prompts)
        if use_cfg:
            uncond = self.encode_prompt(negatives)
            context = torch.cat([uncond, cond])
        else:
            context = cond
        labels = None
        if takes_attributes(self.unet):
            labels = torch.from_numpy(prompt_vectors((negatives if use_cfg else []) + prompts))

        # 3. Timesteps (the last int(steps * strength) of the schedule).
        timesteps, _ = self.get_timesteps(num_inference_steps, strength)

        # 4. Initial latents: the seed's noise; for strength < 1 the encoded image noised to timesteps[0].
        device, dtype = self._execution_device, torch.float32  # sampler arithmetic in float32
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = self._draw_noise(generators).to(device=device, dtype=torch.float32)
        init_latents = None if pixels is None else self.encode_images(pixels)
        if strength >= 1.0 or init_latents is None:
            latents = (noise * self.scheduler.init_noise_sigma).to(dtype)
        elif len(timesteps) == 0:
            latents = init_latents.to(dtype)
        else:
            latents = self.scheduler.add_noise(init_latents, noise, timesteps[:1]).to(dtype)

        # 5. Keep-mask at latent size: (B, 1, h, w) in [0, 1], 1 = keep the original.
        latent_mask = None
        if mask is not None:
            size = tuple(latents.shape[-2:])
            latent_mask = F.interpolate(mask, size=size, mode="area").to(device=device, dtype=dtype)

        # 6. Denoise with classifier-free guidance (cond and uncond in one UNet call). Stochastic
        #    samplers (DDPM) draw each image's step noise from its own generator, after its initial noise.
        stochastic = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generators} if stochastic else {}
        unet, run_dtype, use_autocast = self.denoiser(precision)
        autocast = torch.autocast(
            device.type, dtype=_DTYPES[precision], enabled=use_autocast and precision != "fp32"
        )
        context = context.to(run_dtype)
        if labels is not None:
            labels = labels.to(device=device, dtype=run_dtype)
        batch = latents.shape[0]
        for i, t in enumerate(self.progress_bar(timesteps)):
            guided = use_cfg and (interval is None or interval[0] <= self._sigma(t) <= interval[1])
            model_in = torch.cat([latents] * 2) if guided else latents
            model_in = self.scheduler.scale_model_input(model_in, t).to(run_dtype)
            step_context, step_labels = context, labels
            if use_cfg and not guided:  # the conditional half only
                step_context = context[batch:]
                step_labels = None if labels is None else labels[batch:]
            with autocast:
                pred = unet(model_in, t, encoder_hidden_states=step_context, class_labels=step_labels).sample
            pred = pred.float()
            if guided:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
                if rescale_cfg is not None:
                    pred = rescale_cfg(pred, pred_cond, guidance_rescale=float(guidance_rescale))
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample
            if latent_mask is not None:
                if i + 1 < len(timesteps):
                    known = self.scheduler.add_noise(init_latents, noise, timesteps[i + 1 : i + 2])
                else:
                    known = init_latents
                latents = latent_mask * known.to(dtype) + (1.0 - latent_mask) * latents
            if callback is not None:
                callback(i, len(timesteps))

        # 7. Decode (float32; sliced / tiled as vae_decode_plan says).
        if output_type != "latent":
            images = self.decode_latents(
                latents, vae_slicing=vae_slicing, vae_tiling=vae_tiling, vae_tile_size=vae_tile_size
            )
        else:
            images = latents

        # 8. Post-process to the requested type.
        if output_type == "latent":
            out: np.ndarray | list | torch.Tensor = latents.float().cpu()
        elif output_type == "pt":
            out = images.cpu()
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
        return RadSynthPipelineOutput(
            images=out, seeds=seeds, precision=precision, vae_tiled=tile is not None and output_type != "latent"
        )
