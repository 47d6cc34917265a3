"""Two-stage training driven by ``accelerate``: VAE, then a text-conditioned UNet on cached latents.

Determinism and resumption: every random draw of a training step (batch indices, noise, timesteps,
prompt dropout, paraphrase choice) comes from a generator seeded by ``(seed, stage, step, process)``.
Together with the model, optimizer, learning-rate and EMA state in a checkpoint, a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.

Data: the trainer reads images through :class:`generator.data.prepared.TrainingImages`, either an
:class:`IngestResult` in memory (wrapped as :class:`InMemoryImages`) or a :class:`PreparedDataset` on disk
(flat memory in the number of images). VAE batches come from a ``torch.utils.data.DataLoader`` (optionally
with worker processes) whose sampler yields, per step, the indices drawn from that step's generator;
the workers only read (and, with ``augment``, augment) pixels, so results do not depend on their number.
The UNet stage reads posterior rows from a memory-mapped latent cache on disk.

The training workspace is ``<output>/checkpoints``; it is removed when the model folder has been
written, unless ``keep_checkpoints`` is set. Its checkpoints hold safetensors and JSON only, never
pickles (a checkpoint folder may come from someone else, and loading must not run code); the latent
cache is plain ``.npy`` (read without pickle) and the only place derived from pixels, besides a
``prepared/`` dataset that ``radsynth train --stream-from-disk`` writes there::

    checkpoints/
      run.json                 what must match on resume: config, resolution, seed, data fingerprint,
                               text encoder hash, mixed precision, gradient accumulation, init_from hash,
                               augmentation settings
      latents-mean.npy         (N, C, h, w) float32 posterior means of every image (unscaled latents),
      latents-std.npy          and standard deviations; memory-mapped by the UNet stage
      latents.json             written last: the VAE weights' and the data's SHA-256, shape, latent std;
                               a resumed run reuses the cache when they match
      text-embeds.npy          (T, L, H) float16 hidden states of the T distinct prompt texts (memory-mapped)
      prepared/                (``--stream-from-disk`` only) the prepared copy of a raw source; kept by
                               a fresh start, resumed by ``--resume``
      unet-500/                one folder per checkpoint, ``<stage>-<step>`` (only the latest is kept;
                               a stage's step checkpoints go once the stage is final)
        model.safetensors      weights of the network being trained (float32 state_dict)
        optimizer.safetensors  AdamW state tensors, keys ``state.<param index>.<name>``
        ema.safetensors        UNet stage only: EMA weights, keys ``shadow.<parameter name>``
        state.json             step, step budget, optimizer param groups and non-tensor state,
                               LR scheduler state, EMA counters, grad-scaler state, and the size and
                               SHA-256 of every safetensors file above
      vae-final/               the finished VAE: model.safetensors + state.json (step, loss,
                               latent scaling factor)

A checkpoint is written by the main process into a hidden temporary folder and renamed into place, so
a folder named ``<stage>-<step>`` is always complete. Only the three safetensors names above and
``state.json`` are ever read; other files (a planted ``*.pkl``/``*.bin``) are ignored. The format does
not depend on the number of processes, so a checkpoint loads at another world size (exactly resumable
at the same one). Checkpoints are taken between optimiser steps only (accumulated gradients are not
saved).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from conditioning.attributes import ATTRIBUTE_SCHEMA, prompt_vectors
from conditioning.prompts import paraphrase_prompt
from conditioning.text_encoder import DEFAULT_TEXT_ENCODER, encode_prompts, hidden_size, load_text_encoder
from generator._utils import (
    MIXED_PRECISION,
    best_device,
    cpu_only,
    resolve_mixed_precision,
    training_autocast,
)
from generator.checkpoints import (
    CHECKPOINT_FORMAT,
    STATE_JSON,
    json_plain,
    ema_from_files,
    ema_to_files,
    latest_checkpoint,
    load_weights,
    optimizer_from_files,
    optimizer_to_files,
    read_checkpoint_state,
    read_checkpoint_tensors,
    write_checkpoint,
)
from generator.data import IngestResult
from generator.data.augment import Augment
from generator.data.prepared import BatchReader, InMemoryImages, PreparedDataset, TrainingImages
from generator.manifest import atomic_write_text
from generator.models.build import (
    attribute_embedding_config, build_noise_scheduler, build_unet, build_vae, takes_attributes,
)
from generator.models.config import TrainConfig
from generator.models.model_folder import (
    ModelInfo,
    absolute_paths,
    load_pipeline,
    read_model_info,
    save_model_folder,
    state_dict_hash,
    text_encoder_name,
)
from generator.models.pipeline import RadSynthPipeline
from generator.models.samplers import make_sampler
from generator.recipe import (
    StepPlan,
    denoising_loss,
    denoising_target,
    draw_records,
    oversample_weights,
    unet_ema,
    warmup_cosine,
)

#: Called after every optimisation step as ``hook(stage, step)``; tests use it to interrupt a run.
StepHook = Callable[[str, int], None]


#: Version of the checkpoint layout (``state.json`` ``"format"``).

_PARAPHRASES_PER_RECORD = 3
_LOG_EVERY = 10
_RUN_JSON = "run.json"
#: Sub-folder of the workspace that holds a prepared copy of a raw source (``--stream-from-disk``).
PREPARED_DIR = "prepared"
_LATENTS_JSON = "latents.json"
_LATENT_CHUNK = 64  # images per VAE forward when caching latents
_MAX_SEED = 2**32 - 1


def _package_version() -> str:
    """The installed RadSynth version (``"unknown"`` when run from an uninstalled tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("radsynth")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class TrainResult:
    """Summary of a finished run.

    Attributes:
        output: The model folder.
        steps: Optimisation steps done per stage (``{"vae": n, "unet": m}``).
        final_loss: Mean loss of the last logged window per stage.
        seconds: Wall time per stage.
    """

    output: Path
    steps: dict[str, int] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _step_generator(seed: int, stage: str, step: int, rank: int) -> torch.Generator:
    stage_id = {"vae": 1, "unet": 2}[stage]
    value = ((seed * 1_000_003 + stage_id) * 1_000_033 + step) * 64 + rank
    return torch.Generator().manual_seed(value % 2**64)


def _init_architecture(unet: Mapping[str, Any], vae: Mapping[str, Any] | None, resolution: int) -> dict[str, Any]:
    """The :class:`TrainConfig` fields that a fine-tune takes from the ``init_from`` folder's networks,
    given their diffusers ``config.json`` contents: the UNet's always; the VAE's and the latent grid when
    the VAE is kept (``vae`` given; ``None``: a new VAE, whose latent channels stay the config's and are
    checked against the UNet's by the caller). So ``radsynth.json`` and the model card describe the
    networks that were trained, not the preset's defaults."""
    out: dict[str, Any] = {
        "unet_channels": tuple(int(c) for c in unet["block_out_channels"]),
        "unet_attention": tuple(str(b).startswith("CrossAttn") for b in unet["down_block_types"]),
    }
    if isinstance(unet.get("layers_per_block"), int):
        out["unet_layers_per_block"] = unet["layers_per_block"]
    if isinstance(unet.get("attention_head_dim"), int):
        out["unet_heads"] = unet["attention_head_dim"]
    if isinstance(unet.get("norm_num_groups"), int):
        out["norm_groups"] = unet["norm_num_groups"]
    if vae is not None:
        blocks = tuple(int(c) for c in vae["block_out_channels"])
        out.update(vae_channels=blocks, latent_size=resolution // 2 ** (len(blocks) - 1),
                   latent_channels=int(vae["latent_channels"]),
                   vae_mid_block_attention=bool(vae.get("mid_block_add_attention", True)))
        if isinstance(vae.get("layers_per_block"), int):
            out["vae_layers_per_block"] = vae["layers_per_block"]
    return out


def _lr_lambda(plan: StepPlan, warmup: int) -> Callable[[int], float]:
    """:func:`generator.recipe.warmup_cosine` over the plan's current ``total`` (refitted under a
    time budget, so the schedule reads it at every step)."""
    return lambda step: warmup_cosine(step, plan.total, warmup)


def _oversample_line(cfg: Mapping[str, Any]) -> str:
    """The model card's words for ``train_config["oversample"]`` (empty when the draws were uniform)."""
    pairs = cfg.get("oversample") or ()
    if not pairs:
        return ""
    return "; UNet draws oversampled: " + ", ".join(f"'{t}' x{float(w):g}" for t, w in pairs)


class _StepBatches:
    """Sampler of a DataLoader over a :class:`BatchReader`: from ``first_step`` on, yields per step the key
    ``(indices, augment_seed)`` whose indices are the first draw of ``_step_generator(seed, stage, step,
    rank)`` (``torch.randint(0, n, (batch,))``) and whose augmentation seed (only with ``augment``) is the
    next draw. The training loop repeats the same draws on its own generator, so its later draws (noise,
    timesteps) are those of a run without a loader. Unbounded: the training loop decides when to stop."""

    def __init__(self, seed: int, stage: str, rank: int, first_step: int, n: int, batch: int, augment: bool) -> None:
        self.seed, self.stage, self.rank, self.first_step = seed, stage, rank, first_step
        self.n, self.batch, self.augment = n, batch, augment

    def __iter__(self) -> Any:
        step = self.first_step
        while True:
            g = _step_generator(self.seed, self.stage, step, self.rank)
            yield _draw_batch(g, self.n, self.batch, self.augment)
            step += 1


def _draw_batch(g: torch.Generator, n: int, batch: int, augment: bool) -> tuple[tuple[int, ...], int | None]:
    """The batch draws of a step: ``batch`` indices in ``[0, n)`` and, with ``augment``, a seed in
    ``[0, 2**62)``; advances ``g`` past them."""
    idx = torch.randint(0, n, (batch,), generator=g)
    aug = int(torch.randint(0, 2**62, (1,), generator=g)) if augment else None
    return tuple(int(i) for i in idx), aug


class _Sequential:
    """Sampler yielding ``(range(i, i + chunk), None)`` keys over ``n`` images (latent caching)."""

    def __init__(self, n: int, chunk: int) -> None:
        self.n, self.chunk = n, chunk

    def __iter__(self) -> Any:
        for i in range(0, self.n, self.chunk):
            yield tuple(range(i, min(i + self.chunk, self.n))), None


class _NpyRows:
    """Writes a C-order ``.npy`` file block after block of rows, in order, through plain file writes.

    Not through a memory map: pages written through a map stay in the process's resident set until it is
    unmapped, so writing a 2 GB prompt-state file that way made peak RSS grow with the number of texts.

    Raises:
        ValueError: a block out of order, of another row shape, or too few rows at :meth:`close`.
    """

    def __init__(self, path: Path, dtype: Any, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape, self.rows = Path(path), np.dtype(dtype), tuple(shape), 0
        self._f = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._f, header)

    def write(self, start: int, block: np.ndarray) -> None:
        """Rows ``start .. start + len(block)``; ``start`` must be the number of rows written so far."""
        if start != self.rows or tuple(block.shape[1:]) != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.path.name}: block of shape {block.shape} at row {start} does not follow "
                             f"{self.rows} rows of {self.shape}")
        self._f.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += len(block)

    def close(self) -> None:
        """Flush and close; the file must hold all ``shape[0]`` rows."""
        self._f.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.rows} of {self.shape[0]} rows written")


class LatentCache:
    """The VAE posterior of every training image on disk: ``latents-mean.npy`` and ``latents-std.npy``,
    each ``(N, C, h, w)`` float32 (unscaled latents), in ``folder``.

    :meth:`rows` opens both files as read-only memory maps for each call and copies the requested
    rows out, so the resident memory of a training process does not grow with ``N`` (no page of the
    maps stays mapped between steps).

    Attributes:
        folder: Where the files are.
        shape: ``(N, C, h, w)``.
        std: Standard deviation of all posterior means (sets the VAE's latent scaling factor).
    """

    MEAN, STD = "latents-mean.npy", "latents-std.npy"

    def __init__(self, folder: Path, shape: tuple[int, ...], std: float) -> None:
        self.folder, self.shape, self.std = Path(folder), tuple(int(v) for v in shape), float(std)

    def open(self) -> tuple[np.ndarray, np.ndarray]:
        """Both files as read-only ``np.memmap`` arrays (no pickle is ever loaded).

        Raises:
            ValueError: a file is missing, not float32 or not of :attr:`shape` (naming it).
        """
        out = []
        for name in (self.MEAN, self.STD):
            path = self.folder / name
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ValueError(f"latent cache {str(path)!r} is unreadable ({exc})") from None
            if arr.dtype != np.float32 or arr.shape != self.shape:
                raise ValueError(f"latent cache {str(path)!r} holds {arr.dtype} {arr.shape}, expected "
                                 f"float32 {self.shape}")
            out.append(arr)
        return out[0], out[1]

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means and stds of images ``idx`` (``(B,)`` int64): two ``(B, C, h, w)`` float32 tensors."""
        mean, std = self.open()
        i = idx.numpy()
        return torch.from_numpy(np.array(mean[i])), torch.from_numpy(np.array(std[i]))


class TextEmbeddings:
    """Hidden states of every distinct prompt text on disk, ``(T, L, H)`` float16 (``text-embeds.npy``);
    like :class:`LatentCache`, rows are read through a memory map opened per call (flat memory in T)."""

    NAME = "text-embeds.npy"
    META = "text-embeds.json"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @staticmethod
    def matches(path: Path, meta_path: Path, ident: Mapping[str, Any]) -> bool:
        """Whether ``path`` holds intact states described by ``meta_path`` as ``ident``."""
        try:
            meta = json.loads(meta_path.read_text())
            rows = np.load(path, mmap_mode="r", allow_pickle=False).shape[0]
        except (OSError, ValueError, EOFError, UnicodeDecodeError):
            return False
        return meta == dict(ident) and rows == ident["num_texts"]

    def rows(self, ids: list[int]) -> torch.Tensor:
        """Embeddings of texts ``ids``: ``(B, L, H)`` float16."""
        arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return torch.from_numpy(np.array(arr[np.asarray(ids, dtype=np.int64)]))


def _ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of ``(B, C, H, W)`` images in ``[-1, 1]`` (7x7 uniform window)."""
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    k = min(7, x.shape[-1])
    mu_x, mu_y = F.avg_pool2d(x, k, 1), F.avg_pool2d(y, k, 1)
    sxx = F.avg_pool2d(x * x, k, 1) - mu_x**2
    syy = F.avg_pool2d(y * y, k, 1) - mu_y**2
    sxy = F.avg_pool2d(x * y, k, 1) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).mean()


class _VAEWithLoss(torch.nn.Module):
    """Wraps the VAE so that one ``forward`` (through DDP when distributed) gives reconstruction and KL."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``(B, 1, H, W)`` in ``[-1, 1]``; ``eps``: standard normal latent noise.
        Returns the reconstruction (same shape as ``x``) and the per-image KL ``(B,)``."""
        dist = self.vae.encode(x).latent_dist
        z = dist.mean + dist.std * eps
        return self.vae.decode(z).sample, dist.kl()


class _Log:
    """Progress bar plus CSV log (main process only); the CSV file is created at its first row."""

    COLUMNS = ["stage", "step", "loss", "lr", "steps_per_s", "images_per_s", "elapsed_s"]

    def __init__(self, path: Path, enabled: bool, progress: bool) -> None:
        self.path, self.enabled, self.progress = path, enabled, progress
        self.bar: tqdm | None = None

    def start(self, stage: str, total: int | None, initial: int) -> None:
        if self.enabled:
            self.bar = tqdm(total=total, initial=initial, desc=stage.upper(), disable=not self.progress)

    def step(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def row(self, *values: Any) -> None:
        if self.enabled:
            new = not self.path.exists()
            with open(self.path, "a", newline="") as fh:
                if new:
                    csv.writer(fh).writerow(self.COLUMNS)
                csv.writer(fh).writerow(values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------- checkpoint files
class Trainer:
    """Trains a RadSynth model folder from an :class:`IngestResult` or a :class:`PreparedDataset`.

    The object is complete once constructed: arguments are checked, the accelerator, noise schedule,
    result and log exist; :meth:`run` does the work (and may be called once).

    Args:
        data: Training data: an :class:`IngestResult` loaded at ``resolution`` (held in memory), a
            :class:`PreparedDataset` prepared at ``resolution`` (read from disk, flat memory), or any
            :class:`TrainingImages`.
        output: Model folder to write.
        config: Training configuration (a preset, possibly with overrides).
        resolution: Image side in pixels (``config.latent_size`` times a power of two).
        text_encoder: Hugging Face text encoder folder or id; ``None`` for the bundled MiniLM.
        seed: Seed of every random draw, in ``[0, 2**32)``.
        max_minutes: Wall-clock budget of the whole run, finite and > 0 (the VAE gets
            ``config.vae_share`` of it).
        max_steps: Upper bound of optimisation steps per stage (>= 1).
        mixed_precision: ``"auto"`` (bf16 where the hardware has native bfloat16, else no), ``"no"``,
            ``"fp16"`` or ``"bf16"`` (passed to ``accelerate``).
        gradient_accumulation_steps: Micro-batches per optimiser step.
        resume: Continue from the latest checkpoint in ``output/checkpoints`` (which must come from
            the same configuration, data, seed and text encoder).
        keep_checkpoints: Keep ``output/checkpoints`` after the model is written.
        link_packaged_text_encoder: With the default encoder, leave it out of the model folder and
            name its package in ``radsynth.json`` instead (the bundled demo model does this).
        save_dtype: dtype of the saved VAE and UNet weights (``torch.float16`` halves the folder;
            loading casts back to the requested dtype).
        progress: Show progress bars.
        step_hook: Called after each step as ``hook(stage, step)``.
        init_from: Fine-tune: a RadSynth model folder or a Stable-Diffusion-layout folder. Its UNet
            (architecture and weights), noise schedule and prediction type are the starting point; its
            text encoder is used frozen (unless ``text_encoder`` names another of the same width); its
            VAE is used frozen when ``resolution`` equals the model's resolution (no VAE stage), and a
            new 1-channel VAE is trained otherwise.
        dataloader_workers: Worker processes that read VAE batches (0: in this process); results do
            not depend on it. Workers start with ``forkserver`` where available (``spawn`` otherwise).
        augment: Random augmentation of VAE-stage batches (shift, zoom, rotation, intensity), seeded
            from each step's generator; never a left-right flip (``hflip`` is refused). ``None``: off.
        gradient_checkpointing: Recompute activations in the backward pass of the UNet and the VAE
            (less memory at large resolutions, slower; same results).

    Raises:
        ValueError: an argument out of range (the message names it and the value).
        FileNotFoundError: ``init_from`` is not a model folder.
    """

    def __init__(
        self,
        data: IngestResult,
        output: str | Path,
        config: TrainConfig,
        *,
        resolution: int = 64,
        text_encoder: str | None = None,
        seed: int = 0,
        max_minutes: float | None = None,
        max_steps: int | None = None,
        mixed_precision: str = "auto",
        gradient_accumulation_steps: int = 1,
        resume: bool = False,
        keep_checkpoints: bool = False,
        link_packaged_text_encoder: bool = False,
        save_dtype: torch.dtype = torch.float32,
        progress: bool = True,
        step_hook: StepHook | None = None,
        init_from: str | Path | None = None,
        dataloader_workers: int = 0,
        augment: Augment | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        if max_minutes is not None and (
            isinstance(max_minutes, bool) or not isinstance(max_minutes, (int, float))
            or not math.isfinite(max_minutes) or not 0 < max_minutes <= 1e6
        ):
            raise ValueError(f"max_minutes must be a finite number in (0, 1e6], got {max_minutes!r}")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {_MAX_SEED}], got {seed!r}")
        if (isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int)
                or gradient_accumulation_steps < 1):
            raise ValueError(f"gradient_accumulation_steps must be an integer >= 1, got {gradient_accumulation_steps!r}")
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {mixed_precision!r}")
        if save_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"save_dtype must be torch.float32, float16 or bfloat16, got {save_dtype!r}")
        if (isinstance(dataloader_workers, bool) or not isinstance(dataloader_workers, int)
                or not 0 <= dataloader_workers <= 256):
            raise ValueError(f"dataloader_workers must be an integer in [0, 256], got {dataloader_workers!r}")
        if augment is not None and not isinstance(augment, Augment):
            raise ValueError(f"augment must be an Augment or None, got {type(augment).__name__}")
        if augment is not None and augment.hflip:
            raise ValueError("augment.hflip must be False: a left-right flip swaps laterality (the heart "
                             "would move to the right), which a radiology model must not learn")
        if not isinstance(gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be True or False, got {gradient_checkpointing!r}")
        #: The model fine-tuned from (``init_from``), or ``None``.
        self.init_info: ModelInfo | None = read_model_info(init_from) if init_from is not None else None
        #: Whether the VAE is ``init_from``'s, frozen (same resolution): no VAE stage then.
        self.frozen_vae = self.init_info is not None and self.init_info.resolution == resolution
        if self.init_info is not None:
            source_sched = json.loads((self.init_info.path / "scheduler" / "scheduler_config.json").read_text())
            noise_scheduler = DDPMScheduler.from_config(source_sched, clip_sample=False)
            unet_cfg = json.loads((self.init_info.path / "unet" / "config.json").read_text())
            vae_cfg = (json.loads((self.init_info.path / "vae" / "config.json").read_text())
                       if self.frozen_vae else None)
            config = replace(config, prediction_type=source_sched.get("prediction_type", "epsilon"),
                             **_init_architecture(unet_cfg, vae_cfg, resolution))
            if not self.frozen_vae:
                unet_in = unet_cfg["in_channels"]
                if unet_in != config.latent_channels:
                    raise ValueError(
                        f"init_from {self.init_info.path.name!r} has a UNet over {unet_in}-channel latents, but a new "
                        f"VAE at resolution {resolution} would make {config.latent_channels}; train at the model's "
                        f"resolution {self.init_info.resolution} to reuse its VAE"
                    )
        else:
            noise_scheduler = build_noise_scheduler(config)
        if not self.frozen_vae:
            config.vae_block_channels(resolution)  # validates resolution against the latent size
        #: The images as the trainer reads them.
        self.images: TrainingImages = self._training_images(data, resolution)
        self.data, self.config, self.resolution = data, config, resolution
        self.output = Path(output)
        self.workspace = self.output / "checkpoints"
        self.text_encoder_name = text_encoder
        self.seed, self.max_steps, self.max_minutes = seed, max_steps, max_minutes
        self.resume, self.keep_checkpoints, self.progress = resume, keep_checkpoints, progress
        self.step_hook = step_hook
        self.link_packaged_text_encoder = link_packaged_text_encoder
        self.save_dtype = save_dtype
        self.dataloader_workers, self.augment = dataloader_workers, augment
        self.gradient_checkpointing = gradient_checkpointing
        self.requested_mixed_precision = mixed_precision
        self.mixed_precision = resolve_mixed_precision(mixed_precision, torch.device(best_device()))
        self.accelerator = Accelerator(
            mixed_precision="fp16" if self.mixed_precision == "fp16" else "no",  # bf16: see _autocast
            gradient_accumulation_steps=gradient_accumulation_steps,
            cpu=cpu_only(),
        )
        self.noise_scheduler = noise_scheduler
        self.result = TrainResult(output=self.output)
        self.log = _Log(self.output / "train_log.csv", self._main, progress)
        #: ``time.monotonic()`` when :meth:`run` started (the construction time until then).
        self.run_start = time.monotonic()

    # ------------------------------------------------------------------ helpers
    @property
    def _main(self) -> bool:
        return self.accelerator.is_main_process

    def _autocast(self) -> ContextManager[Any]:
        """Context of a training forward pass: :func:`generator._utils.training_autocast` (bf16 autocast
        and, on a CPU, the math attention kernel; nothing otherwise) on this run's device."""
        return training_autocast(self.mixed_precision, self.accelerator.device)

    def _say(self, msg: str) -> None:
        if self._main and self.progress:
            tqdm.write(msg)

    def _plan(self, stage: str, default_steps: int, start: float) -> StepPlan:
        """Steps and deadline of a stage: ``max_steps`` if given; else, under a time budget, as many
        as the clock allows (the VAE gets ``vae_share`` of it); else the preset's default."""
        if self.max_steps is not None:
            total = self.max_steps
        elif self.max_minutes is not None:
            total = 10**7  # the clock, not the step count, ends the stage
        else:
            total = default_steps
        deadline = None
        if self.max_minutes is not None:
            budget = self.max_minutes * 60.0
            deadline = start + budget * self.config.vae_share if stage == "vae" else self.run_start + budget
        return StepPlan(total=total, deadline=deadline)

    # ------------------------------------------------------------------ data
    @staticmethod
    def _training_images(data: Any, resolution: int) -> TrainingImages:
        """``data`` as :class:`TrainingImages`; checks it is not empty and is at ``resolution``.

        Raises:
            ValueError: no images, or images (a prepared folder) at another resolution.
        """
        if isinstance(data, IngestResult):
            return InMemoryImages(data, resolution)
        if not isinstance(data, TrainingImages):
            raise ValueError(f"data must be an IngestResult, a PreparedDataset or TrainingImages, got "
                             f"{type(data).__name__}")
        if data.resolution != resolution:
            where = f"prepared dataset {str(data.root)!r}" if isinstance(data, PreparedDataset) else "data"
            raise ValueError(f"{where} has resolution {data.resolution}, but the model is trained at "
                             f"resolution {resolution}; prepare the source again at {resolution}")
        if len(data) == 0:
            raise ValueError("data has no images to train on")
        return data

    def _loader(self, sampler: Any, augment: bool) -> torch.utils.data.DataLoader:
        """A DataLoader over :class:`BatchReader` whose ``sampler`` yields whole-batch keys; it yields
        ``(indices (B,) int64, images (B, R, R) float32 in [0, 1])`` numpy pairs."""
        workers = self.dataloader_workers
        context = None
        if workers:
            import multiprocessing as mp

            if "forkserver" in mp.get_all_start_methods():
                # Workers fork from a clean server process, not from this multi-threaded one; the server
                # imports torch and the reader once (when it starts), so a worker starts in milliseconds.
                context = mp.get_context("forkserver")
                context.set_forkserver_preload(["generator.data.prepared"])
            else:
                context = mp.get_context("spawn")
        return torch.utils.data.DataLoader(
            BatchReader(self.images, self.augment if augment else None), batch_size=None, sampler=sampler,
            num_workers=workers, collate_fn=BatchReader.collate, multiprocessing_context=context,
            pin_memory=False,
        )

    def _texts(self) -> tuple[list[str], list[list[int]]]:
        """Unique texts and, per record, the indices of the texts it may be trained with."""
        rng = random.Random(self.seed)
        texts: dict[str, int] = {"": 0}
        options: list[list[int]] = []
        for meta in self.images.iter_metadata():  # streamed: texts and attributes only, never pixels
            text, attributes = meta["text"], meta["attributes"]
            cands = [text]
            structured = any(k in attributes for k in ("findings", "sex", "age", "view"))
            if self.config.text_augment and structured:
                try:
                    cands += [paraphrase_prompt(attributes, rng) for _ in range(_PARAPHRASES_PER_RECORD)]
                except ValueError:
                    pass  # attributes that do not parse: train on the record's own text only
            ids = []
            for t in dict.fromkeys(cands):
                ids.append(texts.setdefault(t, len(texts)))
            options.append(ids)
        return list(texts), options

    # ------------------------------------------------------------------ run identity
    def _run_identity(self, text_encoder: torch.nn.Module) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed (``checkpoints/run.json``)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "train_config": json_plain(self.config.to_dict()),
            "resolution": self.resolution,
            "seed": self.seed,
            "data_fingerprint": self.images.fingerprint(),
            "num_images": len(self.images),
            "text_encoder_sha256": state_dict_hash(text_encoder),
            "mixed_precision": self.mixed_precision,
            "gradient_accumulation_steps": self.accelerator.gradient_accumulation_steps,
            "init_from_model_hash": self.init_info.model_hash if self.init_info is not None else None,
            **({"augment": self.augment.to_dict()} if self.augment is not None else {}),
        }

    def _prepare_workspace(self, identity: dict[str, Any]) -> None:
        """Fresh run: empty the workspace (but for a ``prepared/`` dataset) and write ``run.json``.
        Resume: check ``run.json`` (a workspace holding only ``prepared/`` starts fresh).

        Raises:
            ValueError: resuming from checkpoints of a different run, or of an unknown layout.
        """
        run_json = self.workspace / _RUN_JSON
        others = [p for p in self.workspace.iterdir() if p.name != PREPARED_DIR] if self.workspace.is_dir() else []
        if self.resume and others:
            try:
                saved = json.loads(run_json.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise ValueError(
                    f"--resume: {str(run_json)!r} is missing or damaged (checkpoints of an older RadSynth, "
                    "whose pickled files are never loaded, or an interrupted start); start again with --overwrite"
                ) from None
            if isinstance(saved.get("train_config"), dict):  # fields added since take their defaults, as in radsynth.json
                try:
                    saved["train_config"] = json_plain(TrainConfig.from_dict(saved["train_config"]).to_dict())
                except ValueError:
                    pass  # a field this version does not know: reported as a difference below
            diffs = _differences(saved, identity)
            if diffs:
                raise ValueError(
                    f"--resume: the checkpoints in {str(self.workspace)!r} come from a different run "
                    f"({'; '.join(diffs)}); resume with the same data and options, or start again with "
                    "--overwrite"
                )
            return
        if self._main:
            for old in others:
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
            self.workspace.mkdir(parents=True, exist_ok=True)
            tmp = self.workspace / f".tmp-{_RUN_JSON}"
            tmp.write_text(json.dumps(identity, indent=1) + "\n")
            os.replace(tmp, run_json)

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        """Train both stages and write the model folder; returns a :class:`TrainResult`.

        Raises:
            ValueError: ``resume`` with checkpoints of another run, or a damaged checkpoint.
        """
        self.run_start = time.monotonic()
        acc = self.accelerator
        texts, options = self._texts()  # metadata only; a bad oversample term fails before any training
        draw_weights = oversample_weights([texts[o[0]] for o in options], self.config.oversample)
        source = None
        if self.init_info is not None:
            source, _ = load_pipeline(self.init_info.path, device="cpu", half=False,
                                      text_encoder=self.text_encoder_name)
            tokenizer, text_encoder = source.tokenizer, source.text_encoder.eval().requires_grad_(False)
        else:
            tokenizer, text_encoder = load_text_encoder(self.text_encoder_name)
        identity = self._run_identity(text_encoder)
        if self._main:
            self.output.mkdir(parents=True, exist_ok=True)
        self._prepare_workspace(identity)
        acc.wait_for_everyone()

        if self.frozen_vae and source is not None:
            vae, fresh = source.vae.float().eval().requires_grad_(False), False
            self.result.steps["vae"] = 0
            self._say(f"VAE: {self.init_info.path.name}'s, frozen")
        else:
            vae, fresh = self._train_vae()
        cache = self._cache_latents(vae)
        if fresh:
            # Scale latents to unit variance (stored in the VAE config as scaling_factor).
            vae.register_to_config(scaling_factor=float(1.0 / max(cache.std, 1e-6)))
            if self._main:
                write_checkpoint(
                    self.workspace / "vae-final",
                    {"model.safetensors": {k: v.detach().contiguous() for k, v in vae.state_dict().items()}},
                    {"stage": "vae", "final": True, "step": self.result.steps["vae"],
                     "loss": self.result.final_loss["vae"], "seconds": self.result.seconds["vae"],
                     "scaling_factor": float(vae.config.scaling_factor)},
                )
                for old in self.workspace.glob("vae-*"):  # the finished stage replaces its step checkpoints
                    if old.name.split("-", 1)[1].isdigit():
                        shutil.rmtree(old, ignore_errors=True)
            acc.wait_for_everyone()

        embeds = self._encode_texts(tokenizer, text_encoder, texts, identity["text_encoder_sha256"])
        self._say(f"encoded {len(texts)} distinct prompt texts with {type(text_encoder).__name__}")
        labels = torch.from_numpy(prompt_vectors(texts)) if self.config.attribute_conditioning else None
        unet = self._train_unet(cache, float(vae.config.scaling_factor), embeds, options,
                                hidden_size(text_encoder), source.unet if source is not None else None, labels,
                                draw_weights)

        if self._main:
            self._save(vae, unet, text_encoder, tokenizer)
        acc.wait_for_everyone()
        if self._main and not self.keep_checkpoints:
            shutil.rmtree(self.workspace, ignore_errors=True)
        acc.end_training()
        return self.result

    def _train_vae(self) -> tuple[AutoencoderKL, bool]:
        """The trained VAE, and whether it was trained now (False: loaded from a finished stage)."""
        cfg, acc = self.config, self.accelerator
        final = self.workspace / "vae-final"
        if self.resume and (final / STATE_JSON).exists():
            self._say(f"resume: VAE stage already finished ({final})")
            state = read_checkpoint_state(final)
            with torch.random.fork_rng(devices=[]):
                vae = build_vae(cfg, self.resolution)
            load_weights(vae, read_checkpoint_tensors(final, "model.safetensors", state), final)
            vae.register_to_config(scaling_factor=float(state["scaling_factor"]))
            self.result.steps["vae"] = int(state["step"])
            self.result.final_loss["vae"] = float(state["loss"])
            self.result.seconds["vae"] = float(state.get("seconds", 0.0))
            return vae.eval(), False
        start = time.monotonic()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            vae = _VAEWithLoss(build_vae(cfg, self.resolution))
        if self.gradient_checkpointing and vae.vae._supports_gradient_checkpointing:
            vae.vae.enable_gradient_checkpointing()
        vae, opt, sched, plan, step = self._start_stage("vae", vae, cfg.vae_lr, 1e-4, cfg.vae_steps, start)
        n = len(self.images)
        augment = self.augment is not None
        batches = iter(self._loader(
            _StepBatches(self.seed, "vae", acc.process_index, step, n, cfg.vae_batch_size, augment), augment))
        losses: list[float] = []
        t0, s0 = time.monotonic(), step
        while step < plan.total and not self._out_of_time("vae", plan, step, s0):
            g = _step_generator(self.seed, "vae", step, acc.process_index)
            key = _draw_batch(g, n, cfg.vae_batch_size, augment)
            got, images = next(batches)
            if tuple(got.tolist()) != key[0]:  # the loader's order is the step generators' by construction
                raise RuntimeError(f"VAE step {step}: the data loader returned another batch than drawn")
            x = torch.from_numpy(images * 2.0 - 1.0).unsqueeze(1).to(acc.device)
            eps = torch.randn((x.shape[0], cfg.latent_channels, cfg.latent_size, cfg.latent_size), generator=g)
            with acc.accumulate(vae):
                with self._autocast():
                    recon, kl = vae(x, eps.to(acc.device))
                recon = recon.float()
                loss = F.l1_loss(recon, x) + cfg.vae_kl_weight * kl.float().mean()
                if cfg.vae_ssim_weight > 0:
                    loss = loss + cfg.vae_ssim_weight * (1.0 - _ssim(recon, x))
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(vae.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()))
            self._after_step("vae", step, plan, losses, t0, s0, cfg.vae_batch_size, sched, vae, opt)
        del batches  # stops the loader's workers
        self.log.close()
        model = acc.unwrap_model(vae, keep_fp32_wrapper=False).vae
        if self.gradient_checkpointing and model.is_gradient_checkpointing:
            model.disable_gradient_checkpointing()
        self.result.steps["vae"] = step
        self.result.final_loss["vae"] = float(np.mean(losses[-_LOG_EVERY:])) if losses else float("nan")
        self.result.seconds["vae"] = time.monotonic() - start
        # Forget the VAE's prepared objects so that the UNet stage starts clean.
        acc.free_memory()
        return model.eval(), True

    @torch.no_grad()
    def _cache_latents(self, vae: AutoencoderKL) -> LatentCache:
        """Posterior mean and std of every image, written to ``<workspace>/latents-{mean,std}.npy`` (main
        process; temporary names, then ``os.replace``; ``latents.json`` last) and returned as a
        :class:`LatentCache`. A cache whose ``latents.json`` names the same VAE weights and data
        fingerprint is reused (``--resume``). Peak memory: one chunk of images and latents."""
        acc, dev = self.accelerator, self.accelerator.device
        vae_hash = state_dict_hash(vae)
        meta_path = self.workspace / _LATENTS_JSON
        ident = {"vae_sha256": vae_hash, "data_fingerprint": self.images.fingerprint(), "num_images": len(self.images)}
        cache = self._reuse_latents(meta_path, ident) if self.resume else None
        acc.wait_for_everyone()
        if cache is not None:
            self._say(f"resume: reusing the latent cache ({meta_path})")
            return cache
        if self._main:
            cache = self._write_latents(vae.to(dev), ident, meta_path)
        acc.wait_for_everyone()
        if cache is None:
            cache = self._reuse_latents(meta_path, ident)
            if cache is None:
                raise RuntimeError(f"latent cache {str(meta_path)!r} was not written by the main process")
        return cache

    @torch.no_grad()
    def _encode_texts(self, tokenizer: Any, text_encoder: Any, texts: list[str], encoder_sha256: str) -> "TextEmbeddings":
        """Encode ``texts`` (main process, 256 at a time) into ``<workspace>/text-embeds.npy``, ``(T, L, H)``
        float16, written under a temporary name and renamed, then described in ``text-embeds.json``
        (hash of the texts and of the encoder); returned memory-mapped. A resumed run whose workspace
        holds the same texts' states reuses them (encoding ~10^5 prompt texts takes many CPU-minutes)."""
        path = self.workspace / TextEmbeddings.NAME
        meta_path = self.workspace / TextEmbeddings.META
        ident = {"texts_sha256": hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest(),
                 "num_texts": len(texts), "text_encoder_sha256": encoder_sha256}
        if self.resume and TextEmbeddings.matches(path, meta_path, ident):
            self._say(f"resume: reusing the states of {len(texts)} prompt texts ({path.name})")
            return TextEmbeddings(path)
        self.accelerator.wait_for_everyone()  # no process may still be checking the old files
        if self._main:
            meta_path.unlink(missing_ok=True)
            tmp = self.workspace / f".tmp-{TextEmbeddings.NAME}"
            def encode(i: int) -> np.ndarray:  # 256: a multiple of encode_prompts' batch (same numbers)
                return encode_prompts(tokenizer, text_encoder, texts[i : i + 256]).to(torch.float16).cpu().numpy()

            first = encode(0)  # texts always holds the null prompt ""
            out = _NpyRows(tmp, np.float16, (len(texts), *first.shape[1:]))
            out.write(0, first)
            for i in range(256, len(texts), 256):
                out.write(i, encode(i))
            out.close()
            os.replace(tmp, path)
            atomic_write_text(meta_path, json.dumps(ident, indent=1) + "\n")
        self.accelerator.wait_for_everyone()
        return TextEmbeddings(path)

    def _reuse_latents(self, meta_path: Path, ident: Mapping[str, Any]) -> LatentCache | None:
        """The cache described by ``latents.json`` when it matches ``ident`` and its files are intact."""
        try:
            meta = json.loads(meta_path.read_text())
            if any(meta.get(k) != v for k, v in ident.items()):
                return None
            cache = LatentCache(self.workspace, tuple(meta["shape"]), float(meta["std"]))
            cache.open()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return cache

    def _write_latents(self, vae: AutoencoderKL, ident: Mapping[str, Any], meta_path: Path) -> LatentCache:
        dev = self.accelerator.device
        n = len(self.images)
        meta_path.unlink(missing_ok=True)
        tmp = {name: self.workspace / f".tmp-{name}" for name in (LatentCache.MEAN, LatentCache.STD)}
        files: dict[str, _NpyRows] = {}
        count, mean_acc, m2 = 0, 0.0, 0.0  # Chan et al.'s merge of per-chunk (count, mean, M2), float64
        for got, images in self._loader(_Sequential(n, _LATENT_CHUNK), augment=False):
            x = torch.from_numpy(images * 2.0 - 1.0).unsqueeze(1).to(dev)
            if int(vae.config.in_channels) != x.shape[1]:  # an RGB VAE (Stable Diffusion) sees gray as RGB
                x = x.expand(-1, int(vae.config.in_channels), -1, -1)
            dist = vae.encode(x).latent_dist
            mean, std = dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()
            if not files:
                shape = (n, *mean.shape[1:])
                for name, path in tmp.items():
                    files[name] = _NpyRows(path, np.float32, shape)
            lo = int(got[0])  # the sequential loader yields the images in order
            files[LatentCache.MEAN].write(lo, mean)
            files[LatentCache.STD].write(lo, std)
            flat = mean.astype(np.float64).ravel()
            c_mean, c_m2 = float(flat.mean()), float(((flat - flat.mean()) ** 2).sum())
            total = count + flat.size
            delta = c_mean - mean_acc
            m2 += c_m2 + delta * delta * count * flat.size / total
            mean_acc += delta * flat.size / total
            count = total
        shape = files[LatentCache.MEAN].shape
        for writer in files.values():
            writer.close()
        files.clear()
        for name, path in tmp.items():
            os.replace(path, self.workspace / name)
        std = math.sqrt(m2 / max(1, count - 1))
        atomic_write_text(meta_path, json.dumps({**ident, "shape": list(shape), "dtype": "float32", "std": std},
                                                indent=1) + "\n")
        return LatentCache(self.workspace, shape, std)

    def _train_unet(
        self,
        cache: LatentCache,
        scaling: float,
        embeds: "TextEmbeddings",
        options: list[list[int]],
        cross_dim: int,
        init: UNet2DConditionModel | None = None,
        labels: torch.Tensor | None = None,
        draw_weights: torch.Tensor | None = None,
    ) -> UNet2DConditionModel:
        """Train the denoiser (from ``init``'s weights when given; it is not modified).

        ``labels``: ``(num_texts, ATTRIBUTE_DIM)`` attribute vectors of the texts (row 0: the null
        prompt's zeros), given with ``attribute_conditioning``; the UNet then takes them as
        ``class_labels``. An ``init`` UNet without that input gets it, zero-initialised (it starts out
        as ``init``). ``draw_weights``: ``(num_records,)`` draw weights of ``config.oversample``
        (:func:`generator.recipe.oversample_weights`; ``None``: uniform draws)."""
        cfg, acc = self.config, self.accelerator
        start = time.monotonic()
        if init is not None:
            unet = self._unet_from(init, with_attributes=labels is not None)
            unet.train().requires_grad_(True)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 1)
                unet = build_unet(cfg, cross_dim)
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        ema = unet_ema(unet, cfg.ema_decay)
        noise_sched = self.noise_scheduler
        unet, opt, sched, plan, step = self._start_stage("unet", unet, cfg.unet_lr, 1e-2, cfg.unet_steps, start, ema)
        n = cache.shape[0]
        losses: list[float] = []
        t0, s0 = time.monotonic(), step
        while step < plan.total and not self._out_of_time("unet", plan, step, s0):
            g = _step_generator(self.seed, "unet", step, acc.process_index)
            b = cfg.unet_batch_size
            idx = draw_records(g, n, b, draw_weights)
            mean, std = cache.rows(idx)
            eps_post = torch.randn(mean.shape, generator=g)
            z0 = (mean + std * eps_post) * scaling
            noise = torch.randn(z0.shape, generator=g)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=g)
            pick = torch.rand(b, generator=g)
            drop = torch.rand(b, generator=g) < cfg.prompt_dropout
            text_ids = [
                0 if drop[j] else options[int(idx[j])][int(pick[j] * len(options[int(idx[j])]))]
                for j in range(b)
            ]
            context = embeds.rows(text_ids).float().to(acc.device)
            class_labels = None if labels is None else labels[text_ids].to(acc.device)
            z0, noise, t = z0.to(acc.device), noise.to(acc.device), t.to(acc.device)
            noisy = noise_sched.add_noise(z0, noise, t)
            target = denoising_target(noise_sched, z0, noise, t, cfg.prediction_type)
            with acc.accumulate(unet):
                with self._autocast():
                    pred = unet(noisy, t, encoder_hidden_states=context, class_labels=class_labels).sample
                loss = denoising_loss(pred, target, t, noise_sched, cfg.prediction_type, cfg.min_snr_gamma).mean()
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(unet.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                ema.step(acc.unwrap_model(unet).parameters())
            step += 1
            losses.append(float(loss.detach()))
            self._after_step("unet", step, plan, losses, t0, s0, b, sched, unet, opt, ema)
        self.log.close()
        model = acc.unwrap_model(unet, keep_fp32_wrapper=False)
        if model.is_gradient_checkpointing:
            model.disable_gradient_checkpointing()
        ema.copy_to(model.parameters())
        self.result.steps["unet"] = step
        self.result.final_loss["unet"] = float(np.mean(losses[-_LOG_EVERY:])) if losses else float("nan")
        self.result.seconds["unet"] = time.monotonic() - start
        return model.eval()

    @staticmethod
    def _unet_from(init: UNet2DConditionModel, with_attributes: bool) -> UNet2DConditionModel:
        """A float32 copy of ``init`` to fine-tune; with an attribute input when asked (added with a
        zero output layer when ``init`` has none, so the copy computes what ``init`` does)."""
        if with_attributes == takes_attributes(init):
            unet = UNet2DConditionModel.from_config(init.config)
            unet.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
            return unet
        if not with_attributes:
            raise ValueError(
                "--init-from: the model takes attribute vectors (attribute_conditioning) but this run's "
                "training options do not; train with attribute_conditioning"
            )
        if init.config.get("class_embed_type") is not None:
            raise ValueError(
                f"--init-from: the model's UNet has a class embedding of type "
                f"{init.config.get('class_embed_type')!r}; it cannot take attribute vectors"
            )
        unet = UNet2DConditionModel.from_config(init.config, **attribute_embedding_config())
        missing, unexpected = unet.load_state_dict({k: v.float() for k, v in init.state_dict().items()},
                                                   strict=False)
        if unexpected or any(not k.startswith("class_embedding.") for k in missing):
            raise ValueError(f"--init-from: the UNet's weights do not fit ({unexpected or missing})")
        torch.nn.init.zeros_(unet.class_embedding.linear_2.weight)
        torch.nn.init.zeros_(unet.class_embedding.linear_2.bias)
        return unet

    def _start_stage(
        self, stage: str, model: torch.nn.Module, lr: float, weight_decay: float, default_steps: int,
        start: float, ema: EMAModel | None = None,
    ) -> tuple[Any, Any, Any, StepPlan, int]:
        """AdamW + warm-up/cosine schedule, prepared by ``accelerate``; resumed from the stage's latest
        checkpoint when asked. Returns ``(model, optimizer, scheduler, plan, first_step)``."""
        plan = self._plan(stage, default_steps, start)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(plan, self.config.warmup_steps))
        # The scheduler is not prepared: accelerate would step it once per process per optimiser step,
        # so the schedule (and a checkpoint's scheduler state) would depend on the world size. Stepped
        # once per loop step here, its counter is always the stage's step.
        model, opt = self.accelerator.prepare(model, opt)
        step = self._maybe_resume(stage, plan, model, opt, sched, ema)
        self.accelerator.step = step  # micro-step counter of gradient accumulation
        self.log.start(stage, plan.total if plan.total < 10**7 else None, step)
        return model, opt, sched, plan, step

    def _out_of_time(self, stage: str, plan: StepPlan, step: int, first_step: int) -> bool:
        """Whether the stage's clock has run out (never before its first step of this run)."""
        if plan.deadline is None or step == first_step:
            return False
        stop = time.monotonic() >= plan.deadline
        acc = self.accelerator
        if acc.num_processes > 1:  # one decision for all processes, or the others wait in a collective
            flag = torch.tensor([int(stop)], device=acc.device)
            stop = bool(acc.reduce(flag, reduction="sum").item() > 0)
        if stop:
            self._say(f"{stage.upper()} stage reached its time budget at step {step}")
        return stop

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, stage: str, step: int, plan: StepPlan, model: Any, opt: Any, sched: Any,
                         ema: EMAModel | None) -> None:
        """Write ``<workspace>/<stage>-<step>`` (main process) and delete the stage's older ones."""
        acc = self.accelerator
        if self._main:
            net = acc.unwrap_model(model, keep_fp32_wrapper=False)
            opt_tensors, opt_meta = optimizer_to_files(opt.state_dict())
            tensors = {
                "model.safetensors": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                "optimizer.safetensors": opt_tensors,
            }
            state: dict[str, Any] = {
                "stage": stage, "step": step, "plan_total": plan.total,
                "optimizer": opt_meta, "scheduler": json_plain(sched.state_dict()),
                "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "num_processes": acc.num_processes,
            }
            if ema is not None:
                tensors["ema.safetensors"], state["ema"] = ema_to_files(ema, [n for n, _ in net.named_parameters()])
            ckpt = self.workspace / f"{stage}-{step}"
            write_checkpoint(ckpt, tensors, state)
            for old in self.workspace.glob(f"{stage}-*"):
                if old != ckpt and old.name.split("-", 1)[1].isdigit():
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _maybe_resume(self, stage: str, plan: StepPlan, model: Any, opt: Any, sched: Any, ema: EMAModel | None) -> int:
        """Load the stage's latest checkpoint into the prepared objects; returns its step (0: none).

        Raises:
            ValueError: a damaged checkpoint (the message names the file).
        """
        if not self.resume:
            return 0
        ckpt = latest_checkpoint(self.workspace, stage)
        if ckpt is None:
            return 0
        state = read_checkpoint_state(ckpt)
        net = self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        load_weights(net, read_checkpoint_tensors(ckpt, "model.safetensors", state), ckpt)
        opt_tensors = read_checkpoint_tensors(ckpt, "optimizer.safetensors", state)
        try:
            opt.load_state_dict(optimizer_from_files(opt_tensors, state["optimizer"], opt.state_dict()))
            sched.load_state_dict(dict(state["scheduler"]))
            if self.accelerator.scaler is not None and state.get("grad_scaler"):
                self.accelerator.scaler.load_state_dict(state["grad_scaler"])
            if ema is not None:
                ema_from_files(ema, read_checkpoint_tensors(ckpt, "ema.safetensors", state), state["ema"],
                               [n for n, _ in net.named_parameters()])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"checkpoint {str(ckpt)!r} does not fit this run: {exc}") from None
        plan.total = int(state.get("plan_total", plan.total))
        self._say(f"resume: {stage.upper()} from step {state['step']} ({ckpt})")
        return int(state["step"])

    def _after_step(
        self, stage: str, step: int, plan: StepPlan, losses: list[float], t0: float, s0: int,
        batch: int, sched: Any, model: Any, opt: Any, ema: EMAModel | None = None,
    ) -> None:
        acc = self.accelerator
        elapsed = time.monotonic() - t0
        rate = (step - s0) / max(elapsed, 1e-9)
        # Under a time budget, fit the cosine schedule to the steps the clock allows: after 20 steps, then
        # twice more half-way to the fitted end, each time from the speed since the previous fit, so that
        # a slow start (another job holding the cores while the run warmed up) does not end the run long
        # before its deadline (the learning rate moves a little at each fit).
        plan.begin(s0, t0)
        if self.max_steps is None and plan.due(step):
            now = time.monotonic()
            total = [plan.estimate(step, now)]
            if acc.num_processes > 1:  # the main process's estimate for all (same schedule everywhere)
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(total, from_process=0)
            plan.refit(int(total[0]), step, now)
            if self.log.bar is not None:
                self.log.bar.total = plan.total
        self.log.step(1, loss=f"{losses[-1]:.4f}")
        if step % _LOG_EVERY == 0 or step == plan.total:
            imgs = rate * batch * acc.num_processes * acc.gradient_accumulation_steps
            self.log.row(stage, step, f"{np.mean(losses[-_LOG_EVERY:]):.6f}", f"{sched.get_last_lr()[0]:.3e}",
                         f"{rate:.3f}", f"{imgs:.1f}", f"{time.monotonic() - self.run_start:.1f}")
        # Checkpoint only between optimiser steps: accumulated gradients are not saved.
        if step % self.config.checkpoint_every == 0 and step < plan.total and acc.sync_gradients:
            self._save_checkpoint(stage, step, plan, model, opt, sched, ema)
        if self.step_hook is not None:
            self.step_hook(stage, step)

    # ------------------------------------------------------------------ save
    def _save(self, vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: Any, tokenizer: Any) -> None:
        sampler = make_sampler("dpm", self.noise_scheduler)
        if self.save_dtype != torch.float32:
            vae, unet = vae.to(self.save_dtype), unet.to(self.save_dtype)
        pipe = RadSynthPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                scheduler=sampler)
        info = self.model_info(text_encoder)
        packaged = DEFAULT_TEXT_ENCODER if self._links_packaged_encoder() else None
        save_model_folder(pipe, self.output, info=info, card=self.model_card(info), packaged_text_encoder=packaged)

    def model_info(self, text_encoder: torch.nn.Module | None = None) -> dict[str, Any]:
        """Content of ``radsynth.json`` for this run: names, hashes and numbers, never a path.

        Args:
            text_encoder: The loaded text encoder, to record its weights' hash and width (loaded from
                ``text_encoder`` when ``None``).
        """
        import accelerate
        import diffusers
        import transformers

        if text_encoder is None and self.init_info is not None:
            text_encoder = load_pipeline(self.init_info.path, device="cpu", half=False,
                                         text_encoder=self.text_encoder_name)[0].text_encoder
        elif text_encoder is None:
            text_encoder = load_text_encoder(self.text_encoder_name)[1]
        d = self.images
        return {
            "radsynth_version": _package_version(),
            "resolution": self.resolution,
            "channels": self.init_info.channels if self.frozen_vae and self.init_info is not None else 1,
            "init_from": None if self.init_info is None else {
                "name": self.init_info.path.resolve().name, "model_hash": self.init_info.model_hash,
                "vae": "frozen" if self.frozen_vae else "trained"},
            "intensity": d.intensity.to_dict(),
            "modality": d.intensity.modality,
            "train_config": self.config.to_dict(),
            "attributes": ATTRIBUTE_SCHEMA if self.config.attribute_conditioning else None,
            "seed": self.seed,
            "text_encoder": {"name": self._text_encoder_label(),
                             "sha256": state_dict_hash(text_encoder),
                             "hidden_size": hidden_size(text_encoder)},
            "data": {"source": d.source, "num_images": len(d), "num_skipped": d.num_skipped,
                     "fingerprint": d.fingerprint(),
                     "read_from": "prepared" if isinstance(d, PreparedDataset) else "memory"},
            "training": {"steps": self.result.steps, "final_loss": self.result.final_loss,
                         "seconds": {k: round(v, 1) for k, v in self.result.seconds.items()},
                         "num_processes": self.accelerator.num_processes,
                         "mixed_precision": self.mixed_precision,
                         "mixed_precision_requested": self.requested_mixed_precision,
                         "augment": self.augment.to_dict() if self.augment is not None else None,
                         "gradient_checkpointing": self.gradient_checkpointing},
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                         "python": platform.python_version()},
        }

    def _text_encoder_label(self) -> str:
        """Name of the text encoder for ``radsynth.json``: the user's choice, else (fine-tuning) the name
        the source model recorded, else the default's."""
        if self.text_encoder_name is not None or self.init_info is None:
            return text_encoder_name(self.text_encoder_name)
        recorded = self.init_info.raw.get("text_encoder")
        name = recorded.get("name") if isinstance(recorded, dict) else None
        if isinstance(name, str) and name and not absolute_paths(name):
            return name
        if isinstance(recorded, dict) and recorded.get("packaged") == DEFAULT_TEXT_ENCODER:
            return DEFAULT_TEXT_ENCODER
        return f"{self.init_info.path.resolve().name}/text_encoder"

    def _links_packaged_encoder(self) -> bool:
        """Whether the saved folder names the packaged MiniLM instead of holding the encoder."""
        if not self.link_packaged_text_encoder or self.text_encoder_name not in (None, DEFAULT_TEXT_ENCODER):
            return False
        if self.init_info is None or self.text_encoder_name == DEFAULT_TEXT_ENCODER:
            return True
        recorded = self.init_info.raw.get("text_encoder")
        return isinstance(recorded, dict) and recorded.get("packaged") == DEFAULT_TEXT_ENCODER

    def model_card(self, info: dict[str, Any]) -> str:
        """Model card Markdown: data summary, configuration, final losses, intended use."""
        cfg = info["train_config"]
        tr = info["training"]
        return f"""# RadSynth model

Text-conditioned latent diffusion model for synthetic {info['modality']} images at
{info['resolution']}x{info['resolution']} px, trained with RadSynth {info['radsynth_version']}.

## Training data
- source: {info['data']['source']}, {info['data']['num_images']} images used, {info['data']['num_skipped']} skipped
- data fingerprint (SHA-256 over file names, texts and pixels): `{info['data']['fingerprint']}`
- intensity mapping: `{json.dumps(info['intensity'])}`

No training image, text or embedding is stored in this folder. Diffusion models can still memorise
training images: audit every synthetic dataset with `radsynth audit` before sharing it.

## Configuration
- preset `{cfg['preset']}`; VAE channels {cfg['vae_channels']}, latent {cfg['latent_channels']}x{cfg['latent_size']}x{cfg['latent_size']}
- UNet channels {cfg['unet_channels']}, prediction `{cfg['prediction_type']}`, min-SNR gamma {cfg['min_snr_gamma']},
  prompt dropout {cfg['prompt_dropout']}, EMA decay {cfg['ema_decay']}{_oversample_line(cfg)}
- text encoder: `{info['text_encoder']['name']}` (frozen; weights SHA-256 `{info['text_encoder']['sha256'][:16]}`); seed {info['seed']}
- steps: {tr['steps']}; seconds: {tr['seconds']}; processes: {tr['num_processes']}; mixed precision: {tr['mixed_precision']}

## Final losses
{json.dumps(tr['final_loss'])}

## Intended use
Synthetic data for research: augmentation, teaching sets, model stress tests. Not for diagnosis.
Synthetic images are marked as such when exported (DICOM Synthetic Data = YES).
"""


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two run identities (``train_config`` field by field)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key == "train_config" and isinstance(a, dict) and isinstance(b, dict):
            for f in sorted(set(a) | set(b)):
                if a.get(f) != b.get(f):
                    out.append(f"{f}: {a.get(f)!r} in the checkpoints, {b.get(f)!r} now")
        elif a != b:
            if key in ("data_fingerprint", "text_encoder_sha256"):
                what = "data" if key == "data_fingerprint" else "text encoder weights"
                out.append(f"{what} differ (SHA-256 {str(a)[:12]}... in the checkpoints, {str(b)[:12]}... now)")
            else:
                out.append(f"{key}: {a!r} in the checkpoints, {b!r} now")
    return out
