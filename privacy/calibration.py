"""Calibration of copy thresholds against a held-out null distribution (DESIGN.md §4).

The null distribution of a view is the nearest-training similarity of real images never used in
training (held-out → train). A threshold for false-flag rate ``alpha`` is the split-conformal
``(1 - alpha)`` quantile of that null: the ``k``-th smallest of the ``n`` null values with
``k = ceil((n + 1) (1 - alpha))``. An image is flagged when its score is *strictly* above the
threshold; for a new real image exchangeable with the held-out ones this false-flag probability is at
most ``alpha``. When ``alpha < 1 / (n + 1)`` the null is too small to resolve it and the largest null
value is used (and :func:`conformal_threshold` says so through ``resolvable``).

Combined decision (:meth:`Calibration.margin`): an image is flagged when ANY fused view exceeds
its own threshold at ``alpha / V`` (``V`` views, Bonferroni), so the combined false-flag rate is at
most ``alpha`` whatever the dependence between views. The single number reported per image is the
largest relative margin over those thresholds (flagged when ``> 0``); its p-value is the Bonferroni
``min(1, V * min_v p_v)``. A max-of-z-scores fusion (:meth:`Calibration.fuse`) is kept for
reporting; with a small null its threshold is set by a single outlier in any view, which is why it
is not the decision rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np


def conformal_rank(n: int, alpha: float) -> int:
    """1-based rank ``k = min(n, ceil((n + 1)(1 - alpha)))`` of the threshold in the sorted null.

    Raises:
        ValueError: ``n < 1`` or ``alpha`` outside ``(0, 1)``.
    """
    if n < 1:
        raise ValueError(f"the null distribution is empty (n={n})")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    # small epsilon guards against (n+1)(1-alpha) landing a hair above an integer in floating point
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    return int(min(max(k, 1), n))


def conformal_threshold(null: np.ndarray, alpha: float) -> float:
    """Threshold whose exceedance rate on exchangeable real images is at most ``alpha``.

    Args:
        null: ``(n,)`` held-out → train similarity scores.
        alpha: Target false-flag rate in ``(0, 1)``.

    Returns:
        The ``conformal_rank(n, alpha)``-th smallest null value.
    """
    null = np.sort(np.asarray(null, dtype=np.float64).ravel())
    return float(null[conformal_rank(len(null), alpha) - 1])


def alpha_resolvable(n: int, alpha: float) -> bool:
    """Whether ``n`` null values can resolve ``alpha`` (``alpha >= 1 / (n + 1)``)."""
    return alpha >= 1.0 / (n + 1)


def empirical_p_value(scores: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Conformal p-value ``(1 + #{null >= s}) / (n + 1)`` of each score.

    Args:
        scores: ``(Q,)`` scores of images under test.
        null: ``(n,)`` null scores.

    Returns:
        ``(Q,)`` float64 p-values in ``(0, 1]``; small means "more similar to training than real
        held-out images are".
    """
    null = np.sort(np.asarray(null, dtype=np.float64).ravel())
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_ge = len(null) - np.searchsorted(null, scores, side="left")
    return (1.0 + n_ge) / (len(null) + 1.0)


def patient_disjoint_split(
    patient_ids: Sequence[str | None],
    holdout_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split images into reference and held-out sets with no patient on both sides.

    Images without a patient id are treated as their own patient.

    Args:
        patient_ids: ``(N,)`` patient id per image (``None`` when unknown).
        holdout_fraction: Target share of *patients* held out, in ``(0, 1)``.
        seed: Shuffle seed.

    Returns:
        ``(ref_idx, holdout_idx)`` sorted int64 index arrays, both non-empty.

    Raises:
        ValueError: bad ``holdout_fraction`` or fewer than two patients.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    keys = [f"pid:{p}" if p is not None else f"img:{i}" for i, p in enumerate(patient_ids)]
    groups = sorted(set(keys))
    if len(groups) < 2:
        raise ValueError(
            f"cannot split {len(keys)} images from {len(groups)} patient(s) into disjoint "
            "reference and held-out sets; pass a separate --holdout folder"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    n_hold = int(min(max(1, round(holdout_fraction * len(groups))), len(groups) - 1))
    held = {groups[j] for j in order[:n_hold]}
    mask = np.array([k in held for k in keys])
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


@dataclass
class Calibration:
    """Per-view null statistics and the fused-score null.

    Attributes:
        views: View names in fusion order.
        null: view name -> ``(n,)`` held-out → train nearest similarity.
        fused_null: ``(n,)`` fused score of the held-out images.
        mean: view name -> null mean (standardization).
        std: view name -> null standard deviation (standardization, floored at 1e-6).
        fused_views: Views entering the fused score (others are reported only).
    """

    views: list[str]
    null: dict[str, np.ndarray]
    fused_views: list[str]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    fused_null: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def fit(cls, null: Mapping[str, np.ndarray], fused_views: Sequence[str]) -> "Calibration":
        """Standardize each view on its null and compute the fused null.

        Args:
            null: view name -> ``(n,)`` null similarities (same ``n`` for all views).
            fused_views: Views to fuse (a non-empty subset of ``null``'s keys).

        Raises:
            ValueError: empty null, unequal lengths or unknown fused view.
        """
        views = list(null)
        lengths = {v: len(np.asarray(null[v])) for v in views}
        if not views or min(lengths.values()) < 1:
            raise ValueError(f"null distributions must be non-empty, got lengths {lengths}")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"null distributions must have equal lengths, got {lengths}")
        unknown = [v for v in fused_views if v not in null]
        if not fused_views or unknown:
            raise ValueError(f"fused_views must be a non-empty subset of {views}, got {list(fused_views)}")
        arrays = {v: np.asarray(null[v], dtype=np.float64).ravel() for v in views}
        cal = cls(
            views=views,
            null=arrays,
            fused_views=list(fused_views),
            mean={v: float(arrays[v].mean()) for v in views},
            std={v: float(max(arrays[v].std(), 1e-6)) for v in views},
        )
        cal.fused_null = cal.fuse(arrays)
        return cal

    @property
    def n(self) -> int:
        """Number of held-out images in the null."""
        return int(len(self.fused_null))

    def standardize(self, view: str, scores: np.ndarray) -> np.ndarray:
        """``(scores - mean) / std`` of ``view``'s null."""
        return (np.asarray(scores, dtype=np.float64) - self.mean[view]) / self.std[view]

    def fuse(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Fused score: the maximum standardized similarity over :attr:`fused_views`.

        Args:
            scores: view name -> ``(Q,)`` nearest similarities.

        Returns:
            ``(Q,)`` float64 fused scores.
        """
        z = np.stack([self.standardize(v, scores[v]) for v in self.fused_views])
        return z.max(axis=0)

    def threshold(self, alpha: float, view: str | None = None) -> float:
        """Conformal threshold at ``alpha`` for ``view`` (``None``: the fused score)."""
        null = self.fused_null if view is None else self.null[view]
        return conformal_threshold(null, alpha)

    def p_value(self, scores: np.ndarray, view: str | None = None) -> np.ndarray:
        """Empirical p-values of ``scores`` for ``view`` (``None``: fused)."""
        null = self.fused_null if view is None else self.null[view]
        return empirical_p_value(scores, null)

    def view_thresholds(self, alpha: float) -> dict[str, float]:
        """Each fused view's threshold at ``alpha / V`` (Bonferroni share of ``alpha``)."""
        a = alpha / len(self.fused_views)
        return {v: conformal_threshold(self.null[v], a) for v in self.fused_views}

    def margin(self, scores: Mapping[str, np.ndarray], alpha: float) -> np.ndarray:
        """Combined decision score: ``max_v (s_v - t_v) / (t_v - median_v)`` over fused views.

        ``t_v`` is the view's threshold at ``alpha / V``; the image is flagged when the margin is
        ``> 0`` (some view above its threshold).

        Args:
            scores: view name -> ``(Q,)`` nearest similarities.
            alpha: Combined false-flag rate.

        Returns:
            ``(Q,)`` float64 margins.
        """
        thr = self.view_thresholds(alpha)
        out = []
        for v in self.fused_views:
            scale = max(thr[v] - float(np.median(self.null[v])), 1e-6)
            out.append((np.asarray(scores[v], dtype=np.float64) - thr[v]) / scale)
        return np.stack(out).max(axis=0)

    def combined_p_value(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Bonferroni p-value ``min(1, V * min_v p_v)`` over the fused views."""
        p = np.stack([self.p_value(scores[v], v) for v in self.fused_views]).min(axis=0)
        return np.minimum(1.0, len(self.fused_views) * p)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (null values included, as lists)."""
        return {
            "views": self.views,
            "fused_views": self.fused_views,
            "mean": self.mean,
            "std": self.std,
            "null": {v: [float(x) for x in self.null[v]] for v in self.views},
            "fused_null": [float(x) for x in self.fused_null],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
        """Inverse of :meth:`to_dict`."""
        return cls(
            views=list(d["views"]),
            null={v: np.asarray(d["null"][v], dtype=np.float64) for v in d["views"]},
            fused_views=list(d["fused_views"]),
            mean={k: float(v) for k, v in d["mean"].items()},
            std={k: float(v) for k, v in d["std"].items()},
            fused_null=np.asarray(d["fused_null"], dtype=np.float64),
        )
