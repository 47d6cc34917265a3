#!/usr/bin/env python
"""Sampling benchmark (issue 3): speed against the stock diffusers loop, and quality against steps.

(a) Speed, measured side by side in one run, on the CPU threads torch is given:
    for the model trained by ``scripts/bench_train.py`` and for randomly initialised networks of
    other presets (``--speed-presets``, default the ``small`` preset at 64 px and the ``base`` preset's
    networks at 64 px with 16x16 latents; random weights cost the same as trained ones), images/s of
    - ``diffusers_loop``: the stock diffusers loop a user would otherwise write around the same
      ``vae``/``unet``/``text_encoder``/``tokenizer`` with ``DPMSolverMultistepScheduler`` (same config,
      ``--speed-steps`` steps, guidance, per-image seeds and prompt padding length), float32;
    - ``radsynth_fp32``: ``RadSynthPipeline`` with the same sampler (``"dpm"``), steps and float32
      (its images must equal the stock loop's: the max abs difference is reported);
    - ``radsynth_default_same_steps``: RadSynth's defaults (sampler ``DEFAULT_SAMPLER``,
      ``precision="auto"``: bf16 where the hardware has it) at the stock loop's step count;
    - ``radsynth_default``: RadSynth's defaults including its default (fewer) steps
      (``generator.models.samplers.DEFAULT_STEPS``), the setting whose FD is checked in (b).
    Timings alternate between the methods for ``--repeats`` rounds (median reported) so background
    load hits them alike. Peak memory (``getrusage`` maxrss) is measured per method in a fresh
    subprocess (``--no-memory`` skips it).

(b) Quality against steps (trained model only): a small CNN is trained on the real PneumoniaMNIST
    training split (:func:`generator.evaluation.train_classifier`); the Fréchet distance in its
    penultimate-layer features (not FID: no Inception weights offline) between class-balanced samples
    and the real validation split is reported for DPM-Solver++ at ``--dpm-steps`` (10/20/50) and DDPM
    with 1000 steps (on ``--ddpm-images``, fewer since it is slow), next to the real-vs-real
    reference (balanced training subsets of the same size vs val; the Fréchet distance is biased
    upwards at small sample sizes, so compare rows at equal N). DPM-Solver++ rows run in float32 (the
    stock loop's pixels); ``--samplers NAME:STEPS[:PRECISION],...`` adds rows for other samplers and
    precisions (default: RadSynth's defaults, ``dpm++2m-karras:10:auto``). Conditioning is scored two ways:
    synthetic->real ROC AUC (a classifier trained on the samples, labelled by prompt, tested on real
    val) next to real->real AUC, and the real classifier's AUC on the samples.

Outputs: ``OUT/bench_sample.md``, ``OUT/bench_sample.json``, ``OUT/samples_*.png`` contact sheets.

Examples::

    # the issue-3 numbers (after scripts/bench_train.py --out bench_out)
    python scripts/bench_sample.py --model bench_out/model --out bench_out

    # guidance sweep at DPM-Solver++ 20 steps
    python scripts/bench_sample.py --model bench_out/model --guidance-sweep 1,2,3,5 --skip-speed
    # guidance only in a band of noise levels (Kynkaenniemi et al. 2024), beside the default row
    python scripts/bench_sample.py --model bench_out/model --skip-speed --dpm-steps "" --no-ddpm --guidance-intervals 0.5:11,1:inf
    # guidance rescale (Lin et al. 2023) at guidance 2 and 4, beside the default row
    python scripts/bench_sample.py --model bench_out/model --skip-speed --dpm-steps "" --no-ddpm --guidance-rescales 2:0.7,4:0.7

    # issue 14: defaults vs the stock loop (speed) and vs DPM 20 fp32 (FD), one thread
    python scripts/bench_sample.py --model bench_out/model --out bench_out/i14 --threads 1 \\
        --speed-presets "" --no-memory --repeats 5 --dpm-steps 10,20 --no-ddpm \\
        --samplers dpm++2m-karras:10,dpm++2m-karras:10:fp32,unipc:10 --accuracy-images 32

    # smoke run: one thread, few images, no DDPM
    python scripts/bench_sample.py --model /tmp/bt/model --out /tmp/bs --threads 1 --images 16 \\
        --speed-images 4 --speed-steps 5 --dpm-steps 5 --no-ddpm --repeats 1 --speed-presets small:64
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # write nothing outside --out

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # scripts/ is on sys.path when run as a script

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_train import DEFAULT_DATA, LABEL_TEXT, peak_rss_mib  # noqa: E402

from generator.models.pipeline import PRECISIONS, cpu_has_bf16  # noqa: E402
from generator.models.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, make_sampler  # noqa: E402

#: Timed methods of the speed section (see the module docstring).
METHODS = ("diffusers_loop", "radsynth_fp32", "radsynth_default_same_steps", "radsynth_default")


# ------------------------------------------------------------------------------------ helpers
def prompts_and_labels(n: int) -> tuple[list[str], np.ndarray]:
    """``n`` prompts alternating label 0 and 1 (any even prefix is class-balanced)."""
    labels = np.arange(n) % 2
    return [LABEL_TEXT[int(k)] for k in labels], labels


def bf16_supported() -> bool:
    """Whether the CPU computes bfloat16 natively (AMX-BF16/AVX-512-BF16; see ``cpu_has_bf16``)."""
    return cpu_has_bf16()


def method_settings(method: str, speed_steps: int) -> tuple[str, int, str]:
    """``(sampler, steps, precision)`` of a RadSynth method of :data:`METHODS`."""
    return {
        "radsynth_fp32": ("dpm", speed_steps, "fp32"),
        "radsynth_default_same_steps": (str(DEFAULT_SAMPLER), speed_steps, "auto"),
        "radsynth_default": (str(DEFAULT_SAMPLER), DEFAULT_STEPS, "auto"),
    }[method]


def build_pipeline(spec: str) -> Any:
    """``"model:PATH"`` loads a model folder; ``"random:PRESET:RES:LATENT"`` builds random networks."""
    from generator.models.model_folder import load_pipeline

    kind, _, rest = spec.partition(":")
    if kind == "model":
        pipe, _ = load_pipeline(rest, device="cpu", half=False)
        return pipe
    from conditioning.text_encoder import hidden_size, load_text_encoder
    from generator.models.config import get_preset
    from generator.models.build import build_noise_scheduler, build_unet, build_vae
    from generator.models.pipeline import RadSynthPipeline

    preset, res, latent = rest.split(":")
    cfg = get_preset(preset, latent_size=int(latent))
    tokenizer, text_encoder = load_text_encoder(None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = build_vae(cfg, int(res)).eval()
        unet = build_unet(cfg, hidden_size(text_encoder)).eval()
    pipe = RadSynthPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                            scheduler=make_sampler("dpm", build_noise_scheduler(cfg)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def stock_diffusers_loop(
    pipe: Any, prompts: list[str], seeds: list[int], steps: int, guidance: float
) -> np.ndarray:
    """The text-to-image loop of the diffusers documentation, over the pipeline's own components.

    Only ``pipe.vae``, ``pipe.unet``, ``pipe.text_encoder``, ``pipe.tokenizer`` and the scheduler's
    config are used. Prompts are padded to the same length as RadSynth pads them (48 tokens for
    MiniLM), so both paths compute the same images.

    Returns:
        ``(B, H, W)`` float32 in ``[0, 1]``.
    """
    from diffusers import DPMSolverMultistepScheduler

    from conditioning.attributes import prompt_vectors
    from conditioning.text_encoder import max_length
    from generator.models.build import takes_attributes

    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

    def embed(texts: list[str]) -> torch.Tensor:
        tok = tokenizer(texts, padding="max_length", max_length=max_length(tokenizer), truncation=True,
                        return_tensors="pt")
        return text_encoder(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state

    context = torch.cat([embed([""] * len(prompts)), embed(prompts)])
    labels = torch.from_numpy(prompt_vectors([""] * len(prompts) + list(prompts))) if takes_attributes(unet) else None
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    latents = latents * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = unet(model_in, t, encoder_hidden_states=context, class_labels=labels).sample
        uncond, cond = noise_pred.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return ((image / 2 + 0.5).clamp(0, 1))[:, 0].float().numpy()


def run_method(pipe: Any, method: str, prompts: list[str], seeds: list[int], steps: int,
               guidance: float, base_scheduler: Any = None) -> np.ndarray:
    """Images ``(B, H, W)`` in ``[0, 1]`` by one of :data:`METHODS` (``steps``: the stock loop's).

    RadSynth methods set ``pipe.scheduler`` to their sampler, built from ``base_scheduler`` (default:
    the pipeline's current scheduler); the stock loop builds its own from the scheduler's config.
    """
    if method == "diffusers_loop":
        if base_scheduler is not None:
            pipe.scheduler = base_scheduler  # the stock loop copies the model's DPM-Solver++ config
        return stock_diffusers_loop(pipe, prompts, seeds, steps, guidance)
    sampler, n_steps, precision = method_settings(method, steps)
    pipe.scheduler = make_sampler(sampler, base_scheduler or pipe.scheduler)
    return pipe(prompts, seeds=seeds, num_inference_steps=n_steps, guidance_scale=guidance,
                precision=precision).images


def _memory_probe(spec: str, method: str, n: int, steps: int, guidance: float, threads: int | None,
                  queue: Any) -> None:
    """Subprocess body: build the pipeline, run one batch, report maxrss before and after."""
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        pipe = build_pipeline(spec)
        pipe.scheduler = make_sampler("dpm", pipe.scheduler)
        prompts, _ = prompts_and_labels(n)
        load_peak = peak_rss_mib()
        reset = _reset_peak_rss()
        before = _proc_status_mib("VmRSS")
        run_method(pipe, method, prompts, list(range(n)), steps, guidance)
        out = {"peak_rss_mib": peak_rss_mib(), "peak_rss_after_load_mib": load_peak}
        if reset and before is not None:
            hwm = _proc_status_mib("VmHWM")
            out.update(rss_before_sampling_mib=before, peak_rss_sampling_mib=hwm,
                       sampling_increment_mib=None if hwm is None else hwm - before)
        queue.put(out)
    except Exception as exc:  # noqa: BLE001
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _proc_status_mib(key: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MiB (Linux), else ``None``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory(spec: str, method: str, n: int, steps: int, guidance: float,
                   threads: int | None) -> dict[str, Any]:
    """Peak RSS of one sampling batch in a fresh (spawned) process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_memory_probe, args=(spec, method, n, steps, guidance, threads, q))
    proc.start()
    try:
        out = q.get(timeout=3600)
    finally:
        proc.join()
    return out


def say(msg: str) -> None:
    print(f"[bench_sample] {msg}", flush=True)


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# ------------------------------------------------------------------------------------ (a) speed
def speed_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs = [("trained model", f"model:{args.model}")]
    for item in args.speed_presets:
        preset, _, res = item.partition(":")
        specs.append((f"{preset} preset @ {res} px (random weights)",
                      f"random:{preset}:{res}:{args.speed_latent}"))
    methods = list(METHODS)
    prompts, _ = prompts_and_labels(args.speed_images)
    seeds = list(range(args.speed_images))
    rows = []
    for name, spec in specs:
        say(f"speed: {name}")
        pipe = build_pipeline(spec)
        pipe.scheduler = base = make_sampler("dpm", pipe.scheduler)  # the stock loop's scheduler
        row: dict[str, Any] = {
            "model": name, "spec": spec, "resolution": int(pipe.resolution),
            "latent": [int(pipe.unet.config.in_channels), int(pipe.unet.config.sample_size),
                       int(pipe.unet.config.sample_size)],
            "unet_params_m": params_m(pipe.unet), "vae_params_m": params_m(pipe.vae),
            "images": args.speed_images, "steps": args.speed_steps, "guidance": args.guidance_scale,
            "times_s": {m: [] for m in methods}, "cpu_times_s": {m: [] for m in methods},
            "settings": {m: dict(zip(("sampler", "steps", "precision"),
                                     ("dpm (stock loop)", args.speed_steps, "fp32") if m == "diffusers_loop"
                                     else method_settings(m, args.speed_steps))) for m in methods},
        }
        for m in methods:  # warm-up (one-off allocations, oneDNN kernel selection)
            run_method(pipe, m, prompts[:2], seeds[:2], 2, args.guidance_scale, base)
        outputs: dict[str, np.ndarray] = {}
        for r in range(args.repeats):
            for m in methods:
                t0, c0 = time.perf_counter(), time.process_time()
                out = run_method(pipe, m, prompts, seeds, args.speed_steps, args.guidance_scale, base)
                row["times_s"][m].append(time.perf_counter() - t0)
                row["cpu_times_s"][m].append(time.process_time() - c0)
                outputs.setdefault(m, out)
            say(f"  round {r + 1}/{args.repeats}: " + ", ".join(
                f"{m} {row['times_s'][m][-1]:.2f}s (CPU {row['cpu_times_s'][m][-1]:.2f}s)" for m in methods))
        row["images_per_s"] = {m: args.speed_images / statistics.median(v) for m, v in row["times_s"].items()}
        # Images per CPU-second of this process: on a shared machine (other jobs taking cores) far
        # steadier than wall-clock rates; equal to them when the threads have their cores to themselves.
        row["images_per_cpu_s"] = {m: args.speed_images / statistics.median(v)
                                   for m, v in row["cpu_times_s"].items()}
        loop = row["images_per_s"]["diffusers_loop"]
        row["ratio_over_diffusers_loop"] = {m: v / loop for m, v in row["images_per_s"].items()}
        loop_cpu = row["images_per_cpu_s"]["diffusers_loop"]
        row["cpu_ratio_over_diffusers_loop"] = {m: v / loop_cpu for m, v in row["images_per_cpu_s"].items()}
        row["max_abs_diff_radsynth_fp32_vs_diffusers"] = float(
            np.max(np.abs(outputs["radsynth_fp32"] - outputs["diffusers_loop"])))
        row["mean_abs_diff_default_same_steps_vs_fp32"] = float(
            np.mean(np.abs(outputs["radsynth_default_same_steps"] - outputs["radsynth_fp32"])))
        row["image_stats"] = {m: {"mean": float(o.mean()), "std": float(o.std())} for m, o in outputs.items()}
        del pipe
        if not args.no_memory:
            row["memory"] = {}
            for m in methods:
                say(f"  memory probe: {m}")
                row["memory"][m] = measure_memory(spec, m, args.speed_images, args.speed_steps,
                                                  args.guidance_scale, args.threads)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ (b) quality
def generate(pipe: Any, n: int, steps: int, guidance: float, precision: str, batch_size: int,
             seed: int, label: str, interval: tuple[float, float] | None = None,
             rescale: float = 0.0) -> tuple[np.ndarray, np.ndarray, float]:
    """``n`` class-balanced samples (prompt ``i`` = label ``i % 2``, seed ``seed + i``); ``interval`` and
    ``rescale``: the pipeline's ``guidance_interval`` and ``guidance_rescale``."""
    prompts, labels = prompts_and_labels(n)
    out = []
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        out.append(pipe(prompts[i : i + batch_size], seeds=list(range(seed + i, seed + min(n, i + batch_size))),
                        num_inference_steps=steps, guidance_scale=guidance, precision=precision,
                        guidance_interval=interval, guidance_rescale=rescale).images)
        say(f"  {label}: {min(n, i + batch_size)}/{n} images ({time.perf_counter() - t0:.0f} s)")
    return np.concatenate(out), labels, time.perf_counter() - t0


@torch.no_grad()
def vae_round_trip(vae: Any, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """``(N, H, W)`` images in ``[0, 1]`` encoded and decoded by ``vae`` (posterior mean, in the VAE's dtype;
    an RGB VAE sees gray as RGB and its output is averaged back), in ``[0, 1]``."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch], dtype=np.float32))[:, None] * 2 - 1
        x = x.to(vae.device, vae.dtype)
        if int(vae.config.in_channels) != 1:
            x = x.expand(-1, int(vae.config.in_channels), -1, -1)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().mean(1).clamp(-1, 1)
        out.append(((y + 1) / 2).cpu().numpy())
    return np.concatenate(out)


def contact_sheet(images: np.ndarray, labels: np.ndarray, path: Path, per_class: int = 8) -> None:
    """Rows: label 0 then label 1, ``per_class`` images each."""
    from PIL import Image

    rows = []
    for k in (0, 1):
        sel = images[labels == k][:per_class]
        if len(sel) == 0:
            continue
        pad = per_class - len(sel)
        if pad:
            sel = np.concatenate([sel, np.zeros((pad, *sel.shape[1:]), sel.dtype)])
        rows.append(np.concatenate(list(sel), axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)).save(path)


def quality_section(args: argparse.Namespace) -> dict[str, Any]:
    from generator.evaluation import frechet_distance, roc_auc, synthetic_to_real_auc, train_classifier
    from generator.data import load_dataset
    from generator.models.model_folder import load_pipeline

    pipe, info = load_pipeline(args.model, device="cpu", half=False)
    res = int(info.resolution)
    say(f"quality: loading real data at the model's {res} px")
    train = load_dataset(args.data, resolution=res, label_text=LABEL_TEXT, npz_split="train", progress=False)
    val = load_dataset(args.data, resolution=res, label_text=LABEL_TEXT, npz_split="val", progress=False)
    xt, yt = train.stack(), np.array([r.attributes["label"] for r in train.records])
    xv, yv = val.stack(), np.array([r.attributes["label"] for r in val.records])
    clf_kw = {"epochs": args.clf_epochs, "threads": args.threads}
    t0 = time.perf_counter()
    clf = train_classifier(xt, yt, seed=args.seed, **clf_kw)
    say(f"  feature classifier trained on {len(xt)} real images in {time.perf_counter() - t0:.0f} s")
    ft, fv = clf.features(xt), clf.features(xv)
    auc_real_all = roc_auc(yv, clf.predict_proba(xv))

    n_main = args.images
    n_ddpm = min(args.ddpm_images, n_main)
    sizes = sorted({n_main, n_ddpm})
    rng = np.random.default_rng(args.seed)
    reference: dict[str, Any] = {}
    for n in sizes:
        fds, aucs = [], []
        for k in range(args.reference_draws):
            sub = np.concatenate([rng.choice(np.flatnonzero(yt == c), n // 2, replace=False) for c in (0, 1)])
            fds.append(frechet_distance(ft[sub], fv))
            if k == 0:  # real->real AUC at the same training-set size as the synthetic runs
                aucs.append(synthetic_to_real_auc(xt[sub], yt[sub], xv, yv, seed=args.seed, **clf_kw))
        reference[str(n)] = {"fd_mean": float(np.mean(fds)), "fd_sd": float(np.std(fds)),
                             "auc_real_to_real_same_n": aucs[0]}
    say("  real-vs-real reference: " + ", ".join(f"N={n}: FD {reference[str(n)]['fd_mean']:.4f}" for n in sizes))
    # The VAE's share of the distance: real training images encoded and decoded (posterior mean), no UNet.
    sub = np.concatenate([np.random.default_rng(args.seed).choice(np.flatnonzero(yt == c), n_main // 2,
                                                                  replace=False) for c in (0, 1)])
    round_trip = vae_round_trip(pipe.vae, xt[sub])
    vae_row = {"n": int(len(sub)), "fd": frechet_distance(clf.features(round_trip), fv),
               "mae": float(np.abs(round_trip - xt[sub]).mean())}
    say(f"  VAE round trip of {len(sub)} real training images: FD {vae_row['fd']:.4f}, MAE {vae_row['mae']:.4f}")

    base_sched = pipe.scheduler
    reference_images = None
    if args.accuracy_images:
        # Solver accuracy: the same prompts and seeds solved finely (DPM-Solver++, float32); each row's
        # first images are compared with these. Independent of how well the model is trained.
        k = min(args.accuracy_images, n_main)
        pipe.scheduler = make_sampler("dpm", base_sched)
        say(f"quality: reference solutions (dpm, {args.reference_steps} steps, fp32) for {k} images")
        reference_images, _, _ = generate(pipe, k, args.reference_steps, args.guidance_scale, "fp32",
                                          args.batch_size, args.seed, "reference")
    g0 = args.guidance_scale
    configs: list[dict[str, Any]] = [
        {"sampler": "dpm", "steps": s, "guidance": g0, "precision": "fp32", "n": n_main} for s in args.dpm_steps
    ]
    if bf16_supported() and not args.no_bf16 and args.bf16_steps in args.dpm_steps:
        configs.append({"sampler": "dpm", "steps": args.bf16_steps, "guidance": g0, "precision": "bf16",
                        "n": n_main})
    for name, steps, precision in args.samplers:
        configs.append({"sampler": name, "steps": steps, "guidance": g0,
                        "precision": pipe.resolve_precision(precision), "n": n_main,
                        "default": name == DEFAULT_SAMPLER and steps == DEFAULT_STEPS and precision == "auto"})
    if not args.no_ddpm:
        configs.append({"sampler": "ddpm", "steps": args.ddpm_steps, "guidance": g0, "precision": "fp32",
                        "n": n_ddpm})
    for lo, hi in args.guidance_intervals:
        configs.append({"sampler": DEFAULT_SAMPLER, "steps": DEFAULT_STEPS, "guidance": g0,
                        "precision": pipe.resolve_precision("auto"), "n": n_main, "interval": [lo, hi]})
    for g, phi in args.guidance_rescales:
        configs.append({"sampler": DEFAULT_SAMPLER, "steps": DEFAULT_STEPS, "guidance": g,
                        "precision": pipe.resolve_precision("auto"), "n": n_main, "rescale": phi})
    for g in args.guidance_sweep:
        if g != g0:
            configs.append({"sampler": "dpm", "steps": args.sweep_steps, "guidance": g, "precision": "fp32",
                            "n": n_main, "sweep": True})
    rows = []
    for c in configs:
        c["bf16"] = c["precision"] == "bf16"
        tag = f"{c['sampler']}{c['steps']}_g{c['guidance']:g}_{c['precision']}"
        if c.get("interval"):
            tag += "_interval{:g}-{:g}".format(*c["interval"])
        if c.get("rescale"):
            tag += f"_rescale{c['rescale']:g}"
        pipe.scheduler = make_sampler(c["sampler"], base_sched)
        say(f"quality: {tag} ({c['n']} images)")
        syn, labels, secs = generate(pipe, c["n"], c["steps"], c["guidance"], c["precision"], args.batch_size,
                                     args.seed, tag, interval=c.get("interval"), rescale=c.get("rescale", 0.0))
        fs = clf.features(syn)
        row = {**c, "tag": tag, "seconds": secs, "images_per_s": c["n"] / secs,
               "fd": {str(n): frechet_distance(fs[:n], fv) for n in sizes if n <= c["n"]},
               "auc_syn_to_real": synthetic_to_real_auc(syn, labels, xv, yv, seed=args.seed, **clf_kw),
               "auc_real_clf_on_syn": roc_auc(labels, clf.predict_proba(syn)),
               "pixel_mean": float(syn.mean()), "pixel_std": float(syn.std())}
        if reference_images is not None:
            row["mae_vs_reference"] = float(np.mean(np.abs(syn[: len(reference_images)] - reference_images)))
        contact_sheet(syn, labels, args.out / f"samples_{tag}.png")
        say(f"  FD {row['fd']}, syn->real AUC {row['auc_syn_to_real']:.3f}, "
            f"real clf on syn AUC {row['auc_real_clf_on_syn']:.3f}")
        rows.append(row)
    contact_sheet(xv, yv, args.out / "samples_real_val.png")
    return {
        "resolution": res, "num_train": len(xt), "num_val": len(xv),
        "classifier": {"epochs": args.clf_epochs, "size": clf.size, "feature_dim": clf.feature_dim,
                       "seed": args.seed},
        "auc_real_to_real": auc_real_all, "reference": reference, "sizes": sizes, "rows": rows,
        "vae_round_trip": vae_row,
        "real_pixel_mean": float(xv.mean()), "real_pixel_std": float(xv.std()),
    }


# ------------------------------------------------------------------------------------ report
def markdown(res: dict[str, Any]) -> str:
    out = [f"### Sampling benchmark ({res['threads']} torch threads, {res['platform']['cpu_capability']})", ""]
    if res.get("speed"):
        out += [
            f"Speed: {res['speed'][0]['images']} images per call (class-balanced prompts), guidance "
            f"{res['speed'][0]['guidance']:g}, median of {res['repeats']} alternating rounds. `diffusers_loop` = "
            f"the stock loop over the same components (DPM-Solver++ {res['speed'][0]['steps']} steps, fp32). "
            f"images/CPU-s: images per CPU-second of the process (steadier than wall-clock on a shared machine).",
            "",
            "| model | UNet M params | latent | method | sampler | steps | precision | images/s | "
            "vs diffusers loop | images/CPU-s | vs diffusers loop (CPU time) | "
            "peak RSS MiB (process) | RSS increase while sampling MiB |",
            "|---|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["speed"]:
            for m, ips in r["images_per_s"].items():
                probe = r.get("memory", {}).get(m, {})
                mem, inc = probe.get("peak_rss_mib"), probe.get("sampling_increment_mib")
                st = r["settings"][m]
                out.append(f"| {r['model']} ({r['resolution']} px) | {r['unet_params_m']:.1f} | "
                           f"{'x'.join(map(str, r['latent']))} | {m} | {st['sampler']} | {st['steps']} | "
                           f"{st['precision']} | {ips:.2f} | {r['ratio_over_diffusers_loop'][m]:.2f}x | "
                           f"{r['images_per_cpu_s'][m]:.2f} | {r['cpu_ratio_over_diffusers_loop'][m]:.2f}x | "
                           f"{'-' if mem is None else f'{mem:.0f}'} | {'-' if inc is None else f'{inc:.0f}'} |")
        out += ["", "| model | max abs diff radsynth_fp32 vs diffusers loop | mean abs diff default (same steps) "
                "vs fp32 | pixel mean/std per method |", "|---|---:|---:|---|"]
        for r in res["speed"]:
            st = r["image_stats"]
            out.append(
                f"| {r['model']} | {r['max_abs_diff_radsynth_fp32_vs_diffusers']:.2e} | "
                f"{r['mean_abs_diff_default_same_steps_vs_fp32']:.4f} | "
                + ", ".join(f"{m} {v['mean']:.3f}/{v['std']:.3f}" for m, v in st.items()) + " |")
        out.append("")
    q = res.get("quality")
    if q:
        sizes = q["sizes"]
        out += [
            f"Quality: Fréchet distance in the features of a CNN trained on the real training split "
            f"({q['num_train']} images, {q['classifier']['feature_dim']}-d; not FID) against the real "
            f"val split ({q['num_val']} images) at {q['resolution']} px. AUC columns: ROC AUC on real "
            f"val of a classifier trained on the samples (syn->real), and of the real-trained "
            f"classifier scoring the samples against their prompt labels.",
            "",
            "| images | sampler | steps | guidance | precision | " + " | ".join(f"FD (N={n})" for n in sizes)
            + " | syn->real AUC | real clf on syn AUC | images/s | pixel mean/std | MAE vs reference solution |",
            "|---|---|---:|---:|---|" + "---:|" * len(sizes) + "---:|---:|---:|---|---:|",
        ]
        for n in sizes:
            ref = q["reference"][str(n)]
            out.append(
                f"| real train subset (N={n}) | - | - | - | - | "
                + " | ".join(f"{ref['fd_mean']:.4f} ± {ref['fd_sd']:.4f}" if m == n else "" for m in sizes)
                + f" | {ref['auc_real_to_real_same_n']:.3f} (real->real) | - | - | - | - |")
        out.append(f"| real train (all {q['num_train']}) | - | - | - | - | " + " | ".join("" for _ in sizes)
                   + f" | {q['auc_real_to_real']:.3f} (real->real) | - | - | "
                   f"{q['real_pixel_mean']:.3f}/{q['real_pixel_std']:.3f} | - |")
        vr = q.get("vae_round_trip")
        if vr:
            out.append(f"| real train subset through the VAE (N={vr['n']}, MAE {vr['mae']:.4f}) | - | - | - | - | "
                       + " | ".join(f"{vr['fd']:.4f}" if m == vr["n"] else "" for m in sizes)
                       + " | - | - | - | - | - |")
        for r in q["rows"]:
            name = r["sampler"] + (" (RadSynth default)" if r.get("default") else "")
            if r.get("interval"):
                name += " guided at sigma in [{:g}, {:g}]".format(*r["interval"])
            if r.get("rescale"):
                name += f", guidance rescale {r['rescale']:g}"
            precision = r.get("precision", "bf16" if r.get("bf16") else "fp32")
            out.append(
                f"| synthetic (N={r['n']}) | {name} | {r['steps']} | {r['guidance']:g} | {precision} | "
                + " | ".join(f"{r['fd'][str(n)]:.4f}" if str(n) in r["fd"] else "-" for n in sizes)
                + f" | {r['auc_syn_to_real']:.3f} | {r['auc_real_clf_on_syn']:.3f} | {r['images_per_s']:.2f} | "
                f"{r['pixel_mean']:.3f}/{r['pixel_std']:.3f} | "
                + (f"{r['mae_vs_reference']:.4f}" if "mae_vs_reference" in r else "-") + " |")
        out.append("")
    return "\n".join(out) + "\n"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _pairs(text: str, form: str) -> list[tuple[float, float]]:
    """``"0.5:11,1:inf"`` -> ``[(0.5, 11.0), (1.0, inf)]``; ``form`` names the two numbers in errors."""
    out = []
    for item in (x for x in text.split(",") if x):
        a, sep, b = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"each item must look like {form}, got {item!r}")
        out.append((float(a), float(b)))
    return out


def _intervals(text: str) -> list[tuple[float, float]]:
    """``"0.5:11,1:inf"`` -> ``[(0.5, 11.0), (1.0, inf)]``."""
    return _pairs(text, "LO:HI")


def _rescales(text: str) -> list[tuple[float, float]]:
    """``"2:0.7,4:0.7"`` -> ``[(2.0, 0.7), (4.0, 0.7)]`` (guidance scale, guidance rescale)."""
    return _pairs(text, "GUIDANCE:RESCALE")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _sampler_specs(text: str) -> list[tuple[str, int, str]]:
    """``"dpm++2m-karras:10,unipc:10:fp32"`` -> ``[("dpm++2m-karras", 10, "auto"), ("unipc", 10, "fp32")]``."""
    from generator._utils import look_up_option
    from generator.models.samplers import Sampler

    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
            raise argparse.ArgumentTypeError(f"--samplers items are NAME:STEPS[:PRECISION], got {item!r}")
        try:
            name = str(look_up_option(parts[0], list(Sampler), name="sampler"))
            precision = str(look_up_option(parts[2] if len(parts) == 3 else "auto", PRECISIONS, name="precision"))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        out.append((name, int(parts[1]), precision))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_sample.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples::"):], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, default=Path("bench_out/model"),
                   help="model folder from bench_train.py (default bench_out/model)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PneumoniaMNIST .npz")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default bench_out)")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="classifier-free guidance (default 2)")
    p.add_argument("--guidance-sweep", type=_floats, default=[], metavar="G1,G2,...",
                   help="also score DPM-Solver++ --sweep-steps at these guidance scales")
    p.add_argument("--guidance-intervals", type=_intervals, default=[], metavar="LO:HI,...",
                   help="also score the default sampler with guidance only at noise levels sigma in [LO, HI] "
                        "(RadSynthPipeline guidance_interval), one row per interval")
    p.add_argument("--guidance-rescales", type=_rescales, default=[], metavar="G:PHI,...",
                   help="also score the default sampler at guidance G with guidance rescale PHI "
                        "(RadSynthPipeline guidance_rescale, Lin et al. 2023), one row per pair")
    p.add_argument("--sweep-steps", type=int, default=20, help="steps of the guidance sweep (default 20)")
    p.add_argument("--seed", type=int, default=0, help="base seed of samples and classifiers")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    g = p.add_argument_group("speed")
    g.add_argument("--skip-speed", action="store_true")
    g.add_argument("--speed-images", type=int, default=8, help="images per timed call (default 8)")
    g.add_argument("--speed-steps", type=int, default=20, help="DPM-Solver++ steps (default 20)")
    g.add_argument("--speed-presets", type=lambda s: [x for x in s.split(",") if x], default=["small:64", "base:64"],
                   metavar="PRESET:RES,...", help="random-weight models to time (default small:64,base:64)")
    g.add_argument("--speed-latent", type=int, default=16, help="latent side of the random models (default 16)")
    g.add_argument("--repeats", type=int, default=3, help="alternating timing rounds (default 3)")
    g.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory subprocesses")
    g.add_argument("--no-bf16", action="store_true", help="skip the DPM-Solver++ bfloat16 quality row")
    q = p.add_argument_group("quality")
    q.add_argument("--skip-quality", action="store_true")
    q.add_argument("--images", type=int, default=270, help="samples per DPM-Solver++ setting (even; default 270)")
    q.add_argument("--dpm-steps", type=_ints, default=[10, 20, 50], metavar="S1,S2,...",
                   help="DPM-Solver++ step counts (default 10,20,50)")
    q.add_argument("--bf16-steps", type=int, default=20, help="DPM step count also scored under bf16 (default 20)")
    q.add_argument("--samplers", type=_sampler_specs, default=[(str(DEFAULT_SAMPLER), DEFAULT_STEPS, "auto")],
                   metavar="NAME:STEPS[:PRECISION],...",
                   help=f"more rows: sampler, steps, precision (default auto); default: RadSynth's defaults "
                        f"{DEFAULT_SAMPLER}:{DEFAULT_STEPS}:auto; '' for none")
    q.add_argument("--accuracy-images", type=int, default=0, metavar="K",
                   help="also solve the first K images with DPM-Solver++ at --reference-steps in float32 and "
                        "report each row's mean abs pixel difference to them (solver accuracy; default 0: off)")
    q.add_argument("--reference-steps", type=int, default=100, help="steps of the reference solutions (default 100)")
    q.add_argument("--no-ddpm", action="store_true", help="skip the DDPM row")
    q.add_argument("--ddpm-steps", type=int, default=1000)
    q.add_argument("--ddpm-images", type=int, default=64, help="samples for DDPM (even; default 64)")
    q.add_argument("--batch-size", type=int, default=32, help="images per pipeline call (default 32)")
    q.add_argument("--clf-epochs", type=int, default=10, help="epochs of every classifier (default 10)")
    q.add_argument("--reference-draws", type=int, default=5,
                   help="random real training subsets for the real-vs-real FD (default 5)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = build_parser().parse_args(argv)
    for name in ("images", "ddpm_images", "speed_images"):
        v = getattr(args, name)
        if v < 2 or v % 2:
            raise SystemExit(f"--{name.replace('_', '-')} must be an even number >= 2, got {v}")
    for name in ("repeats", "batch_size", "speed_steps", "clf_epochs", "reference_draws", "sweep_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.model / "model_index.json").is_file():
        raise SystemExit(f"--model {args.model} is not a model folder; run scripts/bench_train.py first")
    if not args.skip_quality and not args.data.is_file():
        raise SystemExit(f"--data {args.data} not found")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "benchmark": "bench_sample", "model": str(args.model), "threads": torch.get_num_threads(),
        "repeats": args.repeats, "guidance_scale": args.guidance_scale, "seed": args.seed,
        "bf16_supported": bf16_supported(), "label_text": {str(k): v for k, v in LABEL_TEXT.items()},
        "platform": {"python": platform.python_version(), "torch": torch.__version__,
                     "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
                     "machine": platform.machine()},
    }
    if not args.skip_speed:
        res["speed"] = speed_section(args)
    if not args.skip_quality:
        res["quality"] = quality_section(args)
    res["wall_s"] = time.perf_counter() - t0
    res["peak_rss_mib_main_process"] = peak_rss_mib()
    md = markdown(res)
    (args.out / "bench_sample.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "bench_sample.md").write_text(md)
    print(md)
    say(f"wrote {args.out / 'bench_sample.md'} and {args.out / 'bench_sample.json'} in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
