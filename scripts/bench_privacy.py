#!/usr/bin/env python
"""Benchmark of the memorization audit (issue 4): detection power and scale.

Detection power (default mode), on PneumoniaMNIST (``../shared/data/pneumoniamnist``):
- references: the training split (2428 images);
- negatives: the validation split (270), split at random into a calibration half (the index's
  held-out set) and a measuring half;
- positives: training images under copy transforms (identity, flip, shift, rotation, crop+resize,
  brightness/contrast, gamma, noise, blur, blend), implemented here with scipy/scikit-image,
  independently of the training augmentations in :mod:`privacy.embedding`.

For every view alone (threshold at ``alpha``) and for the combined decision (the audit's
``reject``: any view above its threshold at ``alpha / 4``, or pixel NCC >= the leak threshold) it
reports the TPR at the thresholds calibrated at
``alpha`` on the calibration half, and the realised FPR on the measuring half, both counting every
validation image as a negative and without the validation images that are near-duplicates of a
training image (unshifted pixel NCC > 0.995; the splits are by image, not patient).

Scale mode (``--scale``): candidate search (embedding view) of ``--scale-queries`` queries, half
planted copies, against each of ``--scale-refs`` memory-mapped references: exact search and the
approximate IVF index side by side, recall of the exact top-32, times, resident memory.

Build-time mode (``--build-time``): ``ReferenceIndex.build`` at the CLI defaults on the training
split with the validation split held out, for each of ``--build-steps`` (old and new default
embedder steps) in one run, on 2 threads, then a rebuild that reuses the embedder.

Every detection run also measures the false-flag rate on validation images that neither built
nor calibrated the index: ``--fpr-repeats`` random 50/50 calibration/measurement splits, old rule
(each view at alpha / 4, union) beside the new one, with Clopper-Pearson intervals.

Examples::

    python scripts/bench_privacy.py                     # 28 px, native
    python scripts/bench_privacy.py --resolution 64     # upsampled
    python scripts/bench_privacy.py --scale             # 1e5 and 3e5 references x 1e4 queries
    python scripts/bench_privacy.py --build-time        # index build, old vs new default steps
    python scripts/bench_privacy.py --sweep-steps 50,100,200,400 --positives 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import beta
from skimage.transform import resize

ROOT = Path(__file__).resolve().parents[1]

from privacy import views as V  # noqa: E402
from privacy.calibration import Calibration, conformal_threshold  # noqa: E402
from privacy.embedding import EmbedderConfig, torch_threads  # noqa: E402
from privacy.index import VIEW_NAMES, ReferenceIndex  # noqa: E402
from privacy.search import topk_search  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
TRANSFORMS = (
    "identity", "flip", "shift", "brightness_contrast", "gamma",
    "rotation", "crop_resize", "noise", "blur", "blend",
)
#: Embedder steps of ``EmbedderConfig`` (the CLI's ``--embedder-steps`` default).
DEFAULT_STEPS = EmbedderConfig().steps
#: TPR targets of issue 4.
TARGET = {t: 0.99 for t in ("identity", "flip", "shift", "brightness_contrast", "gamma")}


def apply_transform(name: str, img: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One copy transform of a ``(R, R)`` image in [0, 1] (pixel sizes scaled from 28 px)."""
    r = img.shape[0]
    scale = r / 28.0
    if name == "identity":
        out = img.copy()
    elif name == "flip":
        out = img[:, ::-1].copy()
    elif name == "shift":
        while True:
            dy, dx = rng.integers(-3, 4, size=2)
            if 1 <= max(abs(dy), abs(dx)) <= 3:
                break
        out = ndimage.shift(img, (dy * scale, dx * scale), order=1, mode="nearest")
    elif name == "rotation":
        angle = rng.uniform(5, 15) * rng.choice([-1, 1])
        out = ndimage.rotate(img, angle, reshape=False, order=1, mode="nearest")
    elif name == "crop_resize":
        frac = rng.uniform(0.85, 0.95)
        c = int(round(r * frac))
        y0, x0 = rng.integers(0, r - c + 1, size=2)
        out = resize(img[y0 : y0 + c, x0 : x0 + c], (r, r), order=1, anti_aliasing=False)
    elif name == "brightness_contrast":
        f = rng.uniform(1.1, 1.4)
        out = img * f if rng.random() < 0.5 else (img - img.mean()) * f + img.mean()
    elif name == "gamma":
        out = img ** rng.choice([0.7, 1.5])
    elif name == "noise":
        out = img + rng.normal(0, rng.uniform(0.02, 0.1), img.shape)
    elif name == "blur":
        out = ndimage.gaussian_filter(img, rng.uniform(0.5, 1.5) * scale)
    elif name == "blend":
        out = 0.7 * img + 0.3 * other
    else:
        raise ValueError(f"unknown transform {name!r}")
    return np.clip(out, 0, 1).astype(np.float32)


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    return np.stack([resize(im, (size, size), order=1, anti_aliasing=False) for im in images]).astype(np.float32)


def load_split(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(args.data)
    train = upsample(data["train_images"].astype(np.float32) / 255.0, args.resolution)
    val = upsample(data["val_images"].astype(np.float32) / 255.0, args.resolution)
    return train, val


def old_rule(cal, nearest: dict[str, np.ndarray], alpha: float, leak: float) -> np.ndarray:
    """The decision before issue 13: each fused view at its own conformal threshold at
    ``alpha / V`` (its largest null value when that is unresolvable), union over views."""
    views = cal.fused_views
    thr = {v: conformal_threshold(cal.null[v], alpha / len(views)) for v in views}
    return np.any([nearest[v] > thr[v] for v in views], axis=0) | (nearest["ncc"] >= leak)


def new_rule(cal, nearest: dict[str, np.ndarray], alpha: float, leak: float) -> np.ndarray:
    """The audit's ``reject``: max standardized view above its conformal threshold, or the copy rule."""
    return (cal.statistic(nearest) > cal.threshold(alpha)) | (nearest["ncc"] >= leak)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval of ``k / n``."""
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def repeated_fpr(
    val_nearest: dict[str, np.ndarray], near_dup: np.ndarray, alpha: float, leak: float, repeats: int, seed: int
) -> dict:
    """False-flag rate on images that neither built nor calibrated the index.

    The validation images were scored once against an index built on the training images only
    (so their nearest similarities do not depend on which of them calibrate). Each repeat splits
    them 50/50 at random, calibrates on one half (leaving out near-exact duplicates of training
    images, pixel NCC >= the copy rule's threshold, as the index build does) and counts flags on
    the other half, with the old and the new rule: over all measured images, and over those that
    are not near-exact duplicates (the population the guarantee is about; the duplicates are
    flagged by the copy rule by design).
    """
    rng = np.random.default_rng(seed)
    n = len(near_dup)
    out: dict[str, dict] = {}
    flags = {"new": [], "old": []}
    clean_flags = {"new": [], "old": []}
    n_meas, n_clean = 0, 0
    for _ in range(repeats):
        perm = rng.permutation(n)
        cal_idx, meas_idx = perm[: n // 2], perm[n // 2 :]
        keep = cal_idx[~near_dup[cal_idx]]
        cal = Calibration.fit({v: val_nearest[v][keep] for v in VIEW_NAMES}, list(VIEW_NAMES))
        meas = {v: val_nearest[v][meas_idx] for v in VIEW_NAMES}
        clean = ~near_dup[meas_idx]
        for name, rule in (("new", new_rule), ("old", old_rule)):
            d = rule(cal, meas, alpha, leak)
            flags[name].append(int(d.sum()))
            clean_flags[name].append(int(d[clean].sum()))
        n_meas += len(meas_idx)
        n_clean += int(clean.sum())
    for name in ("new", "old"):
        k, kc = sum(flags[name]), sum(clean_flags[name])
        out[name] = {
            "fpr_all": round(k / n_meas, 4),
            "ci95_all": [round(x, 4) for x in clopper_pearson(k, n_meas)],
            "fpr_without_near_duplicates": round(kc / n_clean, 4),
            "ci95_without_near_duplicates": [round(x, 4) for x in clopper_pearson(kc, n_clean)],
            "per_repeat_flags": flags[name],
        }
    out["repeats"] = repeats
    out["measured_per_repeat"] = int(n - n // 2)
    out["note"] = ("repeats reuse the same 270 images, so the pooled Clopper-Pearson interval is "
                   "optimistic about independence; the per-repeat counts show the spread")
    return out


def detection(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    train, val = load_split(args)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(val))
    cal_idx, meas_idx = np.sort(perm[: len(val) // 2]), np.sort(perm[len(val) // 2 :])

    # validation images that are near-duplicates of a training image (unshifted pixel NCC)
    plain_s, _ = topk_search(V.plain_ncc_features(val), V.plain_ncc_features(train), 1)
    near_dup = plain_s[:, 0] > 0.995

    index = ReferenceIndex.build(
        train,
        ids=[f"train/{i}" for i in range(len(train))],
        holdout_images=val[cal_idx],
        holdout_ids=[f"val/{i}" for i in cal_idx],
        alpha=args.alpha,
        embedder_config=EmbedderConfig(steps=args.steps, seed=args.seed),
        progress=not args.quiet,
        refine_top=args.refine_top,
    )
    t_build = time.perf_counter() - t0
    cal = index.calibration
    thr = index.thresholds(args.alpha)  # decision thresholds, per view, in each view's units
    view_thr = {v: conformal_threshold(cal.null[v], args.alpha) for v in VIEW_NAMES}  # each view alone
    leak = index.leak_threshold

    def decisions(scores) -> dict[str, np.ndarray]:
        out = {v: scores.nearest[v] > view_thr[v] for v in VIEW_NAMES}
        out["combined"] = new_rule(cal, scores.nearest, args.alpha, leak)
        out["combined_old_rule"] = old_rule(cal, scores.nearest, args.alpha, leak)
        return out

    t_query, n_query = 0.0, 0

    def timed_score(images: np.ndarray):
        nonlocal t_query, n_query
        t = time.perf_counter()
        scores = index.score(images)
        t_query += time.perf_counter() - t
        n_query += len(images)
        return scores

    val_scores = timed_score(val)
    neg = decisions(ScoresView(val_scores, meas_idx))
    meas_dup = near_dup[meas_idx]
    columns = list(VIEW_NAMES) + ["combined", "combined_old_rule"]
    fpr_all = {c: float(neg[c].mean()) for c in columns}
    fpr_clean = {c: float(neg[c][~meas_dup].mean()) for c in columns}

    tpr: dict[str, dict[str, float]] = {}
    for name in TRANSFORMS:
        src = rng.choice(len(train), size=min(args.positives, len(train)), replace=False)
        others = (src + rng.integers(1, len(train), size=len(src))) % len(train)
        pos = np.stack([apply_transform(name, train[i], train[j], rng) for i, j in zip(src, others)])
        dec = decisions(timed_score(pos))
        tpr[name] = {c: float(dec[c].mean()) for c in columns}
        if not args.quiet:
            print(f"{name:20s} " + " ".join(f"{c}={tpr[name][c]:.3f}" for c in columns), flush=True)
    res = {
        "resolution": args.resolution,
        "alpha": args.alpha,
        "embedder_steps": args.steps,
        "n_train": len(train),
        "n_calibration": int(len(cal_idx)),
        "n_null_used": cal.n,
        "calibration_excluded_duplicates": list(index.holdout["excluded_duplicates"]),
        "n_measure": int(len(meas_idx)),
        "n_measure_near_duplicates": int(meas_dup.sum()),
        "positives_per_transform": int(min(args.positives, len(train))),
        "decision_thresholds": thr,
        "single_view_thresholds": view_thr,
        "tpr": tpr,
        "fpr_all_negatives": fpr_all,
        "fpr_without_near_duplicates": fpr_clean,
        "false_positive_ids": [f"val/{meas_idx[j]}" for j in np.flatnonzero(neg["combined"])],
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_build": round(t_build, 1),
        "refine_top": index.refine_top,
        "ms_per_query": round(1000.0 * t_query / max(n_query, 1), 2),
    }
    if args.fpr_repeats > 0:
        # near-exact duplicates as the index build defines them (left out of every calibration half)
        dup = val_scores.nearest["ncc"] >= leak
        res["repeated_fpr"] = repeated_fpr(val_scores.nearest, dup, args.alpha, leak, args.fpr_repeats, args.seed)
        res["repeated_fpr"]["n_near_exact_duplicates"] = int(dup.sum())
    return res


class ScoresView:
    """Rows ``idx`` of a :class:`~privacy.index.Scores` (only ``nearest`` is used here)."""

    def __init__(self, scores, idx: np.ndarray) -> None:
        self.nearest = {v: scores.nearest[v][idx] for v in VIEW_NAMES}


def markdown(res: dict) -> str:
    cols = list(VIEW_NAMES) + ["combined", "combined_old_rule"]
    head = "| transform | target | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, row in res["tpr"].items():
        target = TARGET.get(name, 0.9)
        cells = []
        for c in cols:
            cell = f"{row[c]:.3f}"
            if c == "combined":
                cell = f"**{cell}**" + ("" if row[c] >= target else " (below)")
            cells.append(cell)
        lines.append(f"| {name} | ≥{target} | " + " | ".join(cells) + " |")
    lines.append(
        f"| FPR, all {res['n_measure']} measuring negatives | ≤{res['alpha']} | "
        + " | ".join(f"{res['fpr_all_negatives'][c]:.3f}" for c in cols) + " |"
    )
    lines.append(
        f"| FPR, without {res['n_measure_near_duplicates']} near-duplicate(s) | ≤{res['alpha']} | "
        + " | ".join(f"{res['fpr_without_near_duplicates'][c]:.3f}" for c in cols) + " |"
    )
    rep = res.get("repeated_fpr")
    if rep:
        lines += [
            "",
            f"False-flag rate on unseen validation images, {rep['repeats']} random 50/50 calibration/measurement "
            f"splits ({rep['measured_per_repeat']} measured each; 95% Clopper-Pearson):",
            "",
            "| rule | FPR all | 95% CI | FPR without near-exact duplicates | 95% CI |",
            "|---|---|---|---|---|",
        ]
        for name, label in (("old", "old: each view at alpha/4, union"), ("new", "new: max standardized view")):
            r = rep[name]
            lines.append(
                f"| {label} | {r['fpr_all']:.4f} | [{r['ci95_all'][0]:.4f}, {r['ci95_all'][1]:.4f}] | "
                f"{r['fpr_without_near_duplicates']:.4f} | [{r['ci95_without_near_duplicates'][0]:.4f}, "
                f"{r['ci95_without_near_duplicates'][1]:.4f}] |"
            )
    return "\n".join(lines)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mib(field: str = "VmRSS") -> float:
    """Current (``VmRSS``) or peak (``VmHWM``) resident memory of this process, MiB (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return round(peak_rss_mib(), 1)


def _clustered_unit_rows(path: Path, n: int, d: int, seed: int, chunk: int = 65_536) -> np.ndarray:
    """``(n, d)`` float32 unit rows around ``sqrt(n)`` random centres, written to a ``.npy`` chunk by
    chunk and returned memory-mapped read-only (like learned embeddings: clustered, not uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(int(np.sqrt(n)), d)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s0 in range(0, n, chunk):
        m = min(chunk, n - s0)
        x = centres[rng.integers(0, len(centres), m)] + 0.7 * rng.normal(size=(m, d)).astype(np.float32)
        out[s0 : s0 + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def scale(args: argparse.Namespace) -> dict:
    """Candidate search at scale (the embedding view, D = 128, top-32): exact chunked search and the
    approximate IVF index (:class:`privacy.search.SearchIndex`, exact re-ranking) side by side, on
    memory-mapped references, for each of ``--scale-refs``; half of the queries are planted copies
    (a reference plus noise), half are new points. Recall is measured against the exact top-32."""
    import tempfile

    from privacy.search import SearchIndex, exact_topk

    k, d = 32, 128
    rows = []
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_privacy_scale_") as tmp:
        for n in args.scale_refs:
            rng = np.random.default_rng(args.seed + n)
            row: dict = {"n_refs": n, "n_queries": args.scale_queries, "k": k, "dim": d}
            t = time.perf_counter()
            refs = _clustered_unit_rows(Path(tmp) / f"refs_{n}.npy", n, d, args.seed + n)
            row["seconds_data"] = round(time.perf_counter() - t, 1)
            n_copy = args.scale_queries // 2
            src = rng.choice(n, n_copy, replace=False)
            copies = np.asarray(refs[np.sort(src)]) + 0.1 * rng.normal(size=(n_copy, d)).astype(np.float32)
            src = np.sort(src)
            fresh = rng.normal(size=(args.scale_queries - n_copy, d)).astype(np.float32)
            q = np.concatenate([copies, fresh])
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            rss0 = _rss_mib()
            # exact baseline on every query, or on a sample (half planted, half new) timed and scaled
            m = min(args.scale_exact_sample or len(q), len(q))
            sub = np.r_[np.arange(m // 2), n_copy + np.arange(m - m // 2)] if m < len(q) else np.arange(len(q))
            t = time.perf_counter()
            es, ei = exact_topk(q[sub], refs, k)
            row["exact_seconds"] = round((time.perf_counter() - t) * len(q) / len(sub), 1)
            row["exact_queries_timed"] = int(len(sub))
            row["exact_rss_mib_after"] = _rss_mib()
            t = time.perf_counter()
            ann = SearchIndex(refs, approximate=True, seed=args.seed)
            row["ivf_build_seconds"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            s_, ai = ann.search(q, k)
            row["ivf_search_seconds"] = round(time.perf_counter() - t, 1)
            row["ivf_nlist"], row["ivf_nprobe"], row["ivf_rerank"] = ann.nlist, ann.nprobe, ann.rerank
            row["ivf_rss_mib_after"] = _rss_mib()
            rec = np.array([len(set(a) & set(b)) / k for a, b in zip(ai[sub], ei)])
            planted = sub < n_copy
            row["recall_at_32_planted"] = round(float(rec[planted].mean()), 4)
            row["recall_at_32_new"] = round(float(rec[~planted].mean()), 4)
            row["planted_source_top1_exact"] = round(float((ei[planted, 0] == src[sub[planted]]).mean()), 4)
            row["planted_source_top1_ivf"] = round(float((ai[:n_copy, 0] == src).mean()), 4)
            row["rss_mib_before_search"] = rss0
            row["reference_file_mib"] = round(n * d * 4 / 2**20, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del refs, ann
    out: dict = {"runs": rows, "threads_torch": torch.get_num_threads(), "peak_rss_mib": _rss_mib("VmHWM")}
    measured = {r["n_refs"] for r in rows}
    if 1_000_000 not in measured and len(rows) >= 2:
        # linear in n (both searches scan or probe a share of all references)
        a, b = rows[-2], rows[-1]
        ext = {}
        for key in ("exact_seconds", "ivf_build_seconds", "ivf_search_seconds"):
            slope = (b[key] - a[key]) / (b["n_refs"] - a["n_refs"])
            ext[key] = round(b[key] + slope * (1_000_000 - b["n_refs"]), 1)
        out["extrapolated_1e6"] = ext
    return out


def build_time(args: argparse.Namespace) -> dict:
    """Wall and CPU time of ``ReferenceIndex.build`` at the CLI defaults (``radsynth index --data
    TRAIN --holdout VAL``: alpha 0.01, review alpha 0.05, embedder seed 0) for each embedder step
    count in ``--build-steps``, side by side in one process; then a rebuild of the last one with
    ``previous=`` (the embedder cache)."""
    train, val = load_split(args)
    ids = [f"train_{i:05d}.png" for i in range(len(train))]
    hold_ids = [f"holdout:val_{i:04d}.png" for i in range(len(val))]
    out: dict = {"threads": torch.get_num_threads(), "n_train": len(train), "n_holdout": len(val), "runs": []}
    index = None
    for steps in args.build_steps:
        t, c = time.perf_counter(), time.process_time()
        index = ReferenceIndex.build(
            train, ids, holdout_images=val, holdout_ids=hold_ids, alpha=0.01, review_alpha=0.05,
            embedder_config=EmbedderConfig(steps=steps, seed=0), progress=False,
        )
        out["runs"].append({
            "embedder_steps": steps, "seconds_wall": round(time.perf_counter() - t, 1),
            "seconds_cpu": round(time.process_time() - c, 1),
            "seconds_embedder_wall": index.info["seconds_embedder"],
            "thresholds": {k: round(v, 4) for k, v in index.thresholds().items()},
        })
        print(json.dumps(out["runs"][-1]), flush=True)
    t, c = time.perf_counter(), time.process_time()
    again = ReferenceIndex.build(
        train, ids, holdout_images=val, holdout_ids=hold_ids, alpha=0.01, review_alpha=0.05,
        embedder_config=EmbedderConfig(steps=args.build_steps[-1], seed=0), progress=False, previous=index,
    )
    out["rebuild_same_data"] = {
        "embedder_steps": args.build_steps[-1], "embedder": again.info["embedder"],
        "seconds_wall": round(time.perf_counter() - t, 1), "seconds_cpu": round(time.process_time() - c, 1),
    }
    out["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return out


def steps_sweep(args: argparse.Namespace) -> dict:
    """The detection table (combined rule) for each embedder step count in ``--sweep-steps``."""
    rows = {}
    for steps in args.sweep_steps:
        args.steps = steps
        res = detection(args)
        rows[steps] = {
            "tpr_combined": {t: round(r["combined"], 3) for t, r in res["tpr"].items()},
            "fpr_all": round(res["fpr_all_negatives"]["combined"], 4),
            "fpr_without_near_duplicates": round(res["fpr_without_near_duplicates"]["combined"], 4),
            "seconds_build": res["seconds_build"],
            "repeated_fpr_new": res.get("repeated_fpr", {}).get("new", {}).get("fpr_all"),
        }
        print(json.dumps({steps: rows[steps]}), flush=True)
    return {"sweep": rows, "positives_per_transform": args.positives, "alpha": args.alpha}


def sweep_markdown(res: dict) -> str:
    steps = list(res["sweep"])
    lines = ["| transform | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for t in TRANSFORMS:
        lines.append(f"| {t} | " + " | ".join(f"{res['sweep'][s]['tpr_combined'][t]:.3f}" for s in steps) + " |")
    for key in ("fpr_all", "fpr_without_near_duplicates", "repeated_fpr_new", "seconds_build"):
        lines.append(f"| {key} | " + " | ".join(str(res["sweep"][s][key]) for s in steps) + " |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PneumoniaMNIST .npz")
    p.add_argument("--resolution", type=int, default=28, help="image side (upsampled from 28)")
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--positives", type=int, default=400, help="positives per transform")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="embedder training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine-top", type=int, default=2, help="NCC candidates per query refined to "
                   "sub-pixel alignment (0: grid search only, the behaviour before the refinement)")
    p.add_argument("--fpr-repeats", type=int, default=20,
                   help="random 50/50 calibration/measurement splits of the validation images (0: none)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice; 2 in --build-time; "
                   "1 is fastest on a CPU shared with other busy processes)")
    p.add_argument("--build-time", action="store_true",
                   help="time ReferenceIndex.build at the CLI defaults for each of --build-steps, then a rebuild")
    p.add_argument("--build-steps", type=_ints, default=[400, DEFAULT_STEPS],
                   help=f"embedder steps compared by --build-time (default 400,{DEFAULT_STEPS}: old and new default)")
    p.add_argument("--sweep-steps", type=_ints, help="run the detection table for each of these embedder steps")
    p.add_argument("--scale", action="store_true", help="run the scale benchmark instead")
    p.add_argument("--scale-refs", type=_ints, default=[100_000, 300_000],
                   help="reference counts of the scale benchmark (comma-separated)")
    p.add_argument("--scale-queries", type=int, default=10_000)
    p.add_argument("--scale-exact-sample", type=int, default=0,
                   help="run the exact baseline on this many queries only (half planted) and scale its time "
                        "(0: all queries)")
    args = p.parse_args(argv)
    if args.build_time and args.threads is None:
        args.threads = 2
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.scale:
        res = scale(args)
        print(json.dumps(res, indent=1))
    else:
        if not args.data.is_file():
            print(f"data not found: {args.data}", file=sys.stderr)
            return 2
        if args.build_time:
            res = build_time(args)
            print(json.dumps(res, indent=1))
        elif args.sweep_steps:
            res = steps_sweep(args)
            print(sweep_markdown(res))
        else:
            res = detection(args)
            print(markdown(res))
            print(json.dumps({k: v for k, v in res.items() if k != "tpr"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
