#!/usr/bin/env python
"""CUDA check of the precision paths (issue 9): train with mixed precision, sample in fp16 and bf16.

On a machine with a CUDA device, in a temporary folder (or ``--workdir``):

1. Writes a 24-image imagefolder (bright squares / dark fields, 32 px) and a tiny random BERT text
   encoder (no download).
2. Trains the ``tiny`` preset for ``--steps`` (20) steps per stage through ``python -m radsynth train``
   once with ``--mixed-precision bf16`` (skipped where the GPU has no bfloat16) and once with
   ``--mixed-precision fp16``; checks the exit code, the recorded mixed precision and finite losses.
3. Samples each model on the GPU: the float32 pipeline (``half=False``) at ``precision="fp32"`` is the
   reference; the same pipeline at ``fp16`` and ``bf16``, and the float16 pipeline that
   ``load_pipeline`` gives on CUDA by default at ``auto``, ``fp16`` and ``bf16``, must give finite images
   within ``--max-mean-diff`` (mean) and ``--max-diff`` (max) of the reference in ``[0, 1]``.
   The float16 VAE's decode (float32 through ``force_upcast``) is compared with the float32 VAE's.
4. Measures peak GPU memory of decoding 8 latents of a randomly initialised ``cxr512`` VAE
   (512 px, float16 weights): whole batch, sliced, sliced + tiled (information, not a check).

Prints one JSON summary on stdout. Exit status: 0 when every check passed or when there is no CUDA
device (the summary then says so and nothing is run), 1 when a check failed. Takes well under 3
minutes on one GPU (two 20-step trainings of a few-thousand-parameter model dominate).

Example::

    python scripts/check_cuda.py                 # summary on stdout
    python scripts/check_cuda.py --workdir /tmp/cuda_check --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PROMPTS = ["bright square", "dark field", "bright square", "dark field"]
SEEDS = [0, 1, 2, 3]
RESOLUTION = 32  # tiny preset: 8x8 latents, f=4


def make_square_folder(folder: Path, n: int = 24, size: int = RESOLUTION, seed: int = 0) -> Path:
    """An imagefolder of 8-bit PNGs: odd images a bright square ("bright square"), even ones dark."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        im = np.full((size, size), 20, np.int32)
        if i % 2:
            im[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 220
        im = np.clip(im + rng.integers(0, 20, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(im).save(folder / f"img{i:03d}.png")
        text = "bright square" if i % 2 else "dark field"
        lines.append(json.dumps({"file_name": f"img{i:03d}.png", "text": text, "patient_id": f"P{i // 2}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def make_tiny_text_encoder(folder: Path) -> Path:
    """A random 1-layer BERT (hidden size 16) with the prompts' words, saved for ``from_pretrained``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = "bright square dark field frontal chest radiograph".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=32)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def train(data: Path, encoder: Path, out: Path, mixed_precision: str, steps: int) -> dict[str, Any]:
    """Run ``python -m radsynth train`` and summarise it (``ok``: exit 0, precision kept, finite losses)."""
    cmd = [sys.executable, "-m", "radsynth", "train", "--data", str(data), "--output", str(out),
           "--preset", "tiny", "--resolution", str(RESOLUTION), "--max-steps", str(steps),
           "--mixed-precision", mixed_precision, "--text-encoder", str(encoder), "--quiet", "--overwrite"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    res: dict[str, Any] = {"returncode": proc.returncode, "seconds": round(time.monotonic() - t0, 1)}
    if proc.returncode != 0:
        res.update(ok=False, stderr_tail=proc.stderr[-2000:])
        return res
    info = json.loads((out / "radsynth.json").read_text())
    training = info.get("training", {})
    losses = training.get("final_loss", {})
    res.update(mixed_precision=training.get("mixed_precision"), final_loss=losses, steps=training.get("steps"))
    res["ok"] = (training.get("mixed_precision") == mixed_precision and bool(losses)
                 and all(isinstance(v, (int, float)) and np.isfinite(v) for v in losses.values()))
    return res


def compare(images: np.ndarray, reference: np.ndarray, max_mean: float, max_abs: float) -> dict[str, Any]:
    finite = bool(np.isfinite(images).all())
    diff = np.abs(images.astype(np.float64) - reference.astype(np.float64)) if finite else None
    out = {"finite": finite,
           "mean_abs_diff": None if diff is None else float(diff.mean()),
           "max_abs_diff": None if diff is None else float(diff.max())}
    out["ok"] = finite and out["mean_abs_diff"] <= max_mean and out["max_abs_diff"] <= max_abs
    return out


def low_precisions(device: str) -> list[str]:
    """The reduced sampling precisions to check on ``device`` (fp16 needs CUDA)."""
    import torch

    from generator.models.pipeline import cpu_has_bf16

    if device == "cuda":
        return ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return ["bf16"] if cpu_has_bf16() else []


def sample_checks(model: Path, steps: int, max_mean: float, max_abs: float, device: str = "cuda") -> dict[str, Any]:
    """Sampling in fp16/bf16 against the float32 reference, on the float32 and the float16 pipeline."""
    import torch

    from generator.models.model_folder import load_pipeline

    low = low_precisions(device)
    kw = {"seeds": SEEDS, "num_inference_steps": steps}
    full, _ = load_pipeline(model, device=device, half=False)
    ref = full(PROMPTS, precision="fp32", **kw)
    res: dict[str, Any] = {"reference": {"finite": bool(np.isfinite(ref.images).all()),
                                         "mean": float(ref.images.mean()), "std": float(ref.images.std())}}
    for precision in low:
        out = full(PROMPTS, precision=precision, **kw)
        res[f"fp32_weights/{precision}"] = {"resolved": out.precision,
                                            **compare(out.images, ref.images, max_mean, max_abs)}
    half, _ = load_pipeline(model, device=device, half=True)  # the CUDA default: float16 weights
    res["half_pipeline_dtypes"] = {"unet": str(half.unet.dtype), "vae": str(half.vae.dtype),
                                   "vae_force_upcast": bool(getattr(half.vae.config, "force_upcast", False))}
    for precision in (["auto"] if device == "cuda" else []) + low:
        out = half(PROMPTS, precision=precision, **kw)
        res[f"fp16_weights/{precision}"] = {"resolved": out.precision,
                                            **compare(out.images, ref.images, max_mean, max_abs)}
    # The float16 VAE decodes in float32 (force_upcast) and so matches the float32 VAE closely.
    z = full(PROMPTS, precision="fp32", output_type="latent", **kw).images.to(device)
    a = half.decode_latents(z)[:, 0].float().cpu().numpy()
    b = full.decode_latents(z)[:, 0].float().cpu().numpy()
    res["vae_decode_fp16_weights_vs_fp32"] = {**compare(a, b, 0.01, 0.05), "vae_dtype_after": str(half.vae.dtype)}
    res["vae_decode_fp16_weights_vs_fp32"]["ok"] &= half.vae.dtype == torch.float16
    return res


def decode_memory() -> dict[str, Any]:
    """Peak GPU memory (MiB) and time of decoding 8 latents of a random cxr512 VAE (float16 weights)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from generator.models.build import build_noise_scheduler, build_unet, build_vae
    from generator.models.config import get_preset
    from generator.models.pipeline import RadSynthPipeline
    from generator.models.samplers import make_sampler

    cfg = get_preset("cxr512")
    torch.manual_seed(0)
    vae = build_vae(cfg, 512).eval()
    torch.nn.Module.to(vae, "cuda", torch.float16)  # as load_pipeline(half=True) gives; force_upcast=True
    unet = build_unet(get_preset("tiny", latent_size=64), 16).eval()  # only for the pipeline's shapes
    encoder_dir = Path(tempfile.mkdtemp())
    try:
        make_tiny_text_encoder(encoder_dir)
        pipe = RadSynthPipeline(vae=vae, unet=unet.to("cuda"), text_encoder=AutoModel.from_pretrained(encoder_dir),
                                tokenizer=AutoTokenizer.from_pretrained(encoder_dir),
                                scheduler=make_sampler("dpm", build_noise_scheduler(cfg)))
    finally:
        shutil.rmtree(encoder_dir, ignore_errors=True)
    z = torch.randn(8, 4, 64, 64, device="cuda")
    out: dict[str, Any] = {}
    images = {}
    for name, kw in {"whole": {"vae_slicing": False, "vae_tiling": False},
                     "sliced": {"vae_slicing": True, "vae_tiling": False},
                     "sliced_tiled_32": {"vae_slicing": True, "vae_tiling": True, "vae_tile_size": 32}}.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.monotonic()
        try:
            images[name] = pipe.decode_latents(z, **kw).float()
            torch.cuda.synchronize()
            out[name] = {"peak_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20),
                         "seconds": round(time.monotonic() - t0, 2),
                         "finite": bool(torch.isfinite(images[name]).all())}
        except torch.cuda.OutOfMemoryError as exc:  # information only
            out[name] = {"error": str(exc).splitlines()[0]}
    if "whole" in images and "sliced" in images:
        out["sliced_vs_whole_max_abs_diff"] = float((images["sliced"] - images["whole"]).abs().max())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="folder for data and models (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep --workdir afterwards")
    p.add_argument("--steps", type=int, default=20, help="training steps per stage (default 20)")
    p.add_argument("--sample-steps", type=int, default=10, help="sampler steps (default 10)")
    p.add_argument("--max-mean-diff", type=float, default=0.02,
                   help="largest mean |fp16/bf16 - fp32| pixel difference in [0, 1] (default 0.02)")
    p.add_argument("--max-diff", type=float, default=0.3,
                   help="largest max |fp16/bf16 - fp32| pixel difference in [0, 1] (default 0.3)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="exercise the script on the CPU (bf16 training and sampling only, no fp16, no GPU "
                        "memory); for testing the script itself where there is no GPU")
    args = p.parse_args(argv)

    import torch

    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "ok": True,
                          "message": "no CUDA device: nothing checked (run this on a machine with a GPU)"}))
        return 0
    t_start = time.monotonic()
    from generator.models.pipeline import cpu_has_bf16

    cuda = device == "cuda"
    summary: dict[str, Any] = {"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
                               "torch": torch.__version__,
                               "bf16_supported": bool(torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16())}
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="radsynth_cuda_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = make_square_folder(work / "data")
        encoder = make_tiny_text_encoder(work / "text_encoder")
        checks: dict[str, bool] = {}
        for mp in ("bf16", "fp16"):
            if mp == "bf16" and not summary["bf16_supported"]:
                summary[f"train_{mp}"] = {"skipped": f"{summary['device']} has no bfloat16"}
                continue
            if mp == "fp16" and not cuda:
                summary[f"train_{mp}"] = {"skipped": "fp16 mixed precision needs CUDA"}
                continue
            model = work / f"model_{mp}"
            summary[f"train_{mp}"] = res = train(data, encoder, model, mp, args.steps)
            checks[f"train_{mp}"] = res["ok"]
            if res["ok"]:
                summary[f"sample_{mp}_model"] = s = sample_checks(model, args.sample_steps, args.max_mean_diff,
                                                                   args.max_diff, device)
                checks[f"sample_{mp}_model/reference_finite"] = s["reference"]["finite"]
                for key, value in s.items():
                    if isinstance(value, dict) and "ok" in value:
                        checks[f"sample_{mp}_model/{key}"] = bool(value["ok"])
        try:
            if cuda:
                summary["decode_memory_cxr512_batch8"] = decode_memory()
        except Exception as exc:  # noqa: BLE001 - information only, never fails the check
            summary["decode_memory_cxr512_batch8"] = {"error": f"{type(exc).__name__}: {exc}"}
        summary["checks"] = checks
        summary["failed"] = sorted(k for k, v in checks.items() if not v)
        summary["ok"] = bool(checks) and not summary["failed"]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
