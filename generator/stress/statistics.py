"""Statistics of a stress test: per cell, per attribute value, per change of a value, with bootstrap CIs.

Unit of resampling: the *set* (one seed, or one real input image), because the images of a set share
their noise and are not independent. Every estimate is a ratio of per-set sums, so one table of
multinomial set weights ``(B, S)`` (row 0 = all ones, the point estimate) gives all bootstrap replicates
at once; differences between groups (gaps) use the same weights, i.e. a paired bootstrap. CIs are the
2.5 and 97.5 percentiles of the replicates (a replicate whose denominator is zero is left out).

Definitions (``pred = score >= threshold``; a cell's expected class comes from the spec's labels):

- ``accuracy``, ``sensitivity`` (over positive images), ``specificity`` (negative images),
  ``mean_score``; ``auroc`` between the positive and negative images of a group (Mann-Whitney, ties 1/2).
- ``flip_rate`` of a change of one attribute (a pair of images, same set, all other values equal):
  the share of pairs where the prediction changes though the expected class stays, or stays though the
  expected class changes.
- ``score_shift``: mean of ``score(after) - score(before)`` over those pairs.
- ``ssim`` / ``mean_abs_diff`` between the two images of a pair, over the whole image and, where the
  spec says which region should change, outside it (``ssim_outside``, ``mean_abs_diff_outside``).
- ``gap``: metric of value ``b``'s subgroup minus value ``a``'s, on the same seeds.

An effect is *flagged* when its whole 95% CI lies beyond the spec's ``tolerance`` from no effect: a flip
rate of a change that keeps the expected class with ``ci_low > tolerance``, or a sensitivity /
specificity gap with ``ci_low > tolerance`` or ``ci_high < -tolerance``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from generator.stress.counterfactuals import CounterfactualTable
from generator.stress.regions import RegionMaps
from generator.stress.spec import PairKind, StressSpec

__all__ = ["Estimate", "SetBootstrap", "masked_ssim", "analyse", "ci_half_width", "seeds_for_half_width"]


@dataclass(frozen=True)
class Estimate:
    """A value with its bootstrap 95% CI (``NaN`` bounds when not estimable)."""

    value: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float | None]:
        """``{"value", "ci_low", "ci_high"}`` (NaN written as ``None``)."""
        def clean(x: float) -> float | None:
            return None if not np.isfinite(x) else round(float(x), 6)

        return {"value": clean(self.value), "ci_low": clean(self.ci_low), "ci_high": clean(self.ci_high)}

    def beyond(self, tolerance: float) -> bool:
        """The whole CI lies above ``tolerance`` or below ``-tolerance``."""
        return bool(np.isfinite(self.ci_low) and (self.ci_low > tolerance or self.ci_high < -tolerance))


class SetBootstrap:
    """Multinomial weights over sets: row 0 all ones, rows 1..B resamples with replacement.

    Args:
        n_sets: Number of sets ``S`` (>= 1).
        n_boot: Bootstrap replicates ``B`` (>= 100).
        seed: Seed of the resampling.

    Raises:
        ValueError: ``n_sets`` < 1 or ``n_boot`` < 100.
    """

    def __init__(self, n_sets: int, n_boot: int = 2000, seed: int = 0) -> None:
        if n_sets < 1:
            raise ValueError(f"need at least one set of images, got {n_sets}")
        if n_boot < 100:
            raise ValueError(f"--bootstrap must be >= 100 replicates, got {n_boot}")
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(n_sets, np.full(n_sets, 1.0 / n_sets), size=n_boot).astype(np.float64)
        self.weights = np.vstack([np.ones((1, n_sets)), draws])  # (B + 1, S)

    def summarise(self, values: np.ndarray) -> Estimate:
        """Point value (row 0) and percentile CI of replicate values ``(B + 1,)``."""
        point = float(values[0])
        reps = values[1:][np.isfinite(values[1:])]
        if not np.isfinite(point) or len(reps) < 0.5 * (len(values) - 1):
            return Estimate(point, float("nan"), float("nan"))
        lo, hi = np.percentile(reps, [2.5, 97.5])
        return Estimate(point, float(lo), float(hi))

    def ratio(self, num: np.ndarray, den: np.ndarray) -> Estimate:
        """Estimate of ``sum(num) / sum(den)`` from per-set sums ``(S,)``."""
        n, d = self.weights @ num, self.weights @ den
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.summarise(np.where(d > 0, n / np.where(d > 0, d, 1), np.nan))

    def ratio_values(self, num: np.ndarray, den: np.ndarray) -> np.ndarray:
        """Replicate values ``(B + 1,)`` of ``sum(num) / sum(den)`` (NaN where ``den`` sums to 0)."""
        n, d = self.weights @ num, self.weights @ den
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(d > 0, n / np.where(d > 0, d, 1), np.nan)

    def auroc_values(self, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        """Replicate AUROCs ``(B + 1,)`` of positive vs negative scores.

        Args:
            pos: ``(S, P)`` scores of positive images per set (NaN = absent).
            neg: ``(S, N)`` scores of negative images per set (NaN = absent).
        """
        s = pos.shape[0]
        a = np.zeros((s, s))
        for p in range(pos.shape[1]):
            for q in range(neg.shape[1]):
                x, y = pos[:, p][:, None], neg[:, q][None, :]
                with np.errstate(invalid="ignore"):
                    k = (x > y) + 0.5 * (x == y)
                a += np.where(np.isfinite(x) & np.isfinite(y), k, 0.0)
        n_pos = np.isfinite(pos).sum(axis=1).astype(np.float64)
        n_neg = np.isfinite(neg).sum(axis=1).astype(np.float64)
        w = self.weights
        num = np.einsum("bi,ij,bj->b", w, a, w)
        den = (w @ n_pos) * (w @ n_neg)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def ci_half_width(p: float, n: int) -> float:
    """Normal-approximation 95% CI half-width of a rate ``p`` estimated from ``n`` independent pairs."""
    return 1.96 * float(np.sqrt(p * (1.0 - p) / n))


def seeds_for_half_width(p: float, half_width: float) -> int:
    """Seeds needed for a 95% CI half-width ``half_width`` around a rate ``p`` (one pair per seed).

    Raises:
        ValueError: ``p`` outside ``(0, 1)`` or ``half_width`` not positive.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not half_width > 0:
        raise ValueError(f"half_width must be > 0, got {half_width}")
    return int(np.ceil((1.96 / half_width) ** 2 * p * (1.0 - p)))


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SSIM of two images averaged over ``mask`` (same window and constants as
    :func:`generator.evaluation.metrics.ssim`: Gaussian sigma 1.5, truncate 3.5, K1 0.01, K2 0.03,
    5-pixel border cropped).

    Args:
        a: ``(H, W)`` in ``[0, 1]``, ``H, W >= 11``.
        b: Same shape.
        mask: ``bool (H, W)``: pixels to average over (``None``: all).

    Returns:
        Mean SSIM over the mask (NaN when the mask is empty inside the border).
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)

    def filt(z: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5, mode="reflect")

    c1, c2 = 0.01**2, 0.03**2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    keep = np.zeros_like(smap, dtype=bool)
    keep[5:-5, 5:-5] = True
    if mask is not None:
        keep &= mask
    return float(smap[keep].mean()) if keep.any() else float("nan")


def _metrics_of(boot: SetBootstrap, scores: np.ndarray, labels: np.ndarray, pred: np.ndarray,
                cells: list[int], vs_pos: list[int] | None = None, vs_neg: list[int] | None = None
                ) -> tuple[dict[str, Estimate], dict[str, np.ndarray]]:
    """Metrics of the images of ``cells``; AUROC against ``vs_*`` cells where the group lacks a class."""
    present = np.isfinite(scores)
    out: dict[str, Estimate] = {}
    reps: dict[str, np.ndarray] = {}
    idx = np.asarray(cells)
    lab = labels[idx]
    pr, pz = present[:, idx], pred[:, idx]
    correct = (pz == lab[None, :]) & pr
    n = pr.sum(axis=1).astype(float)
    for name, sel in (("accuracy", np.ones_like(lab, bool)), ("sensitivity", lab == 1), ("specificity", lab == 0)):
        if not sel.any():
            continue
        reps[name] = boot.ratio_values(correct[:, sel].sum(axis=1).astype(float), pr[:, sel].sum(axis=1).astype(float))
        out[name] = boot.summarise(reps[name])
    sc = np.where(pr, scores[:, idx], 0.0)
    out["mean_score"] = boot.ratio(sc.sum(axis=1), n)
    pos_cells = [c for c in cells if labels[c] == 1] or list(vs_pos or [])
    neg_cells = [c for c in cells if labels[c] == 0] or list(vs_neg or [])
    if pos_cells and neg_cells:
        reps["auroc"] = boot.auroc_values(scores[:, pos_cells], scores[:, neg_cells])
        out["auroc"] = boot.summarise(reps["auroc"])
    return out, reps


def _dict(metrics: dict[str, Estimate]) -> dict[str, Any]:
    return {k: v.to_dict() for k, v in metrics.items()}


def analyse(spec: StressSpec, table: CounterfactualTable, scores: np.ndarray, *, n_boot: int = 2000,
            seed: int = 0, regions: RegionMaps | None = None,
            original_scores: np.ndarray | None = None) -> dict[str, Any]:
    """All statistics of a stress test, as the JSON sections of ``report.json``.

    Args:
        spec: The spec (threshold, tolerance, labels).
        table: The images by set and cell.
        scores: ``(S, C)`` positive-class scores (NaN where the image is missing).
        n_boot: Bootstrap replicates.
        seed: Seed of the bootstrap.
        regions: Where each change should act (for ``*_outside`` similarity), or ``None``.
        original_scores: ``(S,)`` scores of the real input images (edit runs), or ``None``.

    Returns:
        ``{"overall", "cells", "subgroups", "pairs", "gaps", "edits", "worst", "flags", "pair_examples"}``;
        every metric is ``{"value", "ci_low", "ci_high"}``.

    Raises:
        ValueError: ``scores`` does not have the table's ``(S, C)`` shape.
    """
    cells = spec.cells
    s_count, c_count = len(table.set_ids), len(cells)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (s_count, c_count):
        raise ValueError(f"scores must have shape ({s_count}, {c_count}), got {scores.shape}")
    boot = SetBootstrap(s_count, n_boot, seed)
    labels = np.array([c.label for c in cells])
    present = np.isfinite(scores)
    pred = np.where(present, scores >= spec.threshold, False)
    all_cells = list(range(c_count))
    pos_all = [c for c in all_cells if labels[c] == 1]
    neg_all = [c for c in all_cells if labels[c] == 0]

    overall, _ = _metrics_of(boot, scores, labels, pred, all_cells)
    if pos_all and neg_all:
        hits = ((pred == labels[None, :]) & present).astype(float)
        n_img = present.astype(float)
        sens = boot.ratio_values(hits[:, pos_all].sum(1), n_img[:, pos_all].sum(1))
        spec_v = boot.ratio_values(hits[:, neg_all].sum(1), n_img[:, neg_all].sum(1))
        overall["balanced_accuracy"] = boot.summarise(0.5 * (sens + spec_v))

    # cells: AUROC against the opposite-label cells with the same nuisance values
    nuisance = spec.nuisance_attributes
    cell_rows = []
    for c in cells:
        same_context = [o.index for o in cells if all(str(o.values[a]) == str(c.values[a]) for a in nuisance)]
        opposite = [o for o in same_context if labels[o] != c.label]
        m, _ = _metrics_of(boot, scores, labels, pred, [c.index],
                           vs_pos=opposite if c.label == 0 else None, vs_neg=opposite if c.label == 1 else None)
        cell_rows.append({"id": c.index, "attributes": {**spec.fixed, **c.values}, "varied": c.values,
                          "prompt": c.prompt, "expected_label": c.label, "n": int(present[:, c.index].sum()),
                          "metrics": _dict(m)})

    # subgroups: one per varied attribute value (pooled over the other varied attributes)
    subgroup_rows, sub_reps = [], {}
    for attr, values in spec.vary.items():
        for v in values:
            members = [c.index for c in cells if str(c.values[attr]) == str(v)]
            m, reps = _metrics_of(boot, scores, labels, pred, members, vs_pos=pos_all, vs_neg=neg_all)
            sub_reps[(attr, str(v))] = reps
            subgroup_rows.append({"attribute": attr, "value": v, "n": int(present[:, members].sum()),
                                  "metrics": _dict(m)})

    # gaps between values of one attribute, paired on the seeds
    gap_rows = []
    for attr, values in spec.vary.items():
        for a, b in itertools.combinations(values, 2):
            ra, rb = sub_reps[(attr, str(a))], sub_reps[(attr, str(b))]
            same_mix = ({cells[c].label for c in range(c_count) if str(cells[c].values[attr]) == str(a)}
                        == {cells[c].label for c in range(c_count) if str(cells[c].values[attr]) == str(b)})
            for metric in ("sensitivity", "specificity", "auroc"):
                if metric in ra and metric in rb and (metric != "auroc" or same_mix):
                    est = boot.summarise(rb[metric] - ra[metric])
                    flagged = metric != "auroc" and est.beyond(spec.tolerance)
                    gap_rows.append({"attribute": attr, "a": a, "b": b, "metric": metric,
                                     "gap": est.to_dict(), "flagged": flagged})

    # pairs: one entry per change of a varied attribute's value
    pair_rows, examples = [], []
    size = table.images.shape[-1]
    for pt in spec.pair_types:
        f_idx = np.array([f for f, _ in pt.members])
        t_idx = np.array([t for _, t in pt.members])
        valid = present[:, f_idx] & present[:, t_idx]  # (S, M)
        label_change = labels[f_idx] != labels[t_idx]  # (M,)
        pred_change = pred[:, f_idx] != pred[:, t_idx]
        flip = (pred_change != label_change[None, :]) & valid
        shift = np.where(valid, scores[:, t_idx] - scores[:, f_idx], 0.0)
        nval = valid.sum(axis=1).astype(float)
        row: dict[str, Any] = {
            "attribute": pt.attribute, "from": pt.from_value, "to": pt.to_value, "kind": pt.kind.value,
            "n": int(valid.sum()),
            "flip_rate": boot.ratio(flip.sum(axis=1).astype(float), nval).to_dict(),
            "score_shift": boot.ratio(shift.sum(axis=1), nval).to_dict(),
        }
        sims: dict[str, np.ndarray] = {k: np.zeros(valid.shape) for k in
                                       ("ssim", "mean_abs_diff", "ssim_outside", "mean_abs_diff_outside")}
        have_outside = np.zeros(valid.shape, dtype=bool)
        for m, (f, t) in enumerate(pt.members):
            region = regions.mask(pt.attribute, pt.from_value, pt.to_value, cells[f].prompt, cells[t].prompt) \
                if regions is not None else None
            outside = None if region is None else ~region
            for s in np.flatnonzero(valid[:, m]):
                ia, ib = table.images[s, f], table.images[s, t]
                if size >= 11:
                    sims["ssim"][s, m] = masked_ssim(ia, ib)
                sims["mean_abs_diff"][s, m] = float(np.abs(ia - ib).mean())
                if outside is not None and outside.any():
                    so = masked_ssim(ia, ib, outside) if size >= 11 else float("nan")
                    if np.isfinite(so):
                        sims["ssim_outside"][s, m] = so
                        sims["mean_abs_diff_outside"][s, m] = float(np.abs(ia - ib)[outside].mean())
                        have_outside[s, m] = True
                if flip[s, m]:
                    examples.append({"pair": pt.name, "attribute": pt.attribute, "kind": pt.kind.value,
                                     "set_id": table.set_ids[s], "from_file": table.files[s][f],
                                     "to_file": table.files[s][t], "from_prompt": cells[f].prompt,
                                     "to_prompt": cells[t].prompt, "from_score": float(scores[s, f]),
                                     "to_score": float(scores[s, t]), "expected": [int(labels[f]), int(labels[t])],
                                     "severity": float(abs(scores[s, t] - scores[s, f]))})
        if size >= 11:
            row["ssim"] = boot.ratio(sims["ssim"].sum(axis=1), nval).to_dict()
        row["mean_abs_diff"] = boot.ratio(sims["mean_abs_diff"].sum(axis=1), nval).to_dict()
        if have_outside.any():
            nout = have_outside.sum(axis=1).astype(float)
            if size >= 11:
                row["ssim_outside"] = boot.ratio(sims["ssim_outside"].sum(axis=1), nout).to_dict()
            row["mean_abs_diff_outside"] = boot.ratio(sims["mean_abs_diff_outside"].sum(axis=1), nout).to_dict()
        flip_est = boot.ratio(flip.sum(axis=1).astype(float), nval)
        row["flagged"] = bool(pt.kind == PairKind.SAME_LABEL and np.isfinite(flip_est.ci_low)
                              and flip_est.ci_low > spec.tolerance)
        pair_rows.append(row)

    # real-image edits: original -> each cell's edit
    edit_rows = []
    if table.originals is not None and original_scores is not None:
        olab = table.original_labels if table.original_labels is not None else np.full(s_count, -1)
        for c in cells:
            valid = present[:, c.index]
            nval = valid.astype(float)
            shift = np.where(valid, scores[:, c.index] - original_scores, 0.0)
            diffs = np.array([float(np.abs(table.images[s, c.index] - table.originals[s]).mean()) if valid[s] else 0.0
                              for s in range(s_count)])
            row = {"to": c.values, "prompt": c.prompt, "n": int(valid.sum()),
                   "score_shift": boot.ratio(shift, nval).to_dict(),
                   "mean_abs_diff": boot.ratio(diffs, nval).to_dict()}
            if size >= 11:
                ss = np.array([masked_ssim(table.images[s, c.index], table.originals[s]) if valid[s] else 0.0
                               for s in range(s_count)])
                row["ssim"] = boot.ratio(ss, nval).to_dict()
            known = valid & (olab >= 0)
            if known.any():
                opred = original_scores >= spec.threshold
                flip = ((opred != pred[:, c.index]) != (olab != c.label)) & known
                row["flip_rate"] = boot.ratio(flip.astype(float), known.astype(float)).to_dict()
            edit_rows.append(row)

    # worst subgroup and cell by accuracy
    def worst(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        scored = [r for r in rows if r["metrics"].get("accuracy", {}).get("value") is not None]
        return min(scored, key=lambda r: r["metrics"]["accuracy"]["value"]) if scored else None

    flags = []
    for r in pair_rows:
        if r["flagged"]:
            flags.append({"kind": "flip_rate", "what": f"{r['attribute']}: {r['from']} -> {r['to']}",
                          "estimate": r["flip_rate"],
                          "reason": f"the prediction changes in {r['flip_rate']['value']:.0%} of pairs though the "
                                    f"expected class stays (95% CI above the tolerance {spec.tolerance})"})
    for g in gap_rows:
        if g["flagged"]:
            flags.append({"kind": f"{g['metric']}_gap", "what": f"{g['attribute']}: {g['a']} vs {g['b']}",
                          "estimate": g["gap"],
                          "reason": f"{g['metric']} differs by {g['gap']['value']:+.2f} between {g['a']!r} and "
                                    f"{g['b']!r} (95% CI beyond ±{spec.tolerance})"})
    examples.sort(key=lambda e: -e["severity"])
    return {
        "overall": _dict(overall), "cells": cell_rows, "subgroups": subgroup_rows, "pairs": pair_rows,
        "gaps": gap_rows, "edits": edit_rows, "worst": {"subgroup": worst(subgroup_rows), "cell": worst(cell_rows)},
        "flags": flags, "pair_examples": examples,
    }

