"""Two-stage training driven by ``accelerate``: VAE, then a text-conditioned UNet on cached latents.

Determinism and resumption: every random draw of a training step (batch indices, noise, timesteps,
prompt dropout, paraphrase choice) comes from a generator seeded by ``(seed, stage, step, process)``.
Together with the optimizer, learning-rate and EMA state that ``accelerate`` checkpoints, a run resumed
from a checkpoint continues exactly as the uninterrupted run would have.

The training workspace is ``<output>/checkpoints`` (weights and optimizer state only, never pixels);
it is removed when the model folder has been written, unless ``keep_checkpoints`` is set.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from conditioning.prompts import paraphrase_prompt
from conditioning.text_encoder import (
    DEFAULT_TEXT_ENCODER,
    encode_prompts,
    hidden_size,
    load_text_encoder,
    resolve_text_encoder,
)
from generator.models.config import TrainConfig
from generator._utils import cpu_only
from generator.data import IngestResult
from generator.models.model_folder import save_model_folder
from generator.models.build import build_noise_scheduler, build_unet, build_vae
from generator.models.samplers import make_sampler
from generator.models.pipeline import RadSynthPipeline

#: Called after every optimisation step as ``hook(stage, step)``; tests use it to interrupt a run.
StepHook = Callable[[str, int], None]

_PARAPHRASES_PER_RECORD = 3
_LOG_EVERY = 10


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


@dataclass
class _Plan:
    """Step budget of one stage (total may shrink once the speed is known under a time budget)."""

    total: int
    deadline: float | None  # time.monotonic() value, or None


def _step_generator(seed: int, stage: str, step: int, rank: int) -> torch.Generator:
    stage_id = {"vae": 1, "unet": 2}[stage]
    return torch.Generator().manual_seed(((seed * 1_000_003 + stage_id) * 1_000_033 + step) * 64 + rank)


def _lr_lambda(plan: _Plan, warmup: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        warm = max(1, min(warmup, plan.total // 10))  # short runs: at most a tenth of the steps
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, plan.total - warm))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


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
    """Progress bar plus CSV log (main process only)."""

    COLUMNS = ["stage", "step", "loss", "lr", "steps_per_s", "images_per_s", "elapsed_s"]

    def __init__(self, path: Path, enabled: bool, progress: bool) -> None:
        self.path, self.enabled, self.progress = path, enabled, progress
        self.bar: tqdm | None = None
        if enabled and not path.exists():
            with open(path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.COLUMNS)

    def start(self, stage: str, total: int, initial: int) -> None:
        if self.enabled:
            self.bar = tqdm(total=total, initial=initial, desc=stage.upper(), disable=not self.progress)

    def step(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def row(self, *values: Any) -> None:
        if self.enabled:
            with open(self.path, "a", newline="") as fh:
                csv.writer(fh).writerow(values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _latest_checkpoint(workspace: Path, stage: str) -> Path | None:
    found = sorted(
        (p for p in workspace.glob(f"{stage}-*") if (p / "radsynth_step.json").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return found[-1] if found else None


class Trainer:
    """Trains a RadSynth model folder from an :class:`IngestResult`.

    Args:
        data: Training data (images at any size; resized to ``resolution``).
        output: Model folder to write.
        config: Training configuration (a preset, possibly with overrides).
        resolution: Image side in pixels (``config.latent_size`` times a power of two).
        text_encoder: Hugging Face text encoder folder or id; ``None`` for the bundled MiniLM.
        seed: Seed of every random draw.
        max_minutes: Wall-clock budget of the whole run (the VAE gets ``config.vae_share`` of it).
        max_steps: Upper bound of optimisation steps per stage.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (passed to ``accelerate``).
        gradient_accumulation_steps: Micro-batches per optimiser step.
        resume: Continue from the latest checkpoint in ``output/checkpoints``.
        keep_checkpoints: Keep ``output/checkpoints`` after the model is written.
        link_packaged_text_encoder: With the default encoder, leave it out of the model folder and
            name its package in ``radsynth.json`` instead (the bundled demo model does this).
        save_dtype: dtype of the saved VAE and UNet weights (``torch.float16`` halves the folder;
            loading casts back to the requested dtype).
        progress: Show progress bars.
        step_hook: Called after each step as ``hook(stage, step)``.
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
        mixed_precision: str = "no",
        gradient_accumulation_steps: int = 1,
        resume: bool = False,
        keep_checkpoints: bool = False,
        link_packaged_text_encoder: bool = False,
        save_dtype: torch.dtype = torch.float32,
        progress: bool = True,
        step_hook: StepHook | None = None,
    ) -> None:
        if max_minutes is not None and max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {max_minutes}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        if mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
        config.vae_block_channels(resolution)  # validates resolution against the latent size
        self.data, self.config, self.resolution = data, config, resolution
        self.output = Path(output)
        self.workspace = self.output / "checkpoints"
        self.text_encoder_name = text_encoder
        self.seed, self.max_steps, self.max_minutes = seed, max_steps, max_minutes
        self.resume, self.keep_checkpoints, self.progress = resume, keep_checkpoints, progress
        self.step_hook = step_hook
        self.link_packaged_text_encoder = link_packaged_text_encoder
        self.save_dtype = save_dtype
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            cpu=cpu_only(),
        )
        self.result = TrainResult(output=self.output)

    # ------------------------------------------------------------------ helpers
    @property
    def _main(self) -> bool:
        return self.accelerator.is_main_process

    def _say(self, msg: str) -> None:
        if self._main and self.progress:
            tqdm.write(msg)

    def _plan(self, stage: str, default_steps: int, start: float) -> _Plan:
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
            deadline = start + budget * self.config.vae_share if stage == "vae" else self._run_start + budget
        return _Plan(total=total, deadline=deadline)

    # ------------------------------------------------------------------ data
    def _pixels(self) -> torch.Tensor:
        imgs = [r.image for r in self.data.records]
        if any(im.shape != (self.resolution, self.resolution) for im in imgs):
            raise ValueError(
                f"training images must be {self.resolution}x{self.resolution}; load the data with "
                f"resolution={self.resolution}"
            )
        arr = np.stack(imgs).astype(np.float32)
        return torch.from_numpy(arr * 2.0 - 1.0).unsqueeze(1)

    def _texts(self) -> tuple[list[str], list[list[int]]]:
        """Unique texts and, per record, the indices of the texts it may be trained with."""
        rng = random.Random(self.seed)
        texts: dict[str, int] = {"": 0}
        options: list[list[int]] = []
        for rec in self.data.records:
            cands = [rec.text]
            structured = any(k in rec.attributes for k in ("findings", "sex", "age", "view"))
            if self.config.text_augment and structured:
                try:
                    cands += [paraphrase_prompt(rec.attributes, rng) for _ in range(_PARAPHRASES_PER_RECORD)]
                except ValueError:
                    pass  # attributes that do not parse: train on the record's own text only
            ids = []
            for t in dict.fromkeys(cands):
                ids.append(texts.setdefault(t, len(texts)))
            options.append(ids)
        return list(texts), options

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        """Train both stages and write the model folder; returns a :class:`TrainResult`."""
        self._run_start = time.monotonic()
        acc = self.accelerator
        if self._main:
            self.workspace.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self.log = _Log(self.output / "train_log.csv", self._main, self.progress)
        pixels = self._pixels()

        vae, fresh = self._train_vae(pixels)
        latents_mean, latents_std = self._cache_latents(vae, pixels)
        del pixels
        if fresh:
            # Scale latents to unit variance (stored in the VAE config as scaling_factor).
            vae.register_to_config(scaling_factor=float(1.0 / latents_mean.std().clamp_min(1e-6)))
            if self._main:
                final = self.workspace / "vae-final"
                vae.save_pretrained(final, safe_serialization=True)
                (final / "radsynth_step.json").write_text(
                    json.dumps({"step": self.result.steps["vae"], "loss": self.result.final_loss["vae"]})
                )
            acc.wait_for_everyone()

        tokenizer, text_encoder = load_text_encoder(self.text_encoder_name)
        texts, options = self._texts()
        embeds = encode_prompts(tokenizer, text_encoder, texts).to(torch.float16)
        self._say(f"encoded {len(texts)} distinct prompt texts with {type(text_encoder).__name__}")
        unet = self._train_unet(latents_mean, latents_std, float(vae.config.scaling_factor), embeds, options,
                                 hidden_size(text_encoder))

        if self._main:
            self._save(vae, unet, text_encoder, tokenizer)
        acc.wait_for_everyone()
        if self._main and not self.keep_checkpoints:
            shutil.rmtree(self.workspace, ignore_errors=True)
        acc.end_training()
        return self.result

    def _train_vae(self, pixels: torch.Tensor) -> tuple[AutoencoderKL, bool]:
        """The trained VAE, and whether it was trained now (False: loaded from a finished stage)."""
        cfg, acc = self.config, self.accelerator
        final = self.workspace / "vae-final"
        if self.resume and (final / "config.json").is_file():
            self._say(f"resume: VAE stage already finished ({final})")
            vae = AutoencoderKL.from_pretrained(final)
            done = json.loads((final / "radsynth_step.json").read_text())
            self.result.steps["vae"] = done["step"]
            self.result.final_loss["vae"] = done["loss"]
            return vae, False
        start = time.monotonic()
        torch.manual_seed(self.seed)
        vae = _VAEWithLoss(build_vae(cfg, self.resolution))
        vae, opt, sched, plan, step = self._start_stage("vae", vae, cfg.vae_lr, 1e-4, cfg.vae_steps, start)
        n = pixels.shape[0]
        losses: list[float] = []
        t0, s0 = time.monotonic(), step
        while step < plan.total and not self._out_of_time("vae", plan, step, s0):
            g = _step_generator(self.seed, "vae", step, acc.process_index)
            idx = torch.randint(0, n, (cfg.vae_batch_size,), generator=g)
            x = pixels[idx].to(acc.device)
            eps = torch.randn((x.shape[0], cfg.latent_channels, cfg.latent_size, cfg.latent_size), generator=g)
            with acc.accumulate(vae):
                recon, kl = vae(x, eps.to(acc.device))
                loss = F.l1_loss(recon, x) + cfg.vae_kl_weight * kl.mean()
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
        self.log.close()
        model = acc.unwrap_model(vae).vae
        self.result.steps["vae"] = step
        self.result.final_loss["vae"] = float(np.mean(losses[-_LOG_EVERY:])) if losses else float("nan")
        self.result.seconds["vae"] = time.monotonic() - start
        # Forget the VAE's prepared objects so that UNet checkpoints hold the UNet stage only.
        acc.free_memory()
        return model.eval(), True

    @torch.no_grad()
    def _cache_latents(self, vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of every image: two ``(N, C, h, w)`` tensors (unscaled latents)."""
        means, stds = [], []
        dev = self.accelerator.device
        for i in range(0, pixels.shape[0], 64):
            dist = vae.to(dev).encode(pixels[i : i + 64].to(dev)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
        return torch.cat(means), torch.cat(stds)

    def _train_unet(
        self,
        latents_mean: torch.Tensor,
        latents_std: torch.Tensor,
        scaling: float,
        embeds: torch.Tensor,
        options: list[list[int]],
        cross_dim: int,
    ) -> UNet2DConditionModel:
        cfg, acc = self.config, self.accelerator
        start = time.monotonic()
        torch.manual_seed(self.seed + 1)
        unet = build_unet(cfg, cross_dim)
        ema = EMAModel(
            unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3,
            model_cls=UNet2DConditionModel, model_config=unet.config,
        )
        noise_sched = build_noise_scheduler(cfg)
        self._noise_sched = noise_sched
        unet, opt, sched, plan, step = self._start_stage(
            "unet", unet, cfg.unet_lr, 1e-2, cfg.unet_steps, start, checkpoint_also=ema
        )
        n = latents_mean.shape[0]
        losses: list[float] = []
        t0, s0 = time.monotonic(), step
        while step < plan.total and not self._out_of_time("unet", plan, step, s0):
            g = _step_generator(self.seed, "unet", step, acc.process_index)
            b = cfg.unet_batch_size
            idx = torch.randint(0, n, (b,), generator=g)
            eps_post = torch.randn(latents_mean[idx].shape, generator=g)
            z0 = (latents_mean[idx] + latents_std[idx] * eps_post) * scaling
            noise = torch.randn(z0.shape, generator=g)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=g)
            pick = torch.rand(b, generator=g)
            drop = torch.rand(b, generator=g) < cfg.prompt_dropout
            text_ids = [
                0 if drop[j] else options[int(idx[j])][int(pick[j] * len(options[int(idx[j])]))]
                for j in range(b)
            ]
            context = embeds[text_ids].float().to(acc.device)
            z0, noise, t = z0.to(acc.device), noise.to(acc.device), t.to(acc.device)
            noisy = noise_sched.add_noise(z0, noise, t)
            target = noise if cfg.prediction_type == "epsilon" else noise_sched.get_velocity(z0, noise, t)
            with acc.accumulate(unet):
                pred = unet(noisy, t, encoder_hidden_states=context).sample
                per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if cfg.min_snr_gamma is not None:
                    snr = compute_snr(noise_sched, t.cpu()).to(acc.device)
                    w = torch.clamp(snr, max=cfg.min_snr_gamma)
                    w = w / snr if cfg.prediction_type == "epsilon" else w / (snr + 1)
                    per = per * w
                loss = per.mean()
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
            self._after_step("unet", step, plan, losses, t0, s0, b, sched, unet, opt)
        self.log.close()
        model = acc.unwrap_model(unet)
        ema.copy_to(model.parameters())
        self.result.steps["unet"] = step
        self.result.final_loss["unet"] = float(np.mean(losses[-_LOG_EVERY:])) if losses else float("nan")
        self.result.seconds["unet"] = time.monotonic() - start
        return model.eval()

    def _start_stage(
        self, stage: str, model: torch.nn.Module, lr: float, weight_decay: float, default_steps: int,
        start: float, checkpoint_also: Any = None,
    ) -> tuple[Any, Any, Any, _Plan, int]:
        """AdamW + warm-up/cosine schedule, prepared by ``accelerate``; resumed from the stage's latest
        checkpoint when asked. Returns ``(model, optimizer, scheduler, plan, first_step)``."""
        plan = self._plan(stage, default_steps, start)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(plan, self.config.warmup_steps))
        model, opt, sched = self.accelerator.prepare(model, opt, sched)
        if checkpoint_also is not None:
            self.accelerator.register_for_checkpointing(checkpoint_also)
        step = self._maybe_resume(stage, plan)
        self.log.start(stage, plan.total if plan.total < 10**7 else None, step)
        return model, opt, sched, plan, step

    def _out_of_time(self, stage: str, plan: _Plan, step: int, first_step: int) -> bool:
        """Whether the stage's clock has run out (never before its first step of this run)."""
        if plan.deadline is None or step == first_step or time.monotonic() < plan.deadline:
            return False
        self._say(f"{stage.upper()} stage reached its time budget at step {step}")
        return True

    def _maybe_resume(self, stage: str, plan: _Plan) -> int:
        if not self.resume:
            return 0
        ckpt = _latest_checkpoint(self.workspace, stage)
        if ckpt is None:
            return 0
        self.accelerator.load_state(str(ckpt))
        meta = json.loads((ckpt / "radsynth_step.json").read_text())
        plan.total = int(meta.get("plan_total", plan.total))
        self._say(f"resume: {stage.upper()} from step {meta['step']} ({ckpt})")
        return int(meta["step"])

    def _after_step(
        self, stage: str, step: int, plan: _Plan, losses: list[float], t0: float, s0: int,
        batch: int, sched: Any, model: Any, opt: Any,
    ) -> None:
        acc = self.accelerator
        elapsed = time.monotonic() - t0
        rate = (step - s0) / max(elapsed, 1e-9)
        # Under a time budget, fit the cosine schedule to the steps the clock allows (once).
        if plan.deadline is not None and step - s0 == 20 and self.max_steps is None:
            remaining = max(0.0, plan.deadline - time.monotonic())
            plan.total = step + max(1, int(remaining * rate * 0.97))
            if self.log.bar is not None:
                self.log.bar.total = plan.total
        self.log.step(1, loss=f"{losses[-1]:.4f}")
        if step % _LOG_EVERY == 0 or step == plan.total:
            imgs = rate * batch * acc.num_processes * acc.gradient_accumulation_steps
            self.log.row(stage, step, f"{np.mean(losses[-_LOG_EVERY:]):.6f}", f"{sched.get_last_lr()[0]:.3e}",
                         f"{rate:.3f}", f"{imgs:.1f}", f"{time.monotonic() - self._run_start:.1f}")
        if step % self.config.checkpoint_every == 0 and step < plan.total:
            ckpt = self.workspace / f"{stage}-{step}"
            acc.save_state(str(ckpt))
            if self._main:
                (ckpt / "radsynth_step.json").write_text(json.dumps({"step": step, "plan_total": plan.total}))
                for old in self.workspace.glob(f"{stage}-*"):
                    if old != ckpt and old.name.split("-")[1].isdigit():
                        shutil.rmtree(old, ignore_errors=True)
            acc.wait_for_everyone()
        if self.step_hook is not None:
            self.step_hook(stage, step)

    # ------------------------------------------------------------------ save
    def _save(self, vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: Any, tokenizer: Any) -> None:
        sampler = make_sampler("dpm", self._noise_sched)
        if self.save_dtype != torch.float32:
            vae, unet = vae.to(self.save_dtype), unet.to(self.save_dtype)
        pipe = RadSynthPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                scheduler=sampler)
        info = self.model_info()
        default = self.text_encoder_name in (None, DEFAULT_TEXT_ENCODER)
        packaged = DEFAULT_TEXT_ENCODER if default and self.link_packaged_text_encoder else None
        save_model_folder(pipe, self.output, info=info, card=self.model_card(info), packaged_text_encoder=packaged)

    def model_info(self) -> dict[str, Any]:
        """Content of ``radsynth.json`` for this run."""
        import accelerate
        import diffusers
        import transformers

        radsynth_version = _package_version()

        d = self.data
        return {
            "radsynth_version": radsynth_version,
            "resolution": self.resolution,
            "channels": 1,
            "intensity": d.intensity.to_dict(),
            "modality": d.intensity.modality,
            "train_config": self.config.to_dict(),
            "seed": self.seed,
            "text_encoder": {"name_or_path": self.text_encoder_name or DEFAULT_TEXT_ENCODER,
                             "resolved": resolve_text_encoder(self.text_encoder_name)
                             if self.text_encoder_name is None else self.text_encoder_name},
            "data": {"source": d.source, "num_images": len(d.records), "num_skipped": len(d.skipped),
                     "fingerprint": d.fingerprint()},
            "training": {"steps": self.result.steps, "final_loss": self.result.final_loss,
                         "seconds": {k: round(v, 1) for k, v in self.result.seconds.items()},
                         "num_processes": self.accelerator.num_processes,
                         "mixed_precision": str(self.accelerator.mixed_precision)},
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                         "python": platform.python_version()},
        }

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
  prompt dropout {cfg['prompt_dropout']}, EMA decay {cfg['ema_decay']}
- text encoder: `{info['text_encoder']['name_or_path']}` (frozen); seed {info['seed']}
- steps: {tr['steps']}; seconds: {tr['seconds']}; processes: {tr['num_processes']}; mixed precision: {tr['mixed_precision']}

## Final losses
{json.dumps(tr['final_loss'])}

## Intended use
Synthetic data for research: augmentation, teaching sets, model stress tests. Not for diagnosis.
Synthetic images are marked as such when exported (DICOM Synthetic Data = YES).
"""
