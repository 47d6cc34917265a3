#!/usr/bin/env python
"""Augmentation benchmark (issue 12): does adding synthetic images help a classifier trained on few real ones?

A trained RadSynth model (``scripts/bench_train.py`` on PneumoniaMNIST, label texts of
``bench_train.LABEL_TEXT``) makes ``--synthetic`` class-balanced images once, with the library's
defaults (sampler ``DEFAULT_SAMPLER`` = DPM-Solver++ 2M Karras, ``DEFAULT_STEPS`` = 10 steps,
``precision="auto"``), guidance ``--guidance``, image ``i`` prompted with label ``i % 2`` and seeded
``--sample-seed + i``. They are cached in ``OUT/synthetic.npz`` (``--reuse-synthetic`` loads them instead).

Then, for every seed ``s`` of ``--seeds``, a class-stratified ``--real-fraction`` subset of the real
training split is drawn (seed ``s``) and the same small CNN
(:func:`generator.evaluation.train_classifier`, seed ``s``) is trained on each arm:

    a  real_subset          the real subset alone
    b  real_subset+syn      the real subset plus all synthetic images (labelled by their prompt)
    c  syn_only             the synthetic images alone (the same set every seed; only init/order vary)
    d  real_full            the whole real training split (reference; first ``--full-seeds`` seeds)
    e  real_subset_up+syn   as b, with the real subset repeated so that real and synthetic images carry
                            about equal weight per epoch (``--no-upsampled`` drops it)

and scored on the real validation split (270 images): ROC AUC (:func:`generator.evaluation.roc_auc`)
and accuracy at probability 0.5.

Optimizer steps: ``train_classifier`` takes ``epochs`` and makes ``ceil(N / batch_size)`` steps per
epoch, so a fixed epoch count would give the small real subset about 5x fewer steps than b. By default
every arm gets about the same number of steps (``--steps``, default 300; epochs = round(steps /
steps_per_epoch), the actual steps are reported); ``--epochs E`` instead trains every arm for E epochs.
All other classifier settings are the library defaults (32 px, width 64, batch 64, lr 3e-3, shifts
of up to 2 px, no flips, class-weighted loss).

Statistics over seeds: mean, sample SD and a two-sided 95% Student-t interval per arm; for b - a and
e - a the paired differences (same subset and seed) with their t interval, paired t-test p value and the
number of seeds where the augmented arm is higher. The synthetic set is fixed, so the intervals cover
the choice of real subset and the classifier's initialisation, not the draw of synthetic images.

Outputs: ``OUT/bench_augment.json``, ``OUT/bench_augment.md``, ``OUT/synthetic.npz``,
``OUT/samples_synthetic.png`` (contact sheet: label 0 row, then label 1).

Examples::

    # the issue-12 numbers (after scripts/bench_train.py --out bench_out), one thread
    python scripts/bench_augment.py --model bench_out/model --out bench_out/augment

    # again with the cached samples, every arm trained 10 epochs instead of matched steps
    python scripts/bench_augment.py --model bench_out/model --out bench_out/augment \\
        --reuse-synthetic --epochs 10

    # smoke run: few samples, two seeds
    python scripts/bench_augment.py --model /tmp/bt/model --out /tmp/aug/smoke --synthetic 64 \\
        --seeds 0 1 --steps 40
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # write nothing outside --out

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_sample import contact_sheet, prompts_and_labels  # noqa: E402
from bench_train import DEFAULT_DATA, LABEL_TEXT, peak_rss_mib  # noqa: E402

#: Arms in report order: key -> description.
ARMS: dict[str, str] = {
    "real_subset": "a: real subset alone",
    "real_subset+syn": "b: real subset + synthetic",
    "syn_only": "c: synthetic only",
    "real_full": "d: full real training split (reference)",
    "real_subset_up+syn": "e: real subset repeated to ~synthetic size + synthetic",
}

#: Paired comparisons reported: (augmented arm, baseline arm).
COMPARISONS = (("real_subset+syn", "real_subset"), ("real_subset_up+syn", "real_subset"))

CLF_BATCH = 64  # train_classifier's default batch size (kept; steps per epoch = ceil(N / 64))


def say(msg: str) -> None:
    print(f"[bench_augment] {msg}", flush=True)


# ------------------------------------------------------------------------------------ statistics
def t_summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample SD and two-sided 95% Student-t interval of the mean (``None`` bounds for n < 2)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    n = int(v.size)
    mean = float(v.mean()) if n else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci95": [None, None]}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def paired(aug: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """Paired difference ``aug - base``: t summary, paired t-test p value, seeds where ``aug > base``."""
    from scipy import stats

    d = np.asarray(aug, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    out = t_summary(d)
    out["wins"] = int((d > 0).sum())
    out["ties"] = int((d == 0).sum())
    out["p_paired_t"] = (float(stats.ttest_rel(aug, base).pvalue)
                         if d.size >= 2 and np.any(d != d[0]) else None)
    return out


# ------------------------------------------------------------------------------------ data
def load_real(data: Path, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and val images ``(N, R, R)`` in ``[0, 1]`` and labels, read as ``bench_sample.py`` reads them."""
    from generator.data import load_dataset

    out = []
    for split in ("train", "val"):
        ds = load_dataset(data, resolution=resolution, label_text=LABEL_TEXT, npz_split=split, progress=False)
        out += [ds.stack(), np.array([r.attributes["label"] for r in ds.records], dtype=np.int64)]
    return out[0], out[1], out[2], out[3]


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(fraction * n_c)`` (at least 2) random images of each class ``c``."""
    rng = np.random.default_rng(seed)
    parts = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(len(idx), max(2, int(round(fraction * len(idx)))))
        parts.append(rng.choice(idx, k, replace=False))
    return np.sort(np.concatenate(parts))


def synthesize(args: argparse.Namespace) -> dict[str, Any]:
    """Make (or load with ``--reuse-synthetic``) the synthetic set; returns arrays and settings."""
    from generator.models.model_folder import load_pipeline, read_model_info
    from generator.models.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, make_sampler

    cache = args.out / "synthetic.npz"
    info = read_model_info(args.model)
    settings = {"model": str(args.model), "model_hash": info.model_hash, "n": args.synthetic,
                "sampler": str(DEFAULT_SAMPLER), "steps": DEFAULT_STEPS, "guidance": args.guidance,
                "sample_seed": args.sample_seed, "resolution": int(info.resolution)}
    if args.reuse_synthetic:
        if not cache.is_file():
            raise SystemExit(f"--reuse-synthetic: {cache} not found")
        with np.load(cache) as z:
            cached = json.loads(str(z["settings"]))
            images, labels = z["images"], z["labels"]
        differ = {k: (cached.get(k), v) for k, v in settings.items()
                  if k not in ("model",) and cached.get(k) != v}
        if differ:
            raise SystemExit(f"--reuse-synthetic: {cache} was made with other settings (cached, asked): {differ}")
        say(f"reusing {len(images)} synthetic images from {cache} "
            f"(made in {cached.get('seconds', float('nan')):.0f} s, precision {cached.get('precision')})")
        return {"images": images, "labels": labels, "settings": cached, "reused": True}

    pipe, _ = load_pipeline(args.model, device="cpu", half=False)
    pipe.scheduler = make_sampler(DEFAULT_SAMPLER, pipe.scheduler)
    prompts, labels = prompts_and_labels(args.synthetic)
    say(f"sampling {args.synthetic} images: {DEFAULT_SAMPLER}, {DEFAULT_STEPS} steps, guidance "
        f"{args.guidance:g}, precision auto ({pipe.resolve_precision('auto')}), seeds "
        f"{args.sample_seed}..{args.sample_seed + args.synthetic - 1}")
    out, used = [], set()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, args.synthetic, args.batch_size):
        j = min(args.synthetic, i + args.batch_size)
        res = pipe(prompts[i:j], seeds=list(range(args.sample_seed + i, args.sample_seed + j)),
                   num_inference_steps=DEFAULT_STEPS, guidance_scale=args.guidance, precision="auto")
        out.append(res.images.astype(np.float32))
        used.add(str(res.precision))
        if j == args.synthetic or (j // args.batch_size) % 8 == 0:
            say(f"  {j}/{args.synthetic} images ({time.perf_counter() - t0:.0f} s)")
    images = np.concatenate(out)
    settings.update(precision=",".join(sorted(used)), seconds=time.perf_counter() - t0,
                    cpu_seconds=time.process_time() - c0, label_text={str(k): v for k, v in LABEL_TEXT.items()})
    np.savez_compressed(cache, images=images, labels=labels.astype(np.int64), prompts=np.array(prompts),
                        settings=np.array(json.dumps(settings)))
    contact_sheet(images, labels, args.out / "samples_synthetic.png")
    say(f"  wrote {cache} ({settings['seconds']:.0f} s, {args.synthetic / settings['seconds']:.1f} images/s)")
    del pipe
    return {"images": images, "labels": labels, "settings": settings, "reused": False}


# ------------------------------------------------------------------------------------ training
def epochs_for(n: int, args: argparse.Namespace) -> int:
    """Epochs of an arm with ``n`` training images (``--epochs``, else about ``--steps`` steps)."""
    if args.epochs is not None:
        return args.epochs
    return max(1, int(round(args.steps / math.ceil(n / CLF_BATCH))))


def run_arm(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, seed: int,
            args: argparse.Namespace) -> dict[str, Any]:
    from generator.evaluation import roc_auc, train_classifier

    epochs = epochs_for(len(x), args)
    t0, c0 = time.perf_counter(), time.process_time()
    clf = train_classifier(x, y, seed=seed, epochs=epochs, threads=args.threads)
    p = clf.predict_proba(xv)
    return {"n_train": int(len(x)), "n_pos": int(y.sum()), "epochs": epochs,
            "steps": epochs * math.ceil(len(x) / CLF_BATCH),
            "auc": roc_auc(yv, p), "acc": float(np.mean((p >= 0.5) == (yv == 1))),
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def run_seeds(args: argparse.Namespace, real: tuple[np.ndarray, ...], syn: dict[str, Any],
              res: dict[str, Any]) -> None:
    xt, yt, xv, yv = real
    xs, ys = syn["images"], syn["labels"]
    arms = [a for a in ARMS if not (a == "real_subset_up+syn" and args.no_upsampled)]
    for i, s in enumerate(args.seeds):
        sub = stratified_subset(yt, args.real_fraction, s)
        xr, yr = xt[sub], yt[sub]
        reps = max(1, int(round(len(xs) / len(xr))))
        sets = {
            "real_subset": (xr, yr),
            "real_subset+syn": (np.concatenate([xr, xs]), np.concatenate([yr, ys])),
            "syn_only": (xs, ys),
            "real_full": (xt, yt),
            "real_subset_up+syn": (np.concatenate([np.tile(xr, (reps, 1, 1)), xs]),
                                   np.concatenate([np.tile(yr, reps), ys])),
        }
        row: dict[str, Any] = {"seed": s, "subset_size": int(len(sub)), "subset_pos": int(yr.sum()),
                               "upsample_repeats": reps, "arms": {}}
        for a in arms:
            if a == "real_full" and i >= args.full_seeds:
                continue
            r = run_arm(*sets[a], xv, yv, s, args)
            row["arms"][a] = r
            say(f"seed {s}: {a:<19} N={r['n_train']:5d} epochs {r['epochs']:3d} steps {r['steps']:4d}  "
                f"AUC {r['auc']:.4f}  acc {r['acc']:.3f}  ({r['wall_s']:.0f} s)")
        res["per_seed"].append(row)
        summarize(res)
        write_outputs(args, res)  # partial results survive an interrupted run


def summarize(res: dict[str, Any]) -> None:
    rows = res["per_seed"]
    summary: dict[str, Any] = {}
    for a in ARMS:
        got = [r["arms"][a] for r in rows if a in r["arms"]]
        if not got:
            continue
        summary[a] = {"auc": t_summary([g["auc"] for g in got]), "acc": t_summary([g["acc"] for g in got]),
                      "seeds": [r["seed"] for r in rows if a in r["arms"]],
                      "n_train": sorted({g["n_train"] for g in got}), "epochs": sorted({g["epochs"] for g in got}),
                      "steps": sorted({g["steps"] for g in got}),
                      "cpu_s_per_run": float(np.mean([g["cpu_s"] for g in got]))}
    comps = {}
    for aug, base in COMPARISONS:
        both = [r for r in rows if aug in r["arms"] and base in r["arms"]]
        if both:
            comps[f"{aug} - {base}"] = {
                "auc": paired([r["arms"][aug]["auc"] for r in both], [r["arms"][base]["auc"] for r in both]),
                "acc": paired([r["arms"][aug]["acc"] for r in both], [r["arms"][base]["acc"] for r in both]),
            }
    res["summary"], res["paired"] = summary, comps


# ------------------------------------------------------------------------------------ report
def _f(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _ci(s: dict[str, Any], fmt: str = ".4f") -> str:
    lo, hi = s["ci95"]
    return "-" if lo is None else f"[{lo:{fmt}}, {hi:{fmt}}]"


def _join(vals: list[int]) -> str:
    return "/".join(str(v) for v in vals)


def markdown(res: dict[str, Any]) -> str:
    syn = res["synthetic"]
    mode = (f"every arm {res['epochs']} epochs" if res["epochs"] is not None
            else f"about {res['steps']} optimizer steps per arm (epochs = round({res['steps']} / ceil(N / 64)))")
    out = [
        f"### Augmentation benchmark (issue 12): {res['threads']} torch thread(s)", "",
        f"Command: `{res['command']}`", "",
        f"Model `{res['model']}` (hash {syn['model_hash']}); {syn['n']} synthetic images, class-balanced, "
        f"{syn['sampler']} {syn['steps']} steps, guidance {syn['guidance']:g}, precision {syn.get('precision')}, "
        f"seeds {syn['sample_seed']}..{syn['sample_seed'] + syn['n'] - 1}"
        + (f", {syn['seconds']:.0f} s to make" if "seconds" in syn else "") + ". "
        f"Real: PneumoniaMNIST train {res['num_train']} / val {res['num_val']} images at {res['resolution']} px; "
        f"subset = class-stratified {res['real_fraction']:g} of train, drawn per seed. "
        f"Classifier: `train_classifier` defaults, {mode}. Scores on the real val split; "
        f"mean, SD and 95% Student-t interval over seeds.", "",
        "| arm | training images | epochs | optimizer steps | seeds | val AUC mean | SD | 95% CI | "
        "val acc@0.5 mean | SD |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for a, s in res["summary"].items():
        out.append(f"| {ARMS[a]} | {_join(s['n_train'])} | {_join(s['epochs'])} | {_join(s['steps'])} | "
                   f"{s['auc']['n']} | {s['auc']['mean']:.4f} | {_f(s['auc']['sd'])} | {_ci(s['auc'])} | "
                   f"{s['acc']['mean']:.3f} | {_f(s['acc']['sd'], '.3f')} |")
    out += ["", "Paired differences (same real subset and classifier seed):", "",
            "| comparison | metric | mean diff | SD | 95% CI | seeds higher / n | paired t p |",
            "|---|---|---:|---:|---|---:|---:|"]
    for name, comp in res["paired"].items():
        for metric, fmt in (("auc", ".4f"), ("acc", ".3f")):
            d = comp[metric]
            out.append(f"| {name} | {metric} | {d['mean']:+{fmt}} | {_f(d['sd'], fmt)} | {_ci(d, fmt)} | "
                       f"{d['wins']}/{d['n']} | {_f(d['p_paired_t'], '.3g')} |")
    key = "real_subset+syn - real_subset"
    if key in res["paired"]:
        d = res["paired"][key]["auc"]
        lo = d["ci95"][0]
        verdict = ("b beats a: the 95% CI of the AUC difference is above 0" if lo is not None and lo > 0 else
                   "b does not beat a at 95%: the CI of the AUC difference reaches 0 or below" if lo is not None
                   else "one seed: no interval")
        out += ["", f"Issue-12 check (AUC, b - a): {d['mean']:+.4f}, {verdict}; b higher on {d['wins']} of {d['n']} seeds."]
    out += ["", f"Wall time {res.get('wall_s', float('nan')):.0f} s "
            f"(CPU {res.get('cpu_s', float('nan')):.0f} s); peak RSS {res.get('peak_rss_mib', float('nan')):.0f} MiB."]
    return "\n".join(out) + "\n"


def write_outputs(args: argparse.Namespace, res: dict[str, Any]) -> str:
    res["wall_s"] = time.perf_counter() - args._t0
    res["cpu_s"] = time.process_time() - args._c0
    res["peak_rss_mib"] = peak_rss_mib()
    md = markdown(res) if res.get("summary") else ""
    (args.out / "bench_augment.json").write_text(json.dumps(res, indent=2) + "\n")
    if md:
        (args.out / "bench_augment.md").write_text(md)
    return md


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_augment.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples::"):], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, default=Path("bench_out/model"),
                   help="model folder from bench_train.py (default bench_out/model)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"PneumoniaMNIST .npz (default {DEFAULT_DATA})")
    p.add_argument("--out", type=Path, default=Path("bench_out/augment"), help="output folder (default bench_out/augment)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    g = p.add_argument_group("synthetic images")
    g.add_argument("--synthetic", type=int, default=1000, help="synthetic images (even; default 1000)")
    g.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance (default 2)")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of synthetic image 0 (image i: +i; default 0)")
    g.add_argument("--batch-size", type=int, default=32, help="images per pipeline call (default 32)")
    g.add_argument("--reuse-synthetic", action="store_true",
                   help="load OUT/synthetic.npz instead of sampling (its settings must match)")
    c = p.add_argument_group("classifiers")
    c.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="seeds (default 0..9)")
    c.add_argument("--real-fraction", type=float, default=0.1, help="real subset fraction per class (default 0.1)")
    c.add_argument("--steps", type=int, default=300, help="about this many optimizer steps per arm (default 300)")
    c.add_argument("--epochs", type=int, default=None,
                   help="train every arm this many epochs instead (steps then grow with the set size)")
    c.add_argument("--full-seeds", type=int, default=3,
                   help="run arm d (full real split) for the first K seeds only (default 3)")
    c.add_argument("--no-upsampled", action="store_true", help="skip arm e (real subset repeated + synthetic)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._t0, args._c0 = time.perf_counter(), time.process_time()
    if args.synthetic < 2 or args.synthetic % 2:
        raise SystemExit(f"--synthetic must be an even number >= 2, got {args.synthetic}")
    for name in ("threads", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1, got {args.epochs}")
    if not 0 < args.real_fraction <= 1:
        raise SystemExit(f"--real-fraction must be in (0, 1], got {args.real_fraction}")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit("--seeds must be distinct")
    if not (args.model / "model_index.json").is_file():
        raise SystemExit(f"--model {args.model} is not a model folder; run scripts/bench_train.py first")
    if not args.data.is_file():
        raise SystemExit(f"--data {args.data} not found")
    torch.set_num_threads(args.threads)
    say(f"torch threads: {torch.get_num_threads()} (torch.set_num_threads({args.threads}))")
    args.out.mkdir(parents=True, exist_ok=True)

    syn = synthesize(args)
    res_px = int(syn["settings"]["resolution"])
    xt, yt, xv, yv = load_real(args.data, res_px)
    say(f"real data at {res_px} px: train {len(xt)} ({int(yt.sum())} label 1), val {len(xv)} ({int(yv.sum())} label 1)")
    res: dict[str, Any] = {
        "benchmark": "bench_augment", "command": "python scripts/bench_augment.py " + shlex.join(argv),
        "model": str(args.model), "data": str(args.data), "threads": torch.get_num_threads(),
        "resolution": res_px, "num_train": int(len(xt)), "num_val": int(len(xv)),
        "real_fraction": args.real_fraction, "seeds": args.seeds, "steps": args.steps if args.epochs is None else None,
        "epochs": args.epochs, "full_seeds": args.full_seeds, "classifier_batch_size": CLF_BATCH,
        "synthetic": {**syn["settings"], "reused": syn["reused"],
                      "pixel_mean": float(syn["images"].mean()), "pixel_std": float(syn["images"].std())},
        "real_train_pixel_mean": float(xt.mean()), "real_train_pixel_std": float(xt.std()),
        "arms": ARMS, "per_seed": [],
        "platform": {"python": platform.python_version(), "torch": torch.__version__,
                     "cpu_capability": str(torch.backends.cpu.get_cpu_capability()), "machine": platform.machine()},
    }
    run_seeds(args, (xt, yt, xv, yv), syn, res)
    md = write_outputs(args, res)
    print(md, flush=True)
    say(f"wrote {args.out / 'bench_augment.md'} and {args.out / 'bench_augment.json'} in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
