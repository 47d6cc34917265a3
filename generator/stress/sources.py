"""Counterfactual images from a text-conditioned diffusion model: from noise and from real images.

- :meth:`DiffusionSource.from_noise`: the pipeline's own sampler. The initial latent depends only on the
  seed, so one seed under two prompts starts from the same noise: the two images differ mainly in what
  the prompts change.
- :meth:`DiffusionSource.edit`: SDEdit (Meng et al. 2022) through the pipeline's ``image=``,
  ``strength=`` and ``keep_mask=``: the image is encoded by the VAE, noised with the seed's noise to the
  timestep where the last ``int(steps * strength)`` steps begin and denoised under the new prompt; with a
  keep mask the kept part is re-imposed after every step (latent blending) and the original's pixels
  are pasted back at the end.
- :meth:`DiffusionSource.check_spec`: does the model have the words the spec needs? A value whose words
  the tokenizer maps to its unknown token, or two values that give the same text conditioning (e.g. a
  prompt cut off before the varied word), is an error before any image is made.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from generator.models.model_folder import ModelInfo
from generator.models.pipeline import RadSynthPipeline
from generator.stress.spec import StressSpec

__all__ = ["DiffusionSource"]


class DiffusionSource:
    """Images for a stress test from a loaded :class:`RadSynthPipeline`.

    Args:
        pipe: The pipeline, its scheduler already the requested sampler.
        info: The model's :class:`ModelInfo`.
        steps: Sampler steps (an edit runs ``int(steps * strength)`` of them, at least one).
        guidance_scale: Classifier-free guidance weight.
        sampler: Sampler name (recorded in the manifest).
        negative_prompt: Negative prompt (default: the null prompt).
        autocast_bf16: Run the UNet in bfloat16 autocast.

    Raises:
        ValueError: ``steps`` < 1 or ``guidance_scale`` < 0.
    """

    def __init__(self, pipe: RadSynthPipeline, info: ModelInfo, *, steps: int = 25, guidance_scale: float = 2.0,
                 sampler: str = "dpm", negative_prompt: str | None = None, autocast_bf16: bool = False) -> None:
        if int(steps) < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        if float(guidance_scale) < 0:
            raise ValueError(f"--guidance-scale must be >= 0, got {guidance_scale}")
        self.pipe = pipe
        self.info = info
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.sampler = sampler
        self.negative_prompt = negative_prompt
        self.autocast_bf16 = bool(autocast_bf16)
        self.name = info.model_hash
        self.resolution = int(pipe.resolution)

    def manifest_fields(self) -> dict[str, Any]:
        """The fields ``radsynth generate`` writes about the model and sampler."""
        return {"model": self.info.model_hash, "model_path": str(self.info.path), "sampler": self.sampler,
                "steps": self.steps, "guidance_scale": self.guidance_scale,
                "negative_prompt": self.negative_prompt, "intensity": self.info.intensity}

    # ------------------------------------------------------------------------------ vocabulary
    def check_spec(self, spec: StressSpec) -> None:
        """Check that the model can tell the spec's values apart.

        Raises:
            ValueError: a value has words the tokenizer does not know, words absent from the model's
                recorded training vocabulary (``radsynth.json`` ``text_vocabulary``, when present), or
                two values of a varied attribute give identical text conditioning (naming the spec key,
                the values and the model folder).
        """
        tok = self.pipe.tokenizer
        where = f"--model {self.info.path}"
        unk = getattr(tok, "unk_token_id", None)
        vocab = self.info.raw.get("text_vocabulary")
        known = {str(w).lower() for w in vocab} if isinstance(vocab, (list, tuple)) else None
        entries = [(f"vary.{a}", v) for a, vals in spec.vary.items() for v in vals]
        entries += [(f"fixed.{a}", v) for a, v in spec.fixed.items()]
        for key, value in entries:
            words = str(value).split()
            missing = []
            for w in words:
                ids = tok(w, add_special_tokens=False)["input_ids"]
                if unk is not None and unk in ids:
                    missing.append(w)
                elif known is not None and w.lower().strip(".,;:") not in known and not w.isdigit():
                    missing.append(w)
            if missing:
                raise ValueError(
                    f"{where} lacks the vocabulary of {key} {value!r}: it does not know {missing} "
                    "(unknown to its text encoder or absent from its training texts), so it cannot draw this value"
                )
        cells = spec.cells
        cond = self.pipe.encode_prompt([c.prompt for c in cells]).float().cpu()
        for pt in spec.pair_types:
            for f, t in pt.members:
                if torch.equal(cond[f], cond[t]):
                    raise ValueError(
                        f"{where}: vary.{pt.attribute} values {pt.from_value!r} and {pt.to_value!r} give the "
                        f"same text conditioning (prompt {cells[f].prompt!r}); the model cannot tell them apart "
                        "(is the prompt longer than its tokenizer's limit?)"
                    )

    # ------------------------------------------------------------------------------ images
    def from_noise(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        """One image per prompt and seed: ``(B, H, W)`` float32 in ``[0, 1]``."""
        return np.asarray(self.pipe(list(prompts), seeds=[int(s) for s in seeds], negative_prompt=self.negative_prompt,
                                    num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                                    **self._precision()).images, dtype=np.float32)

    def _precision(self) -> dict[str, Any]:
        """Float32 unless bf16 was asked for; never the pipeline's "auto" (its choice depends on the
        machine, and the images of a run must not)."""
        return {"precision": "bf16" if self.autocast_bf16 else "fp32"}

    def edit(self, images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int], *, strength: float,
             keep_masks: np.ndarray | None = None) -> np.ndarray:
        """SDEdit: re-noise ``images`` part way and denoise them under ``prompts``.

        Args:
            images: ``(B, H, W)`` float in ``[0, 1]`` at the model's resolution.
            prompts: One prompt per image.
            seeds: One seed per image (the noise added).
            strength: Share of the noise schedule re-run, in ``(0, 1]`` (1 = from pure noise).
            keep_masks: ``(B, H, W)`` in ``[0, 1]``, 1 = keep the original pixel; ``None`` = edit everywhere.

        Returns:
            ``(B, H, W)`` float32 in ``[0, 1]``.

        Raises:
            ValueError: shapes that do not match or ``strength`` outside ``(0, 1]``.
        """
        x = np.asarray(images, dtype=np.float32)
        b = len(prompts)
        if x.shape != (b, self.resolution, self.resolution):
            raise ValueError(f"images must be ({b}, {self.resolution}, {self.resolution}), got {x.shape}")
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if keep_masks is not None and np.shape(keep_masks) != x.shape:
            raise ValueError(f"keep_masks must have the shape of images {x.shape}, got {np.shape(keep_masks)}")
        out = np.asarray(self.pipe(
            list(prompts), seeds=[int(s) for s in seeds], image=x, strength=float(strength), keep_mask=keep_masks,
            negative_prompt=self.negative_prompt, num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale, **self._precision()).images, dtype=np.float32)
        if keep_masks is not None:  # kept pixels are the original's, not its VAE reconstruction
            k = np.asarray(keep_masks, dtype=np.float32)
            out = k * x + (1.0 - k) * out
        return np.clip(out, 0.0, 1.0).astype(np.float32)
