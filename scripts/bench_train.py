#!/usr/bin/env python
"""Training benchmark (issue 2): ``radsynth train --preset small`` on PneumoniaMNIST under a CPU budget.

Trains a text-conditioned latent diffusion model on the PneumoniaMNIST training split
(``../shared/data/pneumoniamnist/pneumoniamnist_trainval.npz``, 2428 images, 28 px) with a wall-clock
budget, then reports per stage: steps/s and images/s (from the model's ``train_log.csv``: the rate of
the optimisation loop) and wall time (from ``radsynth.json``: the whole stage, including set-up and
latent scaling), peak resident memory (``getrusage`` maxrss: after the VAE stage and for the whole
run), and the VAE's reconstruction PSNR and SSIM (Gaussian 11x11, sigma 1.5) on the validation split
(270 images). Results go to ``OUT/bench_train.md`` and ``OUT/bench_train.json``; the trained model
stays in ``OUT/model`` for ``scripts/bench_sample.py``.

Resolution: the data is 28 px. The default 32 px is the smallest size above it that the ``small``
preset allows (``latent_size`` 16 times a power of two): a 2-block VAE with f=2 and 16x16x4 latents,
the recipe DESIGN.md §7 found to reach a Fréchet distance close to real data. 64 px (f=4, 3 VAE
blocks) upsamples 28 px data further and only adds VAE cost; pass ``--resolution 64`` to measure it.

Label texts: 0 -> "normal pediatric chest radiograph, clear lungs", 1 -> "pediatric chest radiograph,
pneumonia with airspace opacities" (distinct wording; no negated "no pneumonia", which a sentence
encoder reads as close to "pneumonia").

Examples::

    # the issue-2 numbers: small preset, 20 CPU-minutes (2 cores), 32 px
    python scripts/bench_train.py --minutes 20 --out bench_out

    # a 30-second smoke run with one thread and a tiny network
    python scripts/bench_train.py --minutes 0.5 --preset tiny --resolution 32 --threads 1 \\
        --out /tmp/bt --overwrite

    # override training options (TrainConfig fields, JSON values)
    python scripts/bench_train.py --set ema_decay=0.9995 --set prediction_type='"v_prediction"'

    # issue 14: bf16 against fp32 side by side, same seed and budget, one thread each; the two runs go
    # at the same time as two processes, so that both see the same load from the rest of the machine
    python scripts/bench_train.py --minutes 5 --threads 1 --mixed-precision no bf16 --out bench_mp

    # the same training steps (forward, backward, AdamW) in fp32 and bf16, alternating in one process,
    # so that a changing load on a shared machine hits both alike (no training run, no data needed)
    python scripts/bench_train.py --step-timing 8 --threads 1 --out bench_steps
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # write nothing outside --out

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_trainval.npz"

#: Prompt text of each PneumoniaMNIST label (also used by ``bench_sample.py``).
LABEL_TEXT: dict[int, str] = {
    0: "normal pediatric chest radiograph, clear lungs",
    1: "pediatric chest radiograph, pneumonia with airspace opacities",
}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["ema_decay=0.9995", "unet_channels=[32,64]"]`` -> dict (values parsed as JSON, else text).

    Raises:
        ValueError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set must look like KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def stage_rates(log_csv: Path) -> dict[str, dict[str, float]]:
    """Last logged rate per stage of a ``train_log.csv`` (rates are averaged from the stage start)."""
    rates: dict[str, dict[str, float]] = {}
    if not log_csv.is_file():
        return rates
    with open(log_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            rates[row["stage"]] = {
                "steps": int(row["step"]),
                "loss": float(row["loss"]),
                "steps_per_s": float(row["steps_per_s"]),
                "images_per_s": float(row["images_per_s"]),
            }
    return rates


def reconstruction_metrics(model_dir: Path, images: "Any", batch_size: int = 64) -> dict[str, float]:
    """VAE round trip (posterior mean, no sampling) of ``(N, R, R)`` images in ``[0, 1]``."""
    import numpy as np
    import torch

    from generator.evaluation import psnr, ssim
    from generator.models.model_folder import load_pipeline

    pipe, _ = load_pipeline(model_dir, device="cpu", half=False)
    vae = pipe.vae.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            x = torch.from_numpy(images[i : i + batch_size]).float().unsqueeze(1) * 2 - 1
            z = vae.encode(x).latent_dist.mean
            outs.append(((vae.decode(z).sample + 1) / 2).clamp(0, 1)[:, 0].numpy())
    rec = np.concatenate(outs)
    return {"psnr_db": psnr(images, rec), "ssim": ssim(images, rec),
            "mae": float(np.mean(np.abs(images - rec)))}


def val_denoising_loss(model_dir: Path, val: "Any", draws: int = 4, seed: int = 1234) -> float:
    """Held-out denoising loss of the saved (EMA) UNet: plain epsilon/v MSE on the val split.

    Each val image is encoded (posterior mean, scaled as in training) and noised ``draws`` times at
    timesteps and noise drawn from ``seed``; the prompt is the image's own text. The same draws are used
    for every model, so runs can be compared on one number (lower is better; fp32 evaluation).
    """
    import torch
    from diffusers import DDPMScheduler

    from conditioning.attributes import prompt_vectors
    from conditioning.text_encoder import encode_prompts
    from generator.models.build import takes_attributes
    from generator.models.model_folder import load_pipeline

    pipe, _ = load_pipeline(model_dir, device="cpu", half=False)
    vae, unet = pipe.vae.eval(), pipe.unet.eval()
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    texts = sorted({r.text for r in val.records})
    # as in training: hidden states stored in float16, used in float32
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, texts).to(torch.float16).float()
    text_idx = torch.tensor([texts.index(r.text) for r in val.records])
    labels = torch.from_numpy(prompt_vectors(texts)) if takes_attributes(unet) else None
    images = torch.from_numpy(val.stack()).float().unsqueeze(1) * 2 - 1
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, images.shape[0], 64):
            z0 = vae.encode(images[i : i + 64]).latent_dist.mean * vae.config.scaling_factor
            ctx = embeds[text_idx[i : i + 64]]
            for _ in range(draws):
                noise = torch.randn(z0.shape, generator=g)
                t = torch.randint(0, noise_sched.config.num_train_timesteps, (z0.shape[0],), generator=g)
                noisy = noise_sched.add_noise(z0, noise, t)
                target = noise if noise_sched.config.prediction_type == "epsilon" else \
                    noise_sched.get_velocity(z0, noise, t)
                lab = None if labels is None else labels[text_idx[i : i + 64]]
                pred = unet(noisy, t, encoder_hidden_states=ctx, class_labels=lab).sample
                total += float(((pred - target) ** 2).mean(dim=(1, 2, 3)).sum())
                count += z0.shape[0]
    return total / count


def markdown(res: dict[str, Any]) -> str:
    """The result as Markdown tables."""
    cfg = res["config"]
    lines = [
        f"### Training benchmark: preset `{cfg['preset']}`, {res['resolution']} px, "
        f"budget {res['minutes']} min, {res['threads']} torch threads, mixed precision "
        f"`{res['mixed_precision']}`",
        "",
        f"Data: PneumoniaMNIST train split ({res['num_train']} images, resized from 28 px to "
        f"{res['resolution']} px); VAE scored on the val split ({res['num_val']} images). "
        f"Latents {cfg['latent_channels']}x{cfg['latent_size']}x{cfg['latent_size']}; "
        f"VAE channels {res['vae_block_channels']}, UNet channels {cfg['unet_channels']}.",
        "",
        "| stage | steps | loop steps/s | loop images/s | stage wall s | final loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage in ("vae", "unet"):
        r = res["stages"].get(stage, {})
        lines.append(
            f"| {stage.upper()} | {r.get('steps', '-')} | {r.get('steps_per_s', float('nan')):.2f} | "
            f"{r.get('images_per_s', float('nan')):.1f} | {r.get('wall_s', float('nan')):.0f} | "
            f"{r.get('final_loss', float('nan')):.4f} |"
        )
    m, rec = res["memory"], res["reconstruction"]
    lines += [
        "",
        "| peak RSS after VAE stage | peak RSS whole run | total wall time |",
        "|---:|---:|---:|",
        f"| {m['peak_rss_after_vae_mib']:.0f} MiB | {m['peak_rss_mib']:.0f} MiB | {res['wall_s']:.0f} s |",
        "",
        "| VAE reconstruction (val) | PSNR dB | SSIM (Gaussian 11x11, sigma 1.5) | MAE |",
        "|---|---:|---:|---:|",
        f"| {res['num_val']} images, {res['resolution']} px | {rec['psnr_db']:.2f} | {rec['ssim']:.4f} | "
        f"{rec['mae']:.4f} |",
        "",
        f"Held-out denoising loss (EMA UNet, val split, 4 fixed noise draws per image, fp32): "
        f"{res['val_denoising_loss']:.4f}",
    ]
    return "\n".join(lines) + "\n"


def interleaved_step_timing(preset: str, resolution: int, blocks: int, steps_per_block: int = 3,
                            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Seconds per training step of the VAE and the UNet, fp32 against bf16 autocast, interleaved.

    Each block runs ``steps_per_block`` steps (forward, loss, backward, AdamW step) in fp32, then in
    bf16 with the plain (math) attention kernel (what the Trainer uses on a CPU), then in bf16 with
    PyTorch's default (flash) kernel; ``blocks`` such rounds. Returns median seconds per step and ratios.
    """
    import statistics
    from contextlib import nullcontext

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from conditioning.attributes import ATTRIBUTE_DIM
    from generator.models.build import build_unet, build_vae
    from generator.models.config import get_preset
    from generator._utils import bf16_supported

    cfg = get_preset(preset, **(overrides or {}))
    torch.manual_seed(0)
    vae, unet = build_vae(cfg, resolution), build_unet(cfg, 384)
    x = torch.rand(cfg.vae_batch_size, 1, resolution, resolution) * 2 - 1
    z = torch.randn(cfg.unet_batch_size, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    ctx = torch.randn(cfg.unet_batch_size, 48, 384)
    labels = torch.zeros(cfg.unet_batch_size, ATTRIBUTE_DIM) if cfg.attribute_conditioning else None
    t = torch.randint(0, 1000, (cfg.unet_batch_size,))
    opts = {"vae": torch.optim.AdamW(vae.parameters(), 1e-5), "unet": torch.optim.AdamW(unet.parameters(), 1e-5)}

    def step(stage: str, mode: str) -> None:
        bf16 = mode != "no"
        kernel = sdpa_kernel(SDPBackend.MATH) if mode == "bf16" else nullcontext()
        with kernel, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if stage == "vae":
                dist = vae.encode(x).latent_dist
                loss = (vae.decode(dist.sample()).sample.float() - x).abs().mean() + 1e-6 * dist.kl().float().mean()
            else:
                loss = (unet(z, t, encoder_hidden_states=ctx, class_labels=labels).sample.float() - z).pow(2).mean()
            loss.backward()
        opts[stage].step()
        opts[stage].zero_grad(set_to_none=True)

    modes = ("no", "bf16", "bf16-flash")
    times: dict[str, dict[str, list[float]]] = {s: {m: [] for m in modes} for s in ("vae", "unet")}
    for stage in ("vae", "unet"):
        for name in modes:
            step(stage, name)  # warm-up
        for _ in range(blocks):
            for name in modes:
                t0 = time.perf_counter()
                for _ in range(steps_per_block):
                    step(stage, name)
                times[stage][name].append((time.perf_counter() - t0) / steps_per_block)
    out: dict[str, Any] = {"preset": preset, "resolution": resolution, "blocks": blocks,
                           "steps_per_block": steps_per_block, "threads": torch.get_num_threads(),
                           "bf16_supported": bf16_supported(torch.device("cpu")), "stages": {}}
    for stage, d in times.items():
        med = {k: statistics.median(v) for k, v in d.items()}
        out["stages"][stage] = {"s_per_step_fp32": med["no"], "s_per_step_bf16": med["bf16"],
                                "s_per_step_bf16_flash": med["bf16-flash"], "speedup": med["no"] / med["bf16"],
                                "speedup_flash": med["no"] / med["bf16-flash"], "all": d}
    return out


def step_timing_markdown(r: dict[str, Any]) -> str:
    """Table of :func:`interleaved_step_timing`."""
    lines = [
        f"### Training step time, fp32 against bf16, interleaved: preset `{r['preset']}`, {r['resolution']} px, "
        f"{r['threads']} torch thread(s), {r['blocks']} blocks x {r['steps_per_block']} steps per precision "
        f"(median of blocks; CPU native bf16: {r['bf16_supported']})",
        "",
        "| stage | fp32 s/step | bf16 (math attention) s/step | speed-up | bf16 (default flash attention) "
        "s/step | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage, d in r["stages"].items():
        lines.append(f"| {stage.upper()} | {d['s_per_step_fp32']:.3f} | {d['s_per_step_bf16']:.3f} | "
                     f"{d['speedup']:.2f}x | {d['s_per_step_bf16_flash']:.3f} | {d['speedup_flash']:.2f}x |")
    return "\n".join(lines) + "\n"


def compare_markdown(results: dict[str, dict[str, Any]]) -> str:
    """Side-by-side table of runs that differ only in mixed precision."""
    first = next(iter(results.values()))
    lines = [
        f"### Mixed precision side by side: preset `{first['preset']}`, {first['resolution']} px, "
        f"{first['minutes']} min each, {first['threads']} torch thread(s) each, seed {first['seed']}, "
        "runs concurrent",
        "",
        "| mixed precision | VAE steps | VAE steps/s | VAE final loss | UNet steps | UNet steps/s | "
        "UNet final loss | val denoising loss | VAE PSNR dB | VAE SSIM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        v, u, rec = r["stages"]["vae"], r["stages"]["unet"], r["reconstruction"]
        lines.append(
            f"| {name} ({r['mixed_precision']}) | {v['steps']} | {v.get('steps_per_s', float('nan')):.2f} | "
            f"{v['final_loss']:.4f} | {u['steps']} | {u.get('steps_per_s', float('nan')):.2f} | "
            f"{u['final_loss']:.4f} | {r['val_denoising_loss']:.4f} | {rec['psnr_db']:.2f} | {rec['ssim']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def run_side_by_side(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run one benchmark process per ``--mixed-precision`` value at the same time, then compare."""
    import subprocess

    base = list(argv)
    # drop the --mixed-precision values and --out from the child command lines
    i = base.index("--mixed-precision")
    j = i + 1
    while j < len(base) and not base[j].startswith("--"):
        j += 1
    del base[i:j]
    if "--out" in base:
        k = base.index("--out")
        del base[k : k + 2]
    args.out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for mp in args.mixed_precision:
        cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--mixed-precision", mp,
               "--out", str(args.out / mp), "--quiet"]
        print("[bench_train] " + " ".join(cmd), flush=True)
        procs[mp] = subprocess.Popen(cmd)
    codes = {mp: p.wait() for mp, p in procs.items()}
    if any(codes.values()):
        print(f"[bench_train] a run failed: {codes}", file=sys.stderr)
        return 1
    results = {mp: json.loads((args.out / mp / "bench_train.json").read_text()) for mp in procs}
    md = compare_markdown(results)
    (args.out / "bench_precision.md").write_text(md)
    (args.out / "bench_precision.json").write_text(json.dumps(results, indent=2) + "\n")
    print(md)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_train.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples::"):],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PneumoniaMNIST .npz (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default bench_out)")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget of training (default 20)")
    p.add_argument("--max-steps", type=int, default=None, help="upper bound of steps per stage")
    p.add_argument("--preset", default="small", help="tiny | small | base (default small)")
    p.add_argument("--resolution", type=int, default=32,
                   help="image side; latent_size x a power of two (default 32: f=2 for the small preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig override, JSON value (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--mixed-precision", nargs="+", default=["auto"], choices=["no", "bf16", "fp16", "auto"],
                   metavar="{no,bf16,fp16,auto}",
                   help="Trainer mixed_precision (default auto, as radsynth train); several values run side by side as "
                        "concurrent processes into OUT/<value>/ and are compared in OUT/bench_precision.md")
    p.add_argument("--step-timing", type=int, default=None, metavar="BLOCKS",
                   help="only time training steps, fp32 and bf16 alternating in BLOCKS pairs of blocks "
                        "(writes OUT/bench_step_timing.md)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT/model if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not args.minutes > 0:
        raise SystemExit(f"--minutes must be > 0, got {args.minutes}")
    if args.step_timing is not None:
        import torch

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        res = interleaved_step_timing(args.preset, args.resolution, args.step_timing,
                                      overrides=parse_overrides(args.overrides))
        args.out.mkdir(parents=True, exist_ok=True)
        md = step_timing_markdown(res)
        (args.out / "bench_step_timing.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out / "bench_step_timing.md").write_text(md)
        print(md)
        return 0
    if len(args.mixed_precision) > 1:
        return run_side_by_side(args, argv)
    mixed_precision = args.mixed_precision[0]
    if not args.data.is_file():
        raise SystemExit(f"--data {args.data} not found (expected the PneumoniaMNIST .npz)")
    model_dir = args.out / "model"
    if model_dir.exists() and any(model_dir.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"{model_dir} exists: pass --overwrite to train again")
        shutil.rmtree(model_dir)

    import torch

    from generator.models.config import get_preset
    from generator.data import load_dataset
    from generator.training import Trainer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        config = get_preset(args.preset, **parse_overrides(args.overrides))
        vae_blocks = config.vae_block_channels(args.resolution)
    except ValueError as exc:
        raise SystemExit(f"bad configuration: {exc}") from None
    args.out.mkdir(parents=True, exist_ok=True)

    t_start = time.monotonic()
    print(f"[bench_train] loading {args.data} at {args.resolution} px", flush=True)
    train = load_dataset(args.data, resolution=args.resolution, label_text=LABEL_TEXT, npz_split="train",
                         progress=not args.quiet)
    val = load_dataset(args.data, resolution=args.resolution, label_text=LABEL_TEXT, npz_split="val",
                       progress=False)

    rss_after_vae: list[float] = []

    def hook(stage: str, step: int) -> None:
        if stage == "unet" and not rss_after_vae:
            rss_after_vae.append(peak_rss_mib())

    print(f"[bench_train] training preset {args.preset!r} for {args.minutes} min "
          f"({torch.get_num_threads()} torch threads)", flush=True)
    result = Trainer(train, model_dir, config, resolution=args.resolution, seed=args.seed,
                     max_minutes=args.minutes, max_steps=args.max_steps, progress=not args.quiet,
                     mixed_precision=mixed_precision, step_hook=hook).run()
    peak = peak_rss_mib()
    train_wall = time.monotonic() - t_start

    print("[bench_train] scoring VAE reconstructions on the val split", flush=True)
    rec = reconstruction_metrics(model_dir, val.stack())
    print("[bench_train] held-out denoising loss on the val split", flush=True)
    val_loss = val_denoising_loss(model_dir, val)
    info = json.loads((model_dir / "radsynth.json").read_text())
    rates = stage_rates(model_dir / "train_log.csv")
    stages = {}
    for stage in ("vae", "unet"):
        stages[stage] = {
            **rates.get(stage, {}),
            "steps": int(result.steps.get(stage, 0)),
            "wall_s": float(info["training"]["seconds"].get(stage, float("nan"))),
            "final_loss": float(result.final_loss.get(stage, float("nan"))),
        }
    res: dict[str, Any] = {
        "benchmark": "bench_train",
        "data": str(args.data),
        "model_dir": str(model_dir),
        "preset": args.preset,
        "config": config.to_dict(),
        "vae_block_channels": list(vae_blocks),
        "resolution": args.resolution,
        "minutes": args.minutes,
        "max_steps": args.max_steps,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "label_text": {str(k): v for k, v in LABEL_TEXT.items()},
        "num_train": len(train.records),
        "num_val": len(val.records),
        "stages": stages,
        "memory": {"peak_rss_after_vae_mib": rss_after_vae[0] if rss_after_vae else peak,
                   "peak_rss_mib": peak},
        "reconstruction": rec,
        "val_denoising_loss": val_loss,
        "mixed_precision": info["training"]["mixed_precision"],
        "wall_s": train_wall,
        "platform": {"python": platform.python_version(), "torch": torch.__version__,
                     "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
                     "machine": platform.machine()},
    }
    md = markdown(res)
    (args.out / "bench_train.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "bench_train.md").write_text(md)
    print(md)
    print(f"[bench_train] wrote {args.out / 'bench_train.md'}, {args.out / 'bench_train.json'}; model in {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
