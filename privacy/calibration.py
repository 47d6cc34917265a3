"""Calibration of copy thresholds against a held-out null distribution (DESIGN.md §4).

The null distribution of a view is the nearest-training similarity of real images never used in
training (held-out → train). A threshold for false-flag rate ``alpha`` is the split-conformal
``(1 - alpha)`` quantile of that null: the ``k``-th smallest of the ``n`` null values with
``k = ceil((n + 1) (1 - alpha))``. An image is flagged when its score is *strictly* above the
threshold; for a new real image exchangeable with the held-out ones this false-flag probability is at
most ``alpha``. When ``alpha < 1 / (n + 1)`` the null is too small to resolve it and the largest null
value is used (and :func:`conformal_threshold` says so through ``resolvable``).

Combined decision (:class:`Calibration`): each fused view's similarity is standardized on its
null (robustly: median, and the distance from the median to the 0.9 quantile), the image's statistic is the *maximum* standardized
similarity over the fused views, and that statistic itself is calibrated conformally: the
threshold is the ``ceil((n + 1)(1 - alpha))``-th smallest statistic of the ``n`` held-out images.
So the false-flag rate of the decision actually applied ("some view is unusually similar") is at
most ``alpha``, whatever the dependence between views. Earlier versions thresholded each view at
``alpha / V`` (Bonferroni); when the null was too small to resolve ``alpha / V`` every view fell
back to its largest null value, and the union of ``V`` such rules let up to ``V / (n + 1)`` of
real unseen images through as copies. Each view's threshold in its own units is
``median_v + t * scale_v`` (``t`` the statistic's threshold), so an image is flagged exactly when
some view exceeds its own threshold.

The guarantee is marginal: averaged over held-out sets, at most ``alpha`` of new real images
exchangeable with the held-out ones are flagged. For one given held-out set the realised rate
varies around that (Beta-distributed); more held-out images narrow it. The null must hold at least
:func:`min_null_size` images to resolve ``alpha`` at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
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
    return n >= min_null_size(alpha)


def min_null_size(alpha: float) -> int:
    """Fewest null values that resolve ``alpha``: ``ceil(1 / alpha - 1)`` (99 for 0.01, 999 for 0.001).

    With fewer, the conformal rank exceeds ``n``; the largest null value would be the threshold and
    the false-flag rate could reach ``1 / (n + 1) > alpha``.

    Raises:
        ValueError: ``alpha`` outside ``(0, 1)``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return int(max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9)))


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


#: Floor of a view's null scale (similarities are O(1)).
_MIN_SCALE = 1e-6
#: Upper quantile of a view's null whose distance to the median is the view's scale.
SCALE_QUANTILE = 0.9


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64).ravel()
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Calibration:
    """Per-view null distributions, their standardization, and the null of the decision statistic.

    Construct with :meth:`fit` (or :meth:`from_dict`); instances are immutable and complete.

    Attributes:
        views: All view names with a null, in report order.
        fused_views: Views entering the decision statistic (a non-empty subset of ``views``).
        null: view name -> ``(n,)`` float64 held-out -> train nearest similarity (read-only).
        center: view name -> null median (standardization).
        scale: view name -> null 0.9-quantile minus median, floored at a quarter of the null's
            standard deviation and at ``1e-6`` (standardization): a robust measure of the upper
            tail, so that the maximum over views compares the views' tails on one scale.
        statistic_null: ``(n,)`` float64 decision statistic of the held-out images: the max over
            :attr:`fused_views` of the standardized similarity (read-only).
    """

    views: tuple[str, ...]
    fused_views: tuple[str, ...]
    null: Mapping[str, np.ndarray]
    center: Mapping[str, float]
    scale: Mapping[str, float]
    statistic_null: np.ndarray

    def __post_init__(self) -> None:
        views, fused = tuple(self.views), tuple(self.fused_views)
        if not views:
            raise ValueError("views must not be empty")
        unknown = [v for v in fused if v not in views]
        if not fused or unknown:
            raise ValueError(f"fused_views must be a non-empty subset of {list(views)}, got {list(fused)}")
        for name, m in (("null", self.null), ("center", self.center), ("scale", self.scale)):
            missing = [v for v in views if v not in m]
            if missing:
                raise ValueError(f"{name} has no entry for view(s) {missing}")
        lengths = {v: len(self.null[v]) for v in views}
        if min(lengths.values()) < 1 or len(set(lengths.values())) != 1:
            raise ValueError(f"null distributions must be non-empty and of equal length, got lengths {lengths}")
        if len(self.statistic_null) != lengths[views[0]]:
            raise ValueError(
                f"statistic_null has {len(self.statistic_null)} values but the null has {lengths[views[0]]}"
            )
        object.__setattr__(self, "views", views)
        object.__setattr__(self, "fused_views", fused)
        object.__setattr__(self, "null", MappingProxyType({v: _frozen(self.null[v]) for v in views}))
        object.__setattr__(self, "center", MappingProxyType({v: float(self.center[v]) for v in views}))
        object.__setattr__(self, "scale", MappingProxyType({v: max(float(self.scale[v]), _MIN_SCALE) for v in views}))
        object.__setattr__(self, "statistic_null", _frozen(self.statistic_null))

    @classmethod
    def fit(cls, null: Mapping[str, np.ndarray], fused_views: Sequence[str]) -> "Calibration":
        """Standardize each view on its null and compute the null of the decision statistic.

        Args:
            null: view name -> ``(n,)`` null similarities (same ``n`` for all views).
            fused_views: Views entering the decision (a non-empty subset of ``null``'s keys).

        Raises:
            ValueError: empty null, unequal lengths, non-finite values or unknown fused view.
        """
        views = list(null)
        arrays = {v: np.asarray(null[v], dtype=np.float64).ravel() for v in views}
        lengths = {v: len(a) for v, a in arrays.items()}
        if not views or min(lengths.values()) < 1:
            raise ValueError(f"null distributions must be non-empty, got lengths {lengths}")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"null distributions must have equal lengths, got lengths {lengths}")
        bad = [v for v, a in arrays.items() if not np.isfinite(a).all()]
        if bad:
            raise ValueError(f"null distributions of views {bad} contain NaN or infinite values")
        unknown = [v for v in fused_views if v not in null]
        if not fused_views or unknown:
            raise ValueError(f"fused_views must be a non-empty subset of {views}, got {list(fused_views)}")
        center = {v: float(np.median(a)) for v, a in arrays.items()}
        # robust upper-tail spread (the statistic is about the upper tail of each view); a quarter
        # standard deviation as the floor keeps a view whose null is mostly ties (e.g. a coarse hash)
        # from dominating the maximum
        scale = {
            v: max(float(np.quantile(a, SCALE_QUANTILE)) - center[v], float(a.std()) / 4.0, _MIN_SCALE)
            for v, a in arrays.items()
        }
        z = np.stack([(arrays[v] - center[v]) / scale[v] for v in fused_views])
        return cls(
            views=tuple(views), fused_views=tuple(fused_views), null=arrays, center=center, scale=scale,
            statistic_null=z.max(axis=0),
        )

    @property
    def n(self) -> int:
        """Number of held-out images in the null."""
        return int(len(self.statistic_null))

    def standardize(self, view: str, scores: np.ndarray) -> np.ndarray:
        """``(scores - center) / scale`` of ``view``'s null, float64."""
        return (np.asarray(scores, dtype=np.float64) - self.center[view]) / self.scale[view]

    def statistic(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Decision statistic: the maximum standardized similarity over :attr:`fused_views`.

        Args:
            scores: view name -> ``(Q,)`` nearest similarities.

        Returns:
            ``(Q,)`` float64.
        """
        return np.stack([self.standardize(v, scores[v]) for v in self.fused_views]).max(axis=0)

    def threshold(self, alpha: float) -> float:
        """Conformal threshold of the decision statistic at ``alpha`` (flag when strictly above).

        Raises:
            ValueError: ``alpha`` outside ``(0, 1)``.
        """
        return conformal_threshold(self.statistic_null, alpha)

    def view_thresholds(self, alpha: float) -> dict[str, float]:
        """Each fused view's threshold at ``alpha`` in that view's own units: ``center + t * scale``.

        An image's statistic exceeds :meth:`threshold` exactly when some fused view's similarity
        exceeds its entry here.
        """
        t = self.threshold(alpha)
        return {v: self.center[v] + t * self.scale[v] for v in self.fused_views}

    def p_value(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Conformal p-values ``(1 + #{null >= T}) / (n + 1)`` of the decision statistic ``T``.

        ``p <= alpha`` is the same decision as ``T > threshold(alpha)`` when ``alpha`` is resolvable.
        """
        return empirical_p_value(self.statistic(scores), self.statistic_null)

    def view_p_value(self, scores: np.ndarray, view: str) -> np.ndarray:
        """Conformal p-values of one view's similarities against that view's null (informative)."""
        return empirical_p_value(scores, self.null[view])

    def resolvable(self, alpha: float) -> bool:
        """Whether the null is large enough for ``alpha`` (see :func:`min_null_size`)."""
        return alpha_resolvable(self.n, alpha)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (null values included, as lists)."""
        return {
            "kind": "max-standardized",
            "scale_quantile": SCALE_QUANTILE,
            "views": list(self.views),
            "fused_views": list(self.fused_views),
            "center": dict(self.center),
            "scale": dict(self.scale),
            "null": {v: [float(x) for x in self.null[v]] for v in self.views},
            "statistic_null": [float(x) for x in self.statistic_null],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a calibration of another kind (e.g. from an older index) or missing keys.
        """
        if d.get("kind") != "max-standardized":
            raise ValueError(
                f"calibration kind {d.get('kind')!r} is not 'max-standardized'; rebuild the index with "
                "this RadSynth ('radsynth index ... --overwrite')"
            )
        try:
            return cls(
                views=tuple(d["views"]),
                fused_views=tuple(d["fused_views"]),
                null={v: np.asarray(d["null"][v], dtype=np.float64) for v in d["views"]},
                center={k: float(v) for k, v in d["center"].items()},
                scale={k: float(v) for k, v in d["scale"].items()},
                statistic_null=np.asarray(d["statistic_null"], dtype=np.float64),
            )
        except KeyError as exc:
            raise ValueError(f"calibration is missing the key {exc.args[0]!r}") from None
