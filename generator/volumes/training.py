"""A compact two-stage trainer for volume models: the 3D VAE, then the 3D UNet on cached latents.

Its training loop is separate from the 2D :class:`generator.training.Trainer` (which adds streaming
from disk and latent caches on disk), but what a UNet step optimises is shared: the target, min-SNR weighting, warm-up/cosine learning rate and the EMA of the weights come
from :mod:`generator.recipe`, and checkpoints use the layout and (de)serialisation of
:mod:`generator.checkpoints` (AdamW moments, EMA state, checksums, atomic writes). Like the 2D trainer
it uses classifier-free-guidance prompt dropout, per-step random generators, exact resume, and step
and time budgets.

Determinism: every random draw of step ``s`` of stage ``k`` (batch indices, posterior noise, timesteps,
diffusion noise, prompt dropout) comes from ``torch.Generator`` seeded by ``(seed, k, s)``; nothing
reads the global RNG after the networks are initialised (from ``seed``). A run interrupted after any
checkpoint and resumed gives the same weights as an uninterrupted one (float32, same thread count).

Several processes (``torchrun`` / ``accelerate launch``; gloo on CPUs): ``accelerate`` wraps both
networks in DistributedDataParallel. Every process draws the whole batch of a step from the same
``(seed, k, s)`` generator and trains on its share (process ``r`` of ``W`` takes items ``r, r + W, ...``),
so the averaged gradient is the whole batch's and the weights do not depend on the number of processes
beyond float rounding; batch sizes must be multiples of ``W``. Time-budget decisions and the fitted
schedule are the main process's, shared with the others; the main process alone writes the log,
checkpoints and the model folder.

Files under ``output``: the model folder (:mod:`generator.volumes.model_folder`; UNet weights are the
EMA), ``train_log.csv``, and ``checkpoints/latest/`` in the layout of :mod:`generator.checkpoints`
(``model.safetensors`` with ``vae.*`` and ``unet.*`` weights, ``ema.safetensors``,
``optimizer.safetensors`` with ``vae_opt.*`` and ``unet_opt.*`` moments, ``state.json`` with steps,
configs and checksums): weights and optimizer moments only, never voxels or latents.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from conditioning.text_encoder import DEFAULT_TEXT_ENCODER, encode_prompts, hidden_size, load_text_encoder
from generator._utils import cpu_only, look_up_option, training_autocast
from generator.checkpoints import (
    STATE_JSON,
    ema_from_files,
    ema_to_files,
    json_plain,
    load_weights,
    optimizer_from_files,
    optimizer_to_files,
    read_checkpoint_state,
    read_checkpoint_tensors,
    write_checkpoint,
)
from generator.data.records import IntensityMapping
from generator.models.config import check_oversample
from generator.recipe import (
    StepPlan,
    denoising_loss,
    denoising_target,
    draw_records,
    oversample_weights,
    unet_ema,
    warmup_cosine,
)
from generator.volumes.model_folder import save_volume_model
from generator.volumes.models import (
    VOLUME_PRESETS,
    VolumeModelConfig,
    build_noise_scheduler,
    build_unet,
    build_vae,
    to_fast_layout,
)
from generator.volumes.records import VolumeIngestResult

if TYPE_CHECKING:
    from generator.volumes.store import VolumeStore

__all__ = ["VolumeTrainConfig", "VolumeTrainingData", "VolumeTrainer", "VolumeTrainResult", "VOLUME_TRAIN_PRESETS"]

_STAGES = {"vae": 1, "unet": 2}
#: Warm-up steps of the UNet learning rate (a tenth of ``unet_steps`` when that is fewer).
_UNET_WARMUP = 50
#: ``state.json["kind"]`` of a volume checkpoint (the layout is :mod:`generator.checkpoints`'s).
CHECKPOINT_KIND = "volume"


@dataclass(frozen=True)
class VolumeTrainConfig:
    """Optimisation settings (saved in ``radsynth.json`` under ``training``).

    Attributes:
        seed: Base seed of initialisation and of every per-step draw.
        vae_steps: Optimizer steps of the VAE stage.
        unet_steps: Optimizer steps of the UNet stage.
        batch_size: Volumes per VAE step.
        unet_batch_size: Latents per UNet step.
        vae_lr: AdamW learning rate of the VAE.
        unet_lr: AdamW learning rate of the UNet (cosine decay to 10% after a short warm-up).
        kl_weight: Weight of the KL term of the VAE loss (beside L1).
        ema_decay: Decay of the EMA of the UNet weights, reached after a warm-up
            (:func:`generator.recipe.unet_ema`); the saved UNet weights are the EMA.
        prompt_dropout: Share of UNet steps' prompts replaced by the null prompt ``""``.
        max_minutes: Wall-clock budget of the whole run (``None``: none); the VAE stage gets
            ``vae_share`` of it. The UNet's cosine schedule is then fitted to the steps the clock allows
            (:class:`generator.recipe.StepPlan`, at most ``unet_steps``), as in the 2D trainer.
        vae_share: Share of ``max_minutes`` for the VAE stage.
        checkpoint_every: Steps between checkpoints (and at the end of each stage/run).
        vae_fg_weight: Intensity weighting of the VAE's L1 term: a voxel of model value ``v`` in
            ``[0, 1]`` weighs ``1 + (vae_fg_weight - 1) * v`` (1: plain L1). Small bright structures
            (masks with ~2 % foreground) are otherwise reconstructed as empty background.
        mixed_precision: ``"no"`` (float32) or ``"bf16"``: forward passes of both stages under bfloat16
            autocast (:func:`generator._utils.training_autocast`), weights, optimizer and losses in
            float32; needs native bfloat16 (the caller resolves ``"auto"`` with
            :func:`generator._utils.resolve_mixed_precision`). On an AMX CPU bf16 made the ``lean``
            VAE steps 3.2x and UNet steps 1.8x faster (``scripts/bench_3d.py --step-timing``).
        snr_gamma: Min-SNR-gamma weighting of the UNet loss (Hang et al. 2023): per-sample weight
            ``min(SNR(t), gamma) / SNR(t)`` for epsilon, ``min(SNR(t), gamma) / (SNR(t) + 1)`` for
            v-prediction; ``0`` turns it off (plain MSE).
        oversample: ``((term, weight), ...)``: UNet steps draw a volume whose text contains ``term``
            (case-insensitive) ``weight`` times as often (weights of several matching terms multiply; the
            VAE stage draws uniformly); ``()``: uniform, as the 2D trainer's ``TrainConfig.oversample``.

    Raises:
        ValueError: on construction, naming a bad field.
    """

    seed: int = 0
    vae_steps: int = 200
    unet_steps: int = 1000
    batch_size: int = 4
    unet_batch_size: int = 16
    vae_lr: float = 2e-3
    unet_lr: float = 1e-3
    kl_weight: float = 1e-6
    ema_decay: float = 0.995
    prompt_dropout: float = 0.1
    max_minutes: float | None = None
    vae_share: float = 0.3
    checkpoint_every: int = 100
    vae_fg_weight: float = 1.0
    snr_gamma: float = 0.0
    mixed_precision: str = "no"
    oversample: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "oversample", check_oversample(self.oversample))  # frozen dataclass
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16' for volumes, got {self.mixed_precision!r}")
        for name in ("vae_steps", "unet_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("batch_size", "unet_batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("vae_lr", "unet_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("ema_decay", "prompt_dropout", "vae_share"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.vae_fg_weight >= 1.0:
            raise ValueError(f"vae_fg_weight must be >= 1, got {self.vae_fg_weight!r}")
        if not self.snr_gamma >= 0.0:
            raise ValueError(f"snr_gamma must be >= 0 (0: off), got {self.snr_gamma!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 or None, got {self.max_minutes!r}")
        if int(self.seed) < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed!r}")

    @classmethod
    def for_preset(cls, preset: str, **overrides: Any) -> "VolumeTrainConfig":
        """The training settings that go with model preset ``preset`` (:data:`VOLUME_TRAIN_PRESETS`;
        the dataclass defaults for presets not listed there), with ``overrides`` on top.

        Raises:
            ValueError: unknown preset (with a "did you mean"), or a bad override (named).
        """
        name = look_up_option(preset, list(VOLUME_PRESETS), name="preset")
        return cls(**{**VOLUME_TRAIN_PRESETS.get(name, {}), **overrides})


#: Training settings of a model preset where they differ from :class:`VolumeTrainConfig`'s defaults
#: (``VolumeTrainConfig.for_preset``). ``lean``: the AdrenalMNIST3D recipe of docs/volumes.md
#: (intensity-weighted VAE loss for ~2 % foreground masks, min-SNR-5 with the preset's v-prediction,
#: batches of 8 latents). Seventh session: 1,500 VAE steps (400 left the VAE's round trip at 14x the
#: real-vs-real FD; 1,200 brought it below the reference) and a UNet cap of 20,000 steps, so that under
#: ``max_minutes`` the clock ends the UNet stage and its cosine is fitted to it (``StepPlan``).
VOLUME_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "lean": {"vae_fg_weight": 10.0, "snr_gamma": 5.0, "vae_share": 0.3, "ema_decay": 0.99, "vae_steps": 1500,
             "unet_steps": 20000, "unet_batch_size": 8},
}


@dataclass
class VolumeTrainingData:
    """Training volumes in model range with their texts and the common geometry.

    Attributes:
        volumes: ``(N, D, H, W)`` float32 in ``[0, 1]``: in memory, or a memory map of a volume store
            (:meth:`from_store`). A C-order float32 array (a read-only ``np.memmap`` included) is kept as it
            is, never copied; its values are checked a chunk of volumes at a time, so checking a memory map
            does not load it. Other arrays are converted to C-order float32.
        texts: N prompts.
        spacing: ``(slice, row, column)`` mm of every volume.
        intensity: Mapping from ``[0, 1]`` to physical units (the dataset's).
        fingerprint: Identifies the data without containing it (recorded in ``radsynth.json``).

    Raises:
        ValueError: on construction, for shape/length mismatches or values outside ``[0, 1]``.
    """

    volumes: np.ndarray
    texts: list[str]
    spacing: tuple[float, float, float]
    intensity: IntensityMapping
    fingerprint: str = ""

    def __post_init__(self) -> None:
        v = self.volumes
        if not (isinstance(v, np.ndarray) and v.dtype == np.float32 and v.flags.c_contiguous):
            v = np.ascontiguousarray(v, dtype=np.float32)
        if v.ndim != 4 or v.shape[0] < 1:
            raise ValueError(f"volumes must be (N, D, H, W) with N >= 1, got shape {v.shape}")
        if len(self.texts) != v.shape[0]:
            raise ValueError(f"texts has {len(self.texts)} entries but volumes has {v.shape[0]}")
        finite, lo, hi = _value_range(v)
        if not finite or lo < 0 or hi > 1:
            raise ValueError(f"volumes must be finite in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        self.volumes = v
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]

    @classmethod
    def from_ingest(cls, result: VolumeIngestResult) -> "VolumeTrainingData":
        """From :func:`generator.volumes.ingest.load_volumes` (loaded with ``spacing`` and ``shape``).

        Raises:
            ValueError: no records, or records with different spacings or shapes.
        """
        if not result.records:
            raise ValueError(f"no usable volumes ({result.summary})")
        spacings = {tuple(round(s, 4) for s in r.spacing) for r in result.records}
        if len(spacings) > 1:
            raise ValueError(f"volumes have {len(spacings)} spacings {sorted(spacings)[:4]}; load with spacing=")
        first = result.records[0].intensity
        return cls(volumes=result.stack(), texts=[r.text for r in result.records],
                   spacing=result.records[0].spacing, intensity=first, fingerprint=result.fingerprint())

    @classmethod
    def from_store(cls, store: "VolumeStore") -> "VolumeTrainingData":
        """From a volume store (:func:`generator.volumes.store.write_volume_store`), without loading it:
        ``volumes`` is a copy-on-write memory map of its ``volumes.npy`` (writable for torch, never written
        to the file), read as training indexes it. Same volumes, texts, spacing, intensity and fingerprint
        as :meth:`from_ingest` of the same source and settings, so training gives the same weights.

        Raises:
            ValueError: the store's ``volumes.npy`` no longer matches its ``store.json``.
        """
        return cls(volumes=store.memmap("c"), texts=store.texts, spacing=store.spacing, intensity=store.intensity,
                   fingerprint=store.fingerprint)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)``."""
        return tuple(int(s) for s in self.volumes.shape[1:])  # type: ignore[return-value]


#: Voxels checked at a time by :func:`_value_range` (64 MB of float32).
_CHECK_VOXELS = 1 << 24


def _value_range(volumes: np.ndarray) -> tuple[bool, float, float]:
    """``(all finite, min, max)`` of ``(N, D, H, W)`` ``volumes``, read a chunk of volumes at a time (a memory map
    is not loaded whole; no temporary larger than a chunk). ``min``/``max`` are NaN when a NaN is present."""
    step = max(1, _CHECK_VOXELS // max(1, int(np.prod(volumes.shape[1:]))))
    finite, lows, highs = True, [], []
    for i in range(0, volumes.shape[0], step):
        chunk = volumes[i:i + step]
        finite = finite and bool(np.isfinite(chunk).all())
        lows.append(chunk.min())
        highs.append(chunk.max())
    return finite, float(np.min(lows)), float(np.max(highs))


@dataclass
class VolumeTrainResult:
    """What a :meth:`VolumeTrainer.run` call did.

    Attributes:
        output: The model folder.
        finished: Both stages reached their step count or the time budget (the folder holds a model).
        vae_step: VAE steps done so far.
        unet_step: UNet steps done so far.
        seconds: Training seconds so far (all runs of this output).
        vae_loss: Mean VAE loss of the last 10 steps (``nan`` if none).
        unet_loss: Mean UNet loss of the last 10 steps (``nan`` if none).
    """

    output: Path
    finished: bool
    vae_step: int
    unet_step: int
    seconds: float
    vae_loss: float
    unet_loss: float


def _generator(seed: int, stage: str, step: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), _STAGES[stage], int(step)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class _VaeRoundTrip(nn.Module):
    """The VAE's training forward pass as one module (what DistributedDataParallel wraps): encode,
    draw the posterior sample with the given noise, decode.

    ``forward(x, eps)``: ``x`` ``(B, 1, D, H, W)`` in ``[-1, 1]``, ``eps`` standard normal of the latent
    shape ``(B, C, d, h, w)``; returns ``(reconstruction, z_mu, z_sigma)``.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_mu, z_sigma = self.vae.encode(x)
        return self.vae.decode(z_mu + z_sigma * eps), z_mu, z_sigma


def _optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``opt``'s state as :func:`generator.checkpoints.optimizer_to_files` splits it, tensor keys prefixed."""
    tensors, meta = optimizer_to_files(opt.state_dict())
    return {f"{prefix}.{k}": v for k, v in tensors.items()}, meta


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix.``, with the prefix removed."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


class VolumeTrainer:
    """Train a volume model: VAE (L1 + KL), latent cache, UNet (epsilon MSE, EMA, prompt dropout).

    Args:
        data: The training volumes.
        output: Model folder to write (checkpoints and log go inside).
        model_config: Architecture (e.g. ``get_volume_preset("small")``).
        train_config: Optimisation settings.
        text_encoder: ``transformers`` folder, or ``None`` for the packaged MiniLM.
        resume: Continue from ``output/checkpoints`` if present (the configs must match).
        progress: Print a line per checkpoint.

    Raises:
        ValueError: a data shape the networks cannot handle, or (with ``resume``) a checkpoint made
            with other configs or data.
    """

    def __init__(self, data: VolumeTrainingData, output: str | Path, model_config: VolumeModelConfig,
                 train_config: VolumeTrainConfig, *, text_encoder: str | Path | None = None,
                 resume: bool = False, progress: bool = False) -> None:
        self.data, self.output = data, Path(output)
        self.mc, self.tc = model_config, train_config
        self.latent_shape = model_config.latent_shape(data.shape)
        self.text_encoder_name = text_encoder
        self.progress = progress
        self.accelerator = acc = Accelerator(cpu=cpu_only())
        self.device = acc.device
        for name, size in (("batch_size", train_config.batch_size), ("unet_batch_size", train_config.unet_batch_size)):
            if size % acc.num_processes:
                raise ValueError(f"{name} {size} must be a multiple of the number of processes "
                                 f"({acc.num_processes}): each process trains on an equal share of a batch")
        self.tokenizer, self.encoder = load_text_encoder(text_encoder)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights; the global RNG is left alone
            torch.manual_seed(int(train_config.seed))
            self.vae = to_fast_layout(build_vae(model_config), self.device)
            self.unet = to_fast_layout(build_unet(model_config, hidden_size(self.encoder)), self.device)
        self.ema = unet_ema(self.unet, train_config.ema_decay)
        self._unet_names = [n for n, _ in self.unet.named_parameters()]
        self.scheduler = build_noise_scheduler(model_config)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=train_config.vae_lr, weight_decay=0.0)
        self.unet_opt = torch.optim.AdamW(self.unet.parameters(), lr=train_config.unet_lr, weight_decay=0.01)
        self.vae_step = self.unet_step = 0
        #: Steps the UNet's LR schedule spans: ``unet_steps``, or fewer when a time budget ends first.
        self._unet_plan = StepPlan(total=int(train_config.unet_steps))
        self.vae_done = self.unet_done = False
        self.seconds = 0.0
        self.scaling_factor: float | None = None
        self._latents: torch.Tensor | None = None
        self._losses: dict[str, list[float]] = {"vae": [], "unet": []}
        texts = list(dict.fromkeys(["", *data.texts]))
        states = encode_prompts(self.tokenizer, self.encoder, texts, dtype=torch.float32)
        index = {t: i for i, t in enumerate(texts)}
        self._null = states[index[""]]
        self._context = states[[index[t] for t in data.texts]]
        self._draw_weights = oversample_weights(data.texts, train_config.oversample)
        self.ckpt_dir = self.output / "checkpoints"
        self.ckpt_path = self.ckpt_dir / "latest"
        if resume and (self.ckpt_dir / STATE_JSON).is_file():
            raise ValueError(f"{self.ckpt_dir}: a volume checkpoint of an earlier RadSynth layout, which this "
                             "version cannot resume; start again in a new output folder")
        if resume and (self.ckpt_path / STATE_JSON).is_file():
            self._load_checkpoint()
        # after a resume has loaded the weights: DistributedDataParallel starts from them everywhere
        self._vae_train = acc.prepare(_VaeRoundTrip(self.vae))
        self._unet_train = acc.prepare(self.unet)
        self.ema.to(device=self.device)
        for opt in (self.vae_opt, self.unet_opt):  # resumed moments follow their weights to the device
            for slot in opt.state.values():
                for key, value in slot.items():
                    if torch.is_tensor(value) and key != "step":
                        slot[key] = value.to(self.device)
        self._null, self._context = self._null.to(self.device), self._context.to(self.device)

    @property
    def _main(self) -> bool:
        return self.accelerator.is_main_process

    def _share(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """This process's items of a whole batch (rows ``r, r + W, ...``), on the training device."""
        acc = self.accelerator
        return [t[acc.process_index::acc.num_processes].to(self.device) for t in tensors]

    def _batch_mean(self, loss: torch.Tensor) -> float:
        """The whole batch's mean loss: this process's share averaged over the processes (equal shares),
        so the log reads the same for any number of processes."""
        loss = loss.detach()
        if self.accelerator.num_processes > 1:
            loss = self.accelerator.reduce(loss, reduction="mean")
        return float(loss)

    def _agree(self, flag: bool) -> bool:
        """``flag`` as the main process sees it, on every process (one decision for all: a process that
        stopped alone would leave the others waiting in a collective)."""
        if self.accelerator.num_processes == 1:
            return flag
        from accelerate.utils import broadcast_object_list

        box = [bool(flag)]
        broadcast_object_list(box, from_process=0)
        return bool(box[0])

    # ------------------------------------------------------------------------------ checkpoints
    def _identity(self) -> dict[str, Any]:
        return {"model_config": self.mc.to_dict(), "train_config": {**asdict(self.tc), "max_minutes": None},
                "data": {"n": int(self.data.volumes.shape[0]), "shape": list(self.data.shape),
                         "fingerprint": self.data.fingerprint}}

    def _save_checkpoint(self) -> None:
        """Write ``checkpoints/latest`` (:func:`generator.checkpoints.write_checkpoint`: safetensors
        with sizes and SHA-256 in ``state.json``, written to a hidden folder and renamed into place) on
        the main process; every process waits until it is written."""
        if self._main:
            self._write_checkpoint()
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self) -> None:
        weights: dict[str, torch.Tensor] = {}
        for name, net in (("vae", self.vae), ("unet", self.unet)):
            weights.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
        ema, ema_meta = ema_to_files(self.ema, self._unet_names)
        t1, m1 = _optimizer_tensors(self.vae_opt, "vae_opt")
        t2, m2 = _optimizer_tensors(self.unet_opt, "unet_opt")
        state = {"kind": CHECKPOINT_KIND, **self._identity(), "vae_step": self.vae_step,
                 "unet_step": self.unet_step, "vae_done": self.vae_done, "unet_done": self.unet_done,
                 "seconds": self.seconds, "scaling_factor": self.scaling_factor, "ema": ema_meta,
                 "unet_plan_total": self._unet_plan.total,
                 "vae_opt": m1, "unet_opt": m2, "losses": {k: v[-10:] for k, v in self._losses.items()}}
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_checkpoint(self.ckpt_path, {"model.safetensors": weights, "optimizer.safetensors": {**t1, **t2},
                                          "ema.safetensors": ema}, state)

    def _load_checkpoint(self) -> None:
        path = self.ckpt_path / STATE_JSON
        state = read_checkpoint_state(self.ckpt_path)
        if state.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{path}: a checkpoint of kind {state.get('kind')!r}, not a volume model's "
                             f"({CHECKPOINT_KIND!r})")
        mine = self._identity()
        defaults = {"model_config": VolumeModelConfig().to_dict(), "train_config": asdict(VolumeTrainConfig())}
        for key in ("model_config", "train_config", "data"):
            theirs = state.get(key)
            if key in defaults and isinstance(theirs, dict):  # fields added since take their defaults
                theirs = {**json_plain(defaults[key]), **theirs}
                if key == "train_config":
                    theirs["max_minutes"] = None  # the time budget may change on resume
            if json_plain(mine[key]) != theirs:
                raise ValueError(f"{path}: the checkpoint's {key} differs from this run's; resume with the "
                                 f"same settings or start a new output folder")
        weights = read_checkpoint_tensors(self.ckpt_path, "model.safetensors", state)
        load_weights(self.vae, _prefixed(weights, "vae"), self.ckpt_path)
        load_weights(self.unet, _prefixed(weights, "unet"), self.ckpt_path)
        if "ema" not in state:
            raise ValueError(f"{path}: a volume checkpoint of an earlier RadSynth version (its EMA saved as a "
                             "network), which this version cannot resume; start again in a new output folder")
        try:
            ema_from_files(self.ema, read_checkpoint_tensors(self.ckpt_path, "ema.safetensors", state),
                           state["ema"], self._unet_names)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{self.ckpt_path}: the EMA state does not fit this run: {exc}") from None
        moments = read_checkpoint_tensors(self.ckpt_path, "optimizer.safetensors", state)
        for name, opt in (("vae_opt", self.vae_opt), ("unet_opt", self.unet_opt)):
            opt.load_state_dict(optimizer_from_files(_prefixed(moments, name), state[name], opt.state_dict()))
        self.vae_step, self.unet_step = int(state["vae_step"]), int(state["unet_step"])
        self.vae_done, self.unet_done = bool(state["vae_done"]), bool(state["unet_done"])
        self.seconds, self.scaling_factor = float(state["seconds"]), state["scaling_factor"]
        self._unet_plan.total = int(state.get("unet_plan_total", self.tc.unet_steps))
        self._losses = {k: list(v) for k, v in state.get("losses", {}).items()} or self._losses

    # ------------------------------------------------------------------------------ steps
    def _autocast(self) -> ContextManager[Any]:
        return training_autocast(self.tc.mixed_precision, self.device)

    def _vae_step(self) -> float:
        g = _generator(self.tc.seed, "vae", self.vae_step)
        n = self.data.volumes.shape[0]
        idx = torch.randint(0, n, (self.tc.batch_size,), generator=g)
        x = torch.from_numpy(self.data.volumes[idx.numpy()]).unsqueeze(1) * 2.0 - 1.0
        eps = torch.randn((self.tc.batch_size, *self.latent_shape), generator=g)
        x, eps = self._share(x, eps)
        self.vae.train()
        with self._autocast():
            rec, z_mu, z_sigma = self._vae_train(x, eps)
        z_mu, z_sigma, rec = z_mu.float(), z_sigma.float(), rec.float()
        kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1).flatten(1).sum(1).mean()
        if self.tc.vae_fg_weight != 1.0:  # intensity-weighted L1 (x in [-1, 1] -> weight 1 .. vae_fg_weight)
            w = 1.0 + (self.tc.vae_fg_weight - 1.0) * (x + 1.0) / 2.0
            rec_loss = (w * (rec - x).abs()).mean()
        else:
            rec_loss = F.l1_loss(rec, x)
        loss = rec_loss + self.tc.kl_weight * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        self.vae_step += 1
        return self._batch_mean(loss)

    @torch.no_grad()
    def _cache_latents(self) -> None:
        self.vae.eval()
        out = []
        for i in range(0, self.data.volumes.shape[0], 16):
            x = torch.from_numpy(self.data.volumes[i:i + 16]).unsqueeze(1) * 2.0 - 1.0
            out.append(self.vae.encode(x.to(self.device))[0])
        z = torch.cat(out)
        if self.scaling_factor is None:
            self.scaling_factor = float(1.0 / max(float(z.std()), 1e-6))
        self._latents = z * self.scaling_factor

    def _unet_lr(self) -> float:
        return self.tc.unet_lr * warmup_cosine(self.unet_step, self._unet_plan.total, _UNET_WARMUP)

    def _unet_step(self) -> float:
        if self._latents is None:
            self._cache_latents()
        g = _generator(self.tc.seed, "unet", self.unet_step)
        n = self._latents.shape[0]
        b = self.tc.unet_batch_size
        idx = draw_records(g, n, b, self._draw_weights)
        noise = torch.randn((b, *self._latents.shape[1:]), generator=g)
        t = torch.randint(0, self.mc.num_train_timesteps, (b,), generator=g)
        drop = torch.rand(b, generator=g) < self.tc.prompt_dropout
        idx, noise, t, drop = self._share(idx, noise, t, drop)
        z0 = self._latents[idx]
        context = torch.where(drop[:, None, None], self._null.expand_as(self._context[idx]), self._context[idx])
        zt = self.scheduler.add_noise(z0, noise, t)
        target = denoising_target(self.scheduler, z0, noise, t, self.mc.prediction_type)
        self.unet.train()
        with self._autocast():
            pred = self._unet_train(zt, timesteps=t, context=context)
        loss = denoising_loss(pred, target, t, self.scheduler, self.mc.prediction_type, self.tc.snr_gamma).mean()
        for group in self.unet_opt.param_groups:
            group["lr"] = self._unet_lr()
        self.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.unet_opt.step()
        self.ema.step(self.unet.parameters())
        self.unet_step += 1
        return self._batch_mean(loss)

    # ------------------------------------------------------------------------------ run
    def run(self, max_steps: int | None = None, callback: Callable[[str, int, float], None] | None = None
            ) -> VolumeTrainResult:
        """Train until both stages are done, the time budget is spent, or ``max_steps`` steps
        (both stages counted) have run in this call; checkpoint; write the model folder when done.

        Args:
            max_steps: Steps to run in this call (``None``: no limit); for interruption and tests.
            callback: ``callback(stage, step, loss)`` after each step.
        """
        acc = self.accelerator
        if self._main:
            self.output.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        log_path = self.output / "train_log.csv"
        new_log = not log_path.exists()
        budget = None if self.tc.max_minutes is None else 60.0 * self.tc.max_minutes
        ran = 0
        t0, base = time.monotonic(), self.seconds
        # the main process writes the log; the others write to nothing
        with open(log_path if self._main else os.devnull, "a", newline="") as fh:
            log = csv.writer(fh)
            if new_log and self._main:
                log.writerow(["stage", "step", "loss", "seconds"])

            def elapsed() -> float:
                return base + time.monotonic() - t0

            def stop() -> bool:
                return max_steps is not None and ran >= max_steps

            while not self.vae_done and not stop():
                # under several processes the clock is the main process's (no collective without a budget)
                if self.vae_step >= self.tc.vae_steps or (budget and self._agree(
                        elapsed() >= budget * self.tc.vae_share)):
                    self.vae_done = True
                    break
                loss = self._vae_step()
                ran += 1
                self._losses["vae"].append(loss)
                log.writerow(["vae", self.vae_step, f"{loss:.6g}", f"{elapsed():.2f}"])
                if callback:
                    callback("vae", self.vae_step, loss)
                if self.vae_step % self.tc.checkpoint_every == 0:
                    self.seconds = elapsed()
                    self._save_checkpoint()
            plan = self._unet_plan
            if self.vae_done and not self.unet_done:
                self._cache_latents()
                # under a time budget, the LR schedule is fitted to the steps the clock allows
                plan.deadline = budget
                plan.begin(self.unet_step, elapsed())
            while self.vae_done and not self.unet_done and not stop():
                if self.unet_step >= plan.total or (budget and self._agree(elapsed() >= budget)):
                    self.unet_done = True
                    break
                loss = self._unet_step()
                if plan.due(self.unet_step):
                    now = elapsed()
                    total = [min(self.tc.unet_steps, plan.estimate(self.unet_step, now))]
                    if acc.num_processes > 1:  # the main process's estimate: one schedule everywhere
                        from accelerate.utils import broadcast_object_list

                        broadcast_object_list(total, from_process=0)
                    plan.refit(int(total[0]), self.unet_step, now)
                ran += 1
                self._losses["unet"].append(loss)
                log.writerow(["unet", self.unet_step, f"{loss:.6g}", f"{elapsed():.2f}"])
                if callback:
                    callback("unet", self.unet_step, loss)
                if self.unet_step % self.tc.checkpoint_every == 0:
                    self.seconds = elapsed()
                    self._save_checkpoint()
                    if self.progress and self._main:
                        print(f"unet step {self.unet_step}: loss {np.mean(self._losses['unet'][-10:]):.4f} "
                              f"({elapsed():.0f} s)", flush=True)
            if self.vae_done and not self.unet_done and self.unet_step >= plan.total:
                self.unet_done = True
        self.seconds = elapsed()
        self._save_checkpoint()
        if self.unet_done:
            if self._main:
                self.save_model()
            acc.wait_for_everyone()

        def mean(x: list[float]) -> float:
            return float(np.mean(x[-10:])) if x else float("nan")

        return VolumeTrainResult(self.output, self.unet_done, self.vae_step, self.unet_step, self.seconds,
                                 mean(self._losses["vae"]), mean(self._losses["unet"]))

    def save_model(self) -> Path:
        """Write the model folder (UNet = EMA weights) into ``output``."""
        if self.scaling_factor is None:
            self._cache_latents()
        info = {"shape": list(self.data.shape), "spacing": list(self.data.spacing),
                "intensity": self.data.intensity.to_dict(), "modality": self.data.intensity.modality,
                "scaling_factor": float(self.scaling_factor), "latent_shape": list(self.latent_shape),
                "data_fingerprint": self.data.fingerprint, "training": {
                    **asdict(self.tc), "vae_steps_done": self.vae_step, "unet_steps_done": self.unet_step,
                    "seconds": round(self.seconds, 1), "num_volumes": int(self.data.volumes.shape[0])}}
        te = None if self.text_encoder_name in (None, DEFAULT_TEXT_ENCODER) else self.text_encoder_name
        averaged = build_unet(self.mc, hidden_size(self.encoder)).requires_grad_(False)
        averaged.load_state_dict(self.unet.state_dict())
        self.ema.copy_to(averaged.parameters())
        return save_volume_model(self.output, vae=self.vae, unet=averaged.eval(), scheduler=self.scheduler,
                                 config=self.mc, info=info, text_encoder=te)
