"""Benchmark of the volume (3D) generator on AdrenalMNIST3D and a real CT round trip (issue 10).

What it measures, on the shared CPUs with pinned threads (stated in the output):

1. Training speed and peak RSS of :class:`generator.volumes.training.VolumeTrainer` (``small`` preset)
   at 32^3 under a CPU-minute budget, and (``--speed-64``) a short speed/RSS probe at 64^3; each in its
   own process so that its peak RSS is its own (it includes reading the 64^3 ``.npz``).
2. Sampling speed (volumes/s) of :class:`generator.volumes.pipeline.VolumePipeline`.
3. On the real validation split: a small 3D CNN trained on synthetic volumes only and scored on real
   validation volumes (ROC AUC), beside the same CNN trained on real training volumes; the Fréchet
   distance in that (real-trained) CNN's penultimate features, synthetic vs real-val beside
   real-train vs real-val at the same sample size. The same two measures for the real training volumes
   after a round trip through the model's VAE alone: the VAE's share of the gap (what a perfect UNet
   could reach with this VAE). The share of samples the memorization audit flags
   (:class:`privacy.volumes.VolumeIndex` of all training volumes, calibrated on a held-out fifth of them as
   ``radsynth index`` does without ``--holdout``), beside two controls audited the same way: the real
   validation volumes (never trained on: the chance rate) and VAE round trips of training volumes (near
   copies: the audit must flag them).
4. The real CT round trip of ``example_ct_sm.nii.gz``: NIfTI -> ingest (standard layout) -> NIfTI and
   DICOM series (exporters) -> ingest, checking affine/world positions, spacing and HU.

AdrenalMNIST3D carries no voxel spacing: the volumes are treated as 1 mm isotropic at 64^3 (2 mm at
32^3), which is an assumption, said so in the output. Labels -> text: 0 "adrenal gland, normal",
1 "adrenal gland, hyperplasia". The binary masks (0/255) are mapped to [0, 1] and, at 32^3, area-averaged.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_3d.py --train-minutes 10 --threads 1 --out /tmp/bench3d

float32 against bf16, contiguous against channels-last weights: training and sampling passes of the ``lean``
networks (5 alternating rounds; ``--step-precisions no`` on a CPU without native bfloat16)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_3d.py --threads 1 --preset lean --unet-batch-size 8 --step-timing 5

The ``lean`` recipe (docs/volumes.md, Benchmark; ``VolumeTrainConfig.for_preset("lean")`` in Python)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_3d.py --threads 1 --train-minutes 30 --vae-share 0.3 \
        --vae-steps 1500 --unet-steps 20000 --preset lean --vae-fg-weight 10 --prediction-type v_prediction \
        --snr-gamma 5 --unet-batch-size 8 --ema-decay 0.99 --mixed-precision bf16 --num-synthetic 600 \
        --balanced --sample-steps 20 --guidance 6

(the fifth-session recipe had ``--vae-share 0.25 --vae-steps 400 --unet-steps 3000`` in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from radsynth._args import oversample_term

DATA = Path("/work/shared/data/adrenalmnist3d/adrenalmnist3d_64_trainval.npz")
CT = Path("/work/shared/data/totalsegmentator_examples/example_ct_sm.nii.gz")
TEXTS = ("adrenal gland, normal", "adrenal gland, hyperplasia")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load(split: str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA) as d:
        x = d[f"{split}_images"]
        y = d[f"{split}_labels"][:, 0].astype(np.int64)
    f = 64 // resolution
    out = np.empty((x.shape[0], resolution, resolution, resolution), np.float32)
    for i in range(0, x.shape[0], 64):  # in chunks: peak memory stays near the uint8 array + the result
        c = x[i:i + 64].astype(np.float32) / 255.0
        if f > 1:
            c = c.reshape(len(c), resolution, f, resolution, f, resolution, f).mean(axis=(2, 4, 6))
        out[i:i + 64] = c
    return out, y


# ---------------------------------------------------------------------------------------------- training
def train_child(args: argparse.Namespace) -> None:
    """Runs in its own process: train, print one JSON line with speed and peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    from generator.volumes.models import get_volume_preset
    from generator.volumes.records import IntensityMapping
    from generator._utils import resolve_mixed_precision
    from generator.volumes.training import VolumeTrainConfig, VolumeTrainer, VolumeTrainingData

    x, y = _load("train", args.resolution)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    spacing = (64.0 / args.resolution,) * 3
    mapping = IntensityMapping(kind="npz_uint8", low=0.0, high=255.0, unit="", bits_stored=8, modality="OT")
    data = VolumeTrainingData(x, [TEXTS[int(v)] for v in y], spacing, mapping, fingerprint="adrenalmnist3d-train")
    cfg = VolumeTrainConfig(seed=0, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                            batch_size=args.batch_size, unet_batch_size=args.unet_batch_size,
                            max_minutes=args.train_minutes, vae_share=args.vae_share, checkpoint_every=50,
                            unet_lr=args.unet_lr, vae_lr=args.vae_lr, ema_decay=args.ema_decay,
                            vae_fg_weight=args.vae_fg_weight, snr_gamma=args.snr_gamma,
                            oversample=tuple(args.oversample),
                            mixed_precision=resolve_mixed_precision(args.mixed_precision, torch.device("cpu")))
    model_config = get_volume_preset(args.preset)
    if args.prediction_type:
        model_config = replace(model_config, prediction_type=args.prediction_type)
    if args.pooled_text:
        model_config = replace(model_config, pooled_text=True)
    stamps: dict[str, list[float]] = {"vae": [], "unet": []}
    t0 = time.monotonic()
    trainer = VolumeTrainer(data, args.model, model_config, cfg, progress=False)
    setup = time.monotonic() - t0
    res = trainer.run(callback=lambda stage, step, loss: stamps[stage].append(time.monotonic()))

    def rate(ts: list[float], per: int) -> float | None:
        if len(ts) < 3:
            return None
        return (len(ts) - 1) * per / (ts[-1] - ts[0])

    print(json.dumps({
        "resolution": args.resolution, "threads": args.threads, "setup_s": round(setup, 1),
        "vae_steps": res.vae_step, "unet_steps": res.unet_step, "train_s": round(res.seconds, 1),
        "vae_volumes_per_s": rate(stamps["vae"], cfg.batch_size),
        "unet_latents_per_s": rate(stamps["unet"], cfg.unet_batch_size),
        "vae_loss": res.vae_loss, "unet_loss": res.unet_loss, "peak_rss_mb": round(_rss_mb(), 1),
        "finished": res.finished, "mixed_precision": cfg.mixed_precision,
    }), flush=True)


def _precisions(value: str) -> list[str]:
    """``--step-precisions``: a comma-separated list of ``no`` / ``bf16``."""
    modes = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("no", "bf16")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"{(bad or [value])[0]!r} is not one of no, bf16")
    return modes


def step_timing(args: argparse.Namespace, rounds: int) -> dict:
    """Seconds per step of the preset's networks in each precision of ``--step-precisions`` and each
    weight layout (contiguous NCDHW, and channels-last NDHWC as :func:`generator.volumes.models.to_fast_layout`
    puts them on a CPU): a VAE training step (``--batch-size`` volumes of 32^3), a UNet training step
    (``--unet-batch-size`` latents, 12 text tokens), forward + backward on random inputs, and the sampling
    side: a UNet forward pass without gradients on twice as many latents (guided: conditional and null
    halves) and a VAE decoding of ``--unet-batch-size`` latents. The variants alternate in each of
    ``rounds`` rounds of 3 steps, so all see the same load. Median over rounds; same initial weights."""
    import copy

    import torch

    from generator._utils import training_autocast
    from generator.volumes.models import build_unet, build_vae, get_volume_preset, to_fast_layout

    torch.manual_seed(0)
    mc = get_volume_preset(args.preset)
    nets = {"contiguous": (build_vae(mc), build_unet(mc, 384))}
    nets["channels_last"] = tuple(to_fast_layout(copy.deepcopy(n), "cpu") for n in nets["contiguous"])
    x = torch.rand(args.batch_size, 1, 32, 32, 32) * 2 - 1
    z = torch.randn(args.unet_batch_size, *mc.latent_shape((32, 32, 32)))
    ctx, t = torch.randn(args.unet_batch_size, 12, 384), torch.randint(0, 1000, (args.unet_batch_size,))
    z2, ctx2, t2 = torch.cat([z, z]), torch.cat([ctx, ctx]), torch.cat([t, t])

    def vae_step(layout: str, mp: str) -> None:
        vae = nets[layout][0]
        with training_autocast(mp, torch.device("cpu")):
            mu, sigma = vae.encode(x)
            rec = vae.decode(mu + sigma * torch.randn_like(mu))
        (rec.float() - x).abs().mean().backward()

    def unet_step(layout: str, mp: str) -> None:
        with training_autocast(mp, torch.device("cpu")):
            pred = nets[layout][1](z, timesteps=t, context=ctx)
        (pred.float() - z).pow(2).mean().backward()

    @torch.no_grad()
    def unet_sample(layout: str, mp: str) -> None:
        with training_autocast(mp, torch.device("cpu")):
            nets[layout][1](z2, timesteps=t2, context=ctx2)

    @torch.no_grad()
    def vae_decode(layout: str, mp: str) -> None:
        with training_autocast(mp, torch.device("cpu")):
            nets[layout][0].decode(z)

    variants = [(layout, mp) for mp in args.step_precisions for layout in nets]
    out: dict = {"preset": args.preset, "rounds": rounds, "vae_batch": args.batch_size,
                 "unet_batch": args.unet_batch_size, "unet_sample_batch": 2 * args.unet_batch_size}
    for name, fn in (("vae_train", vae_step), ("unet_train", unet_step), ("unet_sample", unet_sample),
                     ("vae_decode", vae_decode)):
        times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
        for v in variants:
            fn(*v)  # warm-up
        for _ in range(rounds):
            for v in variants:
                t0 = time.perf_counter()
                for _ in range(3):
                    fn(*v)
                times[v].append((time.perf_counter() - t0) / 3)
        med = {f"{mp}/{layout}": float(np.median(ts)) for (layout, mp), ts in times.items()}
        base = med[f"{args.step_precisions[0]}/contiguous"]
        out[name] = {k: {"s": round(v, 4), "speedup": round(base / v, 2)} for k, v in med.items()}
    return out


def run_train(args: argparse.Namespace, resolution: int, model: Path, minutes: float, vae_steps: int,
              unet_steps: int, limit: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child-train", "--resolution", str(resolution), "--model", str(model),
           "--train-minutes", str(minutes), "--vae-steps", str(vae_steps), "--unet-steps", str(unet_steps),
           "--threads", str(args.threads), "--preset", args.preset, "--batch-size", str(args.batch_size),
           "--unet-batch-size", str(args.unet_batch_size), "--vae-share", str(args.vae_share),
           "--unet-lr", str(args.unet_lr), "--vae-lr", str(args.vae_lr), "--ema-decay", str(args.ema_decay), "--limit", str(limit),
           "--vae-fg-weight", str(args.vae_fg_weight), "--snr-gamma", str(args.snr_gamma),
           "--prediction-type", args.prediction_type, "--mixed-precision", args.mixed_precision]
    for term, weight in args.oversample:
        cmd += ["--oversample", f"{term}={weight:g}"]
    if args.pooled_text:
        cmd.append("--pooled-text")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"training child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- evaluation
def _cnn(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv3d(1, 8, 3, stride=2, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
                nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
                nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.SiLU(),
                nn.AdaptiveAvgPool3d(1), nn.Flatten())
            self.head = nn.Linear(32, 1)

        def forward(self, x):
            return self.head(self.features(x)).squeeze(1)

    return Net()


def train_cnn(x: np.ndarray, y: np.ndarray, seed: int, steps: int, batch: int = 32):
    """Class-balanced batches (half positives), AdamW; returns the trained net (eval mode)."""
    import torch
    import torch.nn.functional as F

    net = _cnn(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    xt = torch.from_numpy(x).unsqueeze(1)
    for _ in range(steps):
        idx = np.concatenate([rng.choice(pos, batch // 2), rng.choice(neg, batch // 2)])
        flip = rng.random() < 0.5  # mirror along the (unknown-orientation) last axis: label-preserving here
        xb = xt[idx].flip(-1) if flip else xt[idx]
        loss = F.binary_cross_entropy_with_logits(net(xb), torch.from_numpy(y[idx]).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def scores_and_features(net, x: np.ndarray):
    import torch

    with torch.no_grad():
        xt = torch.from_numpy(x).unsqueeze(1)
        feats = torch.cat([net.features(xt[i:i + 64]) for i in range(0, len(xt), 64)])
        return net.head(feats).squeeze(1).numpy(), feats.numpy().astype(np.float64)


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    from scipy.stats import rankdata

    r = rankdata(s)
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def vae_round_trip(pipe, x: np.ndarray) -> np.ndarray:
    """Volumes ``x`` (N, D, H, W) in [0, 1] encoded and decoded by the model's VAE alone (same shape)."""
    import torch

    return np.concatenate([pipe.decode_latents(pipe.encode_volumes(torch.from_numpy(x[i:i + 16]))).numpy()
                           for i in range(0, len(x), 16)])


def vae_reconstruction(pipe, x: np.ndarray) -> dict:
    """How well the VAE alone reproduces real volumes: mean absolute error and Dice of the >0.5 masks."""
    rec = vae_round_trip(pipe, x)
    a, b = x > 0.5, rec > 0.5
    dice = 2 * (a & b).sum((1, 2, 3)) / np.maximum(a.sum((1, 2, 3)) + b.sum((1, 2, 3)), 1)
    return {"mae": round(float(np.abs(rec - x).mean()), 5), "dice_mean": round(float(dice.mean()), 4)}


# ---------------------------------------------------------------------------------------------- CT round trip
def audit_flags(xtr: np.ndarray, sets: dict[str, np.ndarray], spacing: tuple[float, float, float]) -> dict:
    """Share of each volume stack in ``sets`` that the memorization audit flags.

    The index holds all ``(N, D, H, W)`` training volumes ``xtr`` (``[0, 1]``, ``spacing`` mm) and is
    calibrated on a held-out fifth of them (seed 0), as ``radsynth index`` does without ``--holdout``.
    Returns, per set: counts of reject / review, their rates, what chance alone expects at the index's
    ``alpha`` / ``review_alpha``, and the number of distinct training volumes named by rejections; plus
    the index's planted-copy self-test and build time.
    """
    from privacy.volumes import VolumeIndex, audit_volumes, planted_copy_self_test

    t0 = time.monotonic()
    index = VolumeIndex.build(xtr, spacing=spacing, seed=0)
    out: dict = {"index_seconds": round(time.monotonic() - t0, 1), "n_references": len(index.ids),
                 "n_null": index.holdout["n_null"], "alpha": index.alpha, "review_alpha": index.review_alpha,
                 "self_test": planted_copy_self_test(index)}
    for name, vols in sets.items():
        t0 = time.monotonic()
        s = audit_volumes(index, np.clip(vols, 0.0, 1.0).astype(np.float32), self_test=False).summary
        c, n = s["counts"], s["n_images"]
        out[name] = {"volumes": n, "reject": c["reject"], "review": c["review"], "reject_rate": s["copy_rate"],
                     "review_rate": s["review_rate"], "expected_by_chance": s["expected_chance_flags"],
                     "training_volumes_named": s["training_images_copied"],
                     "seconds": round(time.monotonic() - t0, 1)}
    return out


def ct_round_trip(tmp: Path) -> dict:
    import nibabel as nib

    from generator.volumes.ingest import load_volumes
    from generator.volumes.phantom import nifti_bytes
    from generator.volumes.readers import read_dicom_series, read_nifti

    src = nib.load(str(CT))
    raw = np.asarray(src.dataobj).astype(np.float32)
    folder = tmp / "ct_in"
    folder.mkdir(parents=True)
    shutil.copy(CT, folder / "ct.nii.gz")  # a temporary copy outside the repository
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "ct.nii.gz", "text": "CT", "modality": "CT"}) + "\n")
    window = (-2048.0, 3071.0)  # wide enough for every voxel of the example (-1100 .. 1207 HU)
    vol = load_volumes(folder, ct_window=window).records[0]
    # every source voxel at the same world position with the same HU
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in raw.shape], indexing="ij"), -1).reshape(-1, 3)
    world = np.c_[idx, np.ones(len(idx))] @ src.affine.T
    mapped = world @ np.linalg.inv(vol.affine).T
    vidx = np.round(mapped[:, :3]).astype(int)
    pos_err = float(np.abs(mapped[:, :3] - vidx).max())
    hu_equal = bool(np.array_equal(vol.array[tuple(vidx.T)], raw.reshape(-1)))
    out = {"source_shape": list(raw.shape), "source_zooms_mm": [float(z) for z in src.header.get_zooms()[:3]],
           "volume_shape": list(vol.shape), "volume_spacing_mm": list(vol.spacing),
           "hu_range": [float(raw.min()), float(raw.max())], "ingest_world_index_error_vox": pos_err,
           "ingest_hu_identical": hu_equal}
    # NIfTI out and back
    (tmp / "ct_out.nii.gz").write_bytes(nifti_bytes(vol, "SYNTHETIC round trip test"))
    back = read_nifti(tmp / "ct_out.nii.gz")
    out["nifti_affine_max_diff_mm"] = float(np.abs(back.affine - vol.affine).max())
    out["nifti_hu_identical"] = bool(np.array_equal(back.array, vol.array))
    # DICOM series out (exporters) and back
    try:
        from exporters.dicom import DicomExporter

        ex = DicomExporter(tmp / "dicom", modality="CT", intensity=vol.intensity.to_dict(), overwrite=True)
        files = ex.add_volume(vol.to_model(), {"file_name": "ct_0000.nii.gz", "text": "CT round trip", "seed": 0},
                              vol.spacing, orientation=vol.lps_orientation(), origin=vol.lps_origin())
        series = read_dicom_series(Path(files[0]).parent, ct_window=window)
        out["dicom_files"] = len(files)
        out["dicom_affine_max_diff_mm"] = float(np.abs(series.affine - vol.affine).max())
        out["dicom_hu_max_abs_diff"] = float(np.abs(series.array - vol.array).max())
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        out["dicom_error"] = f"{type(exc).__name__}: {exc}"
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench_3d")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-minutes", type=float, default=10.0)
    p.add_argument("--vae-share", type=float, default=0.3)
    p.add_argument("--vae-steps", type=int, default=100_000)
    p.add_argument("--unet-steps", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--unet-batch-size", type=int, default=16)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--preset", default="small", help="tiny | small | lean (generator.volumes.models)")
    p.add_argument("--pooled-text", action="store_true",
                   help="the preset's UNet with pooled_text=True (PooledTextUNet: the mean text state added "
                        "to the time embedding)")
    p.add_argument("--prediction-type", default="", help="epsilon | v_prediction (default: the preset's)")
    p.add_argument("--vae-fg-weight", type=float, default=1.0,
                   help="intensity-weighted VAE L1 (VolumeTrainConfig.vae_fg_weight; 1 = plain L1)")
    p.add_argument("--snr-gamma", type=float, default=0.0, help="min-SNR-gamma UNet loss weighting (0 = off)")
    p.add_argument("--oversample", action="append", default=[], type=oversample_term, metavar="TERM=WEIGHT",
                   help="UNet steps draw volumes whose text contains TERM WEIGHT times as often "
                        "(VolumeTrainConfig.oversample), e.g. hyperplasia=3.5 for balanced classes (22%% of the "
                        "training volumes are hyperplasia)")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                   help="training arithmetic: auto (default, as radsynth train: bf16 where the CPU has it), "
                        "no (float32; the runs before the seventh session), bf16")
    p.add_argument("--num-synthetic", type=int, default=160)
    p.add_argument("--balanced", action="store_true",
                   help="prompt half the synthetic volumes as hyperplasia (default: the training split's class ratio)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--cnn-steps", type=int, default=300)
    p.add_argument("--cnn-seeds", type=int, default=3)
    p.add_argument("--speed-64", action="store_true",
                   help="also a 64^3 speed/RSS probe (4 VAE + 4 UNet steps on 32 training volumes)")
    p.add_argument("--audit-controls", type=int, default=100, metavar="N",
                   help="VAE round trips of N training volumes audited as the near-copy control (default 100)")
    p.add_argument("--no-audit", action="store_true", help="skip the memorization audit of the samples")
    p.add_argument("--skip-train", action="store_true", help="reuse OUT/model32")
    p.add_argument("--step-timing", type=int, default=0, metavar="ROUNDS",
                   help="only time VAE and UNet steps of --preset (training and sampling passes) in each of "
                        "--step-precisions and both weight layouts (ROUNDS alternating rounds), print them and exit")
    p.add_argument("--step-precisions", type=_precisions,
                   default=["no", "bf16"], metavar="LIST",
                   help="precisions for --step-timing, comma-separated: no (float32), bf16 (default: no,bf16; "
                        "bf16 is 30x slower than float32 on a CPU without native bfloat16)")
    # internal: the training child
    p.add_argument("--child-train", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_train:
        train_child(args)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"threads": args.threads, "cpu_count": os.cpu_count(),
                    "spacing_note": "AdrenalMNIST3D has no spacing: treated as 1 mm isotropic at 64^3 (2 mm at 32^3)",
                    "torch": torch.__version__}
    print(f"threads={args.threads} (torch.set_num_threads and OMP_NUM_THREADS in the training child)", flush=True)
    if args.step_timing:
        report["step_timing"] = step_timing(args, args.step_timing)
        print("step timing:", json.dumps(report["step_timing"]), flush=True)
        (args.out / "step_timing.json").write_text(json.dumps(report, indent=2) + "\n")
        return 0

    # 4 first: it is quick and independent of training
    with tempfile.TemporaryDirectory() as tmp:
        report["ct_round_trip"] = ct_round_trip(Path(tmp))
    print("ct round trip:", json.dumps(report["ct_round_trip"]), flush=True)

    model = args.out / "model32"
    if not args.skip_train:
        shutil.rmtree(model, ignore_errors=True)
        report["train32"] = run_train(args, 32, model, args.train_minutes, args.vae_steps, args.unet_steps)
        print("train 32^3:", json.dumps(report["train32"]), flush=True)
    if args.speed_64:
        m64 = args.out / "model64"
        shutil.rmtree(m64, ignore_errors=True)
        report["train64_probe"] = run_train(args, 64, m64, 100.0, 4, 4, limit=32)
        print("train 64^3 probe:", json.dumps(report["train64_probe"]), flush=True)

    from generator.volumes.pipeline import VolumePipeline
    from generator.volumes.previews import save_preview

    pipe = VolumePipeline.from_pretrained(model)
    xtr, ytr = _load("train", 32)
    xva, yva = _load("val", 32)
    rng = np.random.default_rng(0)
    n = args.num_synthetic
    if args.balanced:  # a generator can make as many of the rare class as of the common one
        ysyn = np.arange(n, dtype=np.int64) % 2
    else:
        ysyn = (rng.random(n) < ytr.mean()).astype(np.int64)
        ysyn[:2] = [0, 1]
    t0 = time.monotonic()
    out = pipe([TEXTS[int(v)] for v in ysyn], seed=1000, num_inference_steps=args.sample_steps,
               guidance_scale=args.guidance, sampler=args.sampler, batch_size=32)
    dt = time.monotonic() - t0
    xsyn = out.volumes
    report["sampling"] = {"volumes": n, "seconds": round(dt, 1), "volumes_per_s": round(n / dt, 3),
                          "steps": args.sample_steps, "sampler": args.sampler, "guidance": args.guidance,
                          "positives": int(ysyn.sum()), "balanced": bool(args.balanced)}
    print("sampling:", json.dumps(report["sampling"]), flush=True)
    for i in range(2):
        save_preview(args.out / f"synthetic_{i}_{TEXTS[ysyn[i]].split(', ')[1]}.png", xsyn[i], out.spacing, height=96)
        save_preview(args.out / f"real_{i}_{TEXTS[ytr[i]].split(', ')[1]}.png", xtr[i], out.spacing, height=96)
    report["voxel_stats"] = {"real_mean": float(xtr.mean()), "synthetic_mean": float(xsyn.mean()),
                             "real_fg_share": float((xtr > 0.5).mean()), "synthetic_fg_share": float((xsyn > 0.5).mean())}

    report["vae_reconstruction_val"] = vae_reconstruction(pipe, xva)
    print("vae reconstruction (val):", json.dumps(report["vae_reconstruction_val"]), flush=True)

    # FD compares like with like: a synthetic subset at the training split's class ratio (all of it unless
    # --balanced) against as many real training volumes
    fd_idx = np.arange(n)
    if args.balanced:
        neg, pos = np.flatnonzero(ysyn == 0), np.flatnonzero(ysyn == 1)
        n_pos = min(len(pos), int(round(len(neg) * ytr.mean() / (1 - ytr.mean()))))
        fd_idx = np.sort(np.concatenate([neg, pos[:n_pos]]))
    sub = rng.choice(len(xtr), size=min(len(fd_idx), len(xtr)), replace=False)
    # The VAE's share of the gap: the real training volumes after a VAE round trip, scored like samples
    # (FD of the same subset, and AUC of a CNN trained on all of them) -- what a perfect UNet could reach.
    xrt = vae_round_trip(pipe, xtr)
    aucs_real, aucs_syn, aucs_rt, fds_syn, fds_real, fds_rt = [], [], [], [], [], []
    for s in range(args.cnn_seeds):
        net_real = train_cnn(xtr, ytr, seed=s, steps=args.cnn_steps)
        sv, fv = scores_and_features(net_real, xva)
        aucs_real.append(roc_auc(yva, sv))
        net_syn = train_cnn(xsyn, ysyn, seed=s, steps=args.cnn_steps)
        aucs_syn.append(roc_auc(yva, scores_and_features(net_syn, xva)[0]))
        net_rt = train_cnn(xrt, ytr, seed=s, steps=args.cnn_steps)
        aucs_rt.append(roc_auc(yva, scores_and_features(net_rt, xva)[0]))
        _, fs = scores_and_features(net_real, xsyn[fd_idx])
        _, fr = scores_and_features(net_real, xtr[sub])
        _, frt = scores_and_features(net_real, xrt[sub])
        fds_syn.append(frechet(fs, fv))
        fds_real.append(frechet(fr, fv))
        fds_rt.append(frechet(frt, fv))
    report["evaluation"] = {
        "cnn_seeds": args.cnn_seeds, "cnn_steps": args.cnn_steps, "val_volumes": int(len(yva)),
        "fd_volumes": int(len(fd_idx)),
        "auc_real_to_real": [round(a, 4) for a in aucs_real], "auc_synthetic_to_real": [round(a, 4) for a in aucs_syn],
        "auc_real_mean": round(float(np.mean(aucs_real)), 4), "auc_synthetic_mean": round(float(np.mean(aucs_syn)), 4),
        "fd_synthetic_vs_val": round(float(np.mean(fds_syn)), 4), "fd_real_train_vs_val": round(float(np.mean(fds_real)), 4),
        "fd_ratio": round(float(np.mean(fds_syn) / max(np.mean(fds_real), 1e-12)), 2),
        "auc_vae_round_trip_to_real": [round(a, 4) for a in aucs_rt],
        "auc_vae_round_trip_mean": round(float(np.mean(aucs_rt)), 4),
        "fd_vae_round_trip_vs_val": round(float(np.mean(fds_rt)), 4),
    }
    print("evaluation:", json.dumps(report["evaluation"]), flush=True)
    if not args.no_audit:
        ctrl = np.random.default_rng(1).choice(len(xtr), size=min(args.audit_controls, len(xtr)), replace=False)
        report["audit"] = audit_flags(xtr, {"synthetic": xsyn, "real_val": xva, "vae_round_trip_train": xrt[ctrl]},
                                      tuple(float(v) for v in out.spacing))
        print("audit:", json.dumps(report["audit"]), flush=True)
    report["peak_rss_mb_eval_process"] = round(_rss_mb(), 1)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out / 'report.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
