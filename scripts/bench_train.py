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


def markdown(res: dict[str, Any]) -> str:
    """The result as Markdown tables."""
    cfg = res["config"]
    lines = [
        f"### Training benchmark: preset `{cfg['preset']}`, {res['resolution']} px, "
        f"budget {res['minutes']} min, {res['threads']} torch threads",
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
    ]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--overwrite", action="store_true", help="replace OUT/model if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.minutes <= 0:
        raise SystemExit(f"--minutes must be > 0, got {args.minutes}")
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
                     step_hook=hook).run()
    peak = peak_rss_mib()
    train_wall = time.monotonic() - t_start

    print("[bench_train] scoring VAE reconstructions on the val split", flush=True)
    rec = reconstruction_metrics(model_dir, val.stack())
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
