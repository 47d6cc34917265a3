"""Per-image verdicts and the dataset summary of a memorization audit (DESIGN.md §4).

:func:`audit_images` scores images against a :class:`~privacy.index.ReferenceIndex` and returns an
:class:`AuditResult`: one :class:`ImageVerdict` per image (``keep`` / ``review`` / ``reject`` with
reasons, top-k training neighbours per view, p-value, nearest/second-nearest ratio) and a summary
(copy rate, share of training images and patients copied, similarity quantiles synthetic→train
against held-out→train, authenticity share, expected chance flags, a planted-copy self-test).

Decision rule, per image (:class:`Verdict`):
- ``reject``: the decision statistic (max over views of the standardized nearest similarity) is
  above its conformal threshold at ``alpha``, i.e. some view's nearest similarity exceeds that
  view's threshold at ``alpha`` (so at most ``alpha`` of real unseen images are flagged, the
  views taken together), or the pixel correlation with a training image is at least the index's
  ``leak_threshold`` (a near-exact copy).
- ``review``: the same at ``review_alpha``.
- ``keep``: otherwise.

Splitting an audit across processes (``radsynth audit`` under ``torchrun``/``accelerate launch``):
each process turns its share of the images into verdicts with :func:`audit_verdicts`, writes them
with :func:`verdict_to_record` (lossless JSON), and one process reads them back with
:func:`verdict_from_record` and builds the :class:`AuditResult` with :func:`merge_verdict_parts`.
The summary is a function of the verdicts alone (:func:`summarize_verdicts`, which
:func:`audit_images` uses too), so the merged result equals the single-process one whenever each
image's scores do not depend on which other images were scored with it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from privacy.index import VIEW_NAMES, ReferenceIndex, Scores

#: What a passed audit means, stated in every summary.
GUARANTEE_STATEMENT = (
    "A passed audit means that no synthetic image was more similar to a training image, under the "
    "views measured (pixel correlation over flips and small shifts, perceptual hash, a copy-detection "
    "embedding), than real images never used in training usually are, at the stated false-flag rate "
    "alpha. It does not prove that no training information leaked: copies under transforms the views "
    "do not capture, partial copies, and attribute or membership inference are not ruled out. Only "
    "differentially private training gives a formal privacy guarantee."
)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


class Verdict(str, enum.Enum):
    """Outcome of the audit of one image (a ``str``, so it compares and serialises as its value)."""

    KEEP = "keep"
    REVIEW = "review"
    REJECT = "reject"

    def __str__(self) -> str:
        return self.value


#: The verdicts, mildest first.
VERDICTS: tuple[Verdict, ...] = (Verdict.KEEP, Verdict.REVIEW, Verdict.REJECT)


@dataclass(frozen=True)
class ImageVerdict:
    """The audit of one image.

    Every similarity sits beside its own threshold in the same units: view ``v`` flags the image
    when ``similarity[v] > view_thresholds[v]`` (for ``ncc`` also when it reaches the index's
    ``leak_threshold``, which caps ``view_thresholds["ncc"]``).

    Attributes:
        file_name: The image's id (file name in the synthetic folder).
        verdict: :class:`Verdict`.
        reasons: Human-readable reasons (empty for ``keep``).
        similarity: view -> nearest training similarity (raw, in the view's units).
        view_thresholds: view -> that view's threshold at :attr:`alpha` (same units).
        review_thresholds: view -> that view's threshold at :attr:`review_alpha`.
        deciding_view: The view closest to (or farthest above) its threshold at :attr:`alpha`,
            relative to the view's null spread: the reason for ``reject``, or the nearest call for
            ``keep``.
        score: Decision statistic (max over views of the similarity standardized on the held-out
            null: ``(similarity - null median) / null scale``).
        threshold: The statistic's conformal threshold at :attr:`alpha` (``reject`` above it).
        review_threshold: The statistic's threshold at :attr:`review_alpha`.
        alpha: False-flag rate used for ``reject``.
        review_alpha: False-flag rate used for ``review``.
        p_value: Conformal p-value of :attr:`score` against the held-out null of the statistic.
        neighbours: view -> top-k ``{"id", "similarity", "patient_id"}`` dicts.
        nn_ratio: Embedding-view distance ratio ``(1 - s1) / (1 - s2)``; near 0 means one training
            image stands out (copy-like), near 1 means several are equally close.
        nearest_patient_id: Patient of the nearest training image (pixel view), if known.
        authentic: Whether the image is farther (embedding view) from its nearest training image
            than that image is from its own nearest training neighbour.
    """

    file_name: str
    verdict: Verdict
    reasons: tuple[str, ...]
    similarity: Mapping[str, float]
    view_thresholds: Mapping[str, float]
    review_thresholds: Mapping[str, float]
    deciding_view: str
    score: float
    threshold: float
    review_threshold: float
    alpha: float
    review_alpha: float
    p_value: float
    neighbours: Mapping[str, list[dict[str, Any]]]
    nn_ratio: float
    nearest_patient_id: str | None = None
    authentic: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", Verdict(self.verdict))
        object.__setattr__(self, "reasons", tuple(self.reasons))
        if self.deciding_view not in self.view_thresholds or self.deciding_view not in self.similarity:
            raise ValueError(
                f"deciding_view {self.deciding_view!r} must be one of the thresholded views {list(self.view_thresholds)}"
            )

    @property
    def nearest_ids(self) -> list[str]:
        """Ids of the nearest training images in the pixel view, best first."""
        return [n["id"] for n in self.neighbours.get("ncc", [])]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (used in the audit JSON)."""
        return {
            "file_name": self.file_name,
            "verdict": self.verdict.value,
            "reasons": list(self.reasons),
            "deciding_view": self.deciding_view,
            "similarity": {k: _f(v) for k, v in self.similarity.items()},
            "view_thresholds": {k: _f(v) for k, v in self.view_thresholds.items()},
            "review_thresholds": {k: _f(v) for k, v in self.review_thresholds.items()},
            "score": _f(self.score),
            "threshold": _f(self.threshold),
            "review_threshold": _f(self.review_threshold),
            "alpha": self.alpha,
            "review_alpha": self.review_alpha,
            "p_value": _f(self.p_value),
            "neighbours": dict(self.neighbours),
            "nn_ratio": _f(self.nn_ratio),
            "nearest_patient_id": self.nearest_patient_id,
            "authentic": bool(self.authentic),
        }

    def manifest_fields(self) -> dict[str, Any]:
        """Fields added to a ``metadata.jsonl`` line (DESIGN.md §3.3); no training identifiers.

        - ``nearest_train_similarity``: the deciding view's raw nearest training similarity;
        - ``privacy_threshold``: that view's threshold at ``privacy_alpha`` (same units);
        - ``privacy_view``: the deciding view's name;
        - ``privacy_similarity_<view>`` / ``privacy_threshold_<view>``: the same for every view;
        - ``privacy_verdict``, ``privacy_p_value``, ``privacy_alpha``, ``privacy_reasons``,
          ``privacy_nn_ratio``.
        """
        out: dict[str, Any] = {
            "nearest_train_similarity": _f(self.similarity[self.deciding_view]),
            "privacy_threshold": _f(self.view_thresholds[self.deciding_view]),
            "privacy_view": self.deciding_view,
            "privacy_verdict": self.verdict.value,
            "privacy_p_value": _f(self.p_value),
            "privacy_alpha": self.alpha,
            "privacy_reasons": list(self.reasons),
            "privacy_nn_ratio": _f(self.nn_ratio),
        }
        for view in self.view_thresholds:
            out[f"privacy_similarity_{view}"] = _f(self.similarity[view])
            out[f"privacy_threshold_{view}"] = _f(self.view_thresholds[view])
        return out


@dataclass(frozen=True)
class AuditResult:
    """Verdicts for every image plus the dataset summary.

    Attributes:
        images: One :class:`ImageVerdict` per audited image, in input order.
        summary: Dataset-level numbers (see :func:`audit_images`).
    """

    images: list[ImageVerdict]
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"images": [...], "summary": {...}}``, JSON-serialisable."""
        return {"images": [v.to_dict() for v in self.images], "summary": self.summary}


def _f(x: float) -> float | None:
    x = float(x)
    return None if not np.isfinite(x) else round(x, 6)


def _relative_position(sim: Mapping[str, float], thr: Mapping[str, float], cal: Any) -> dict[str, float]:
    """Per view: ``(similarity - null median) / (threshold - null median)``; ``>= 1`` at or above."""
    out = {}
    for v, t in thr.items():
        denom = max(t - cal.center[v], 1e-12)
        out[v] = (sim[v] - cal.center[v]) / denom
    return out


def verdicts_from_scores(
    index: ReferenceIndex,
    scores: Scores,
    file_names: Sequence[str],
    alpha: float | None = None,
) -> list[ImageVerdict]:
    """Turn :class:`~privacy.index.Scores` into verdicts.

    Args:
        index: The calibrated reference index.
        scores: ``index.score(images)``.
        file_names: ``(Q,)`` ids of the scored images.
        alpha: Reject false-flag rate; default the index's.

    Raises:
        ValueError: ``alpha`` outside ``(0, 1)`` or ``file_names`` of the wrong length.
    """
    cal = index.calibration
    a = index.alpha if alpha is None else float(alpha)
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    ra = max(index.review_alpha, a)
    if len(file_names) != len(scores):
        raise ValueError(f"file_names has {len(file_names)} entries but {len(scores)} images were scored")
    t_reject, t_review = cal.threshold(a), cal.threshold(ra)
    view_thr = index.thresholds(a)
    review_thr = index.thresholds(ra)
    p_values = cal.p_value(scores.nearest)
    ref_nn = index.ref_nn_similarity()
    out: list[ImageVerdict] = []
    for q, name in enumerate(file_names):
        neighbours: dict[str, list[dict[str, Any]]] = {}
        for v in VIEW_NAMES:
            sims, idx = scores.neighbours[v]
            neighbours[v] = [
                {"id": index.ids[int(i)], "similarity": _f(s), "patient_id": index.patient_ids[int(i)]}
                for s, i in zip(sims[q], idx[q])
                if i >= 0
            ]
        sim = {v: float(scores.nearest[v][q]) for v in VIEW_NAMES}
        stat = float(scores.fused[q])
        reasons: list[str] = []
        ncc_top = neighbours["ncc"][0] if neighbours["ncc"] else None
        leak = ncc_top is not None and sim["ncc"] >= index.leak_threshold
        if leak:
            reasons.append(
                f"pixel correlation {sim['ncc']:.4f} >= {index.leak_threshold} with its nearest training "
                "image: near-exact copy"
            )
        if stat > t_reject or leak:
            level = Verdict.REJECT
        elif stat > t_review:
            level = Verdict.REVIEW
        else:
            level = Verdict.KEEP
        pos = _relative_position(sim, view_thr, cal)
        deciding = "ncc" if leak else max(pos, key=lambda v: pos[v])
        if level is not Verdict.KEEP:
            cut, cut_alpha = (view_thr, a) if level is Verdict.REJECT else (review_thr, ra)
            for v in cut:
                if sim[v] > cut[v] and neighbours[v]:
                    reasons.append(
                        f"{v} similarity {sim[v]:.4f} to its nearest training image exceeds its threshold "
                        f"{cut[v]:.4f} (alpha {cut_alpha:g}, all views together)"
                    )
        e_sims = scores.neighbours["embedding"][0][q]
        ratio = (1.0 - e_sims[0]) / max(1.0 - e_sims[1], 1e-9) if len(e_sims) > 1 else float("nan")
        e_top = int(scores.neighbours["embedding"][1][q][0])
        out.append(
            ImageVerdict(
                file_name=str(name),
                verdict=level,
                reasons=tuple(reasons),
                similarity=sim,
                view_thresholds=view_thr,
                review_thresholds=review_thr,
                deciding_view=deciding,
                score=stat,
                threshold=t_reject,
                review_threshold=t_review,
                alpha=a,
                review_alpha=ra,
                p_value=float(p_values[q]),
                neighbours=neighbours,
                nn_ratio=float(ratio),
                nearest_patient_id=ncc_top["patient_id"] if ncc_top else None,
                authentic=bool(e_sims[0] < ref_nn[e_top]),
            )
        )
    return out


def planted_copy_self_test(
    index: ReferenceIndex, n: int = 32, alpha: float | None = None, seed: int = 0
) -> dict[str, float]:
    """Plant transformed copies of training images and report the share rejected per transform.

    Args:
        index: The calibrated reference index.
        n: Training images planted per transform.
        alpha: Reject false-flag rate; default the index's.
        seed: Seed for the choice of images and transform parameters.

    Returns:
        transform name -> share of planted copies with verdict ``reject``.
    """
    rng = np.random.default_rng(seed)
    images = index.images
    r = index.resolution
    pick = rng.choice(len(images), size=min(n, len(images)), replace=False)
    base = images[pick]
    s = max(1, round(2 * r / 28))
    planted = {
        "identity": base,
        "flip": base[:, :, ::-1],
        "shift": np.stack([ndimage.shift(x, (s, -s), order=0, mode="nearest") for x in base]),
        "brightness": base * 1.2,
        "gamma": base ** 0.7,
        "noise": base + rng.normal(0, 0.05, base.shape),
        "blur": np.stack([ndimage.gaussian_filter(x, r / 28.0) for x in base]),
    }
    out = {}
    for name, imgs in planted.items():
        imgs = np.clip(imgs, 0, 1).astype(np.float32)
        v = verdicts_from_scores(index, index.score(imgs), [str(i) for i in range(len(imgs))], alpha)
        out[name] = round(float(np.mean([x.verdict is Verdict.REJECT for x in v])), 4)
    return out


def _quantiles(x: np.ndarray) -> dict[str, float | None]:
    x = np.asarray(x, dtype=np.float64)
    return {f"q{int(round(q * 100)):02d}": _f(np.quantile(x, q)) for q in QUANTILES}


def audit_images(
    index: ReferenceIndex,
    images: np.ndarray,
    file_names: Sequence[str] | None = None,
    alpha: float | None = None,
    k: int = 5,
    self_test: bool = True,
    progress: bool = False,
) -> AuditResult:
    """Audit a stack of images for copies of the index's training images.

    Args:
        index: A calibrated :class:`~privacy.index.ReferenceIndex`.
        images: ``(Q, R, R)`` float32 images in ``[0, 1]`` at the index resolution, ``Q >= 1``.
        file_names: ``(Q,)`` ids; default ``"0"..."Q-1"``.
        alpha: Reject false-flag rate; default the index's.
        k: Neighbours reported per view.
        self_test: Include the planted-copy self-test in the summary.
        progress: Show progress.

    Returns:
        :class:`AuditResult`; ``summary`` has ``n_images``, ``counts`` (per verdict),
        ``copy_rate``, ``review_rate``, ``expected_chance_flags`` (``alpha * n``),
        ``training_images_copied`` / ``share_training_images_copied``,
        ``training_patients_copied`` / ``share_training_patients_copied`` (when patient ids exist),
        ``similarity_quantiles`` (per view and fused: ``synthetic`` vs ``heldout``),
        ``authenticity_share``, ``thresholds``, ``holdout``, ``self_test`` and ``statement``.

    Raises:
        ValueError: empty input, wrong resolution, bad ``alpha``.
    """
    if images is None or len(images) == 0:
        raise ValueError("no images to audit: the synthetic set is empty")
    scores = index.score(images, k=k, progress=progress)
    names = [str(i) for i in range(len(images))] if file_names is None else list(file_names)
    verdicts = verdicts_from_scores(index, scores, names, alpha)
    return summarize_verdicts(index, verdicts, self_test=self_test)


def summarize_verdicts(
    index: ReferenceIndex,
    verdicts: Sequence[ImageVerdict],
    self_test: bool | Mapping[str, float] = True,
) -> AuditResult:
    """The :class:`AuditResult` of a list of verdicts: the dataset summary of :func:`audit_images`.

    Everything in the summary is computed from the verdicts (each keeps its raw nearest similarity
    per view in ``similarity`` and its decision statistic in ``score``) and the index, so verdicts
    computed in pieces (several processes) give the same summary as one call of :func:`audit_images`.

    Args:
        index: The calibrated reference index the verdicts were computed with.
        verdicts: One :class:`ImageVerdict` per image, in input order, all at the same ``alpha``.
        self_test: ``True``: run :func:`planted_copy_self_test` at the verdicts' ``alpha``;
            ``False``: leave it out; a mapping: its already computed result.

    Returns:
        :class:`AuditResult` (summary keys as in :func:`audit_images`).

    Raises:
        ValueError: no verdicts, or verdicts at different ``alpha``.
    """
    verdicts = list(verdicts)
    if not verdicts:
        raise ValueError("no images to audit: the synthetic set is empty")
    a = verdicts[0].alpha
    ra = verdicts[0].review_alpha
    if any(x.alpha != a or x.review_alpha != ra for x in verdicts):
        raise ValueError(f"verdicts must share one alpha/review_alpha, got alpha {sorted({x.alpha for x in verdicts})}")
    n = len(verdicts)
    counts = {v.value: sum(x.verdict is v for x in verdicts) for v in VERDICTS}
    rejected = [x for x in verdicts if x.verdict is Verdict.REJECT]
    copied = sorted({x.nearest_ids[0] for x in rejected if x.nearest_ids})
    has_pids = any(p is not None for p in index.patient_ids)
    cal = index.calibration
    nearest = {v: np.array([x.similarity[v] for x in verdicts], dtype=np.float64) for v in VIEW_NAMES}
    fused = np.array([x.score for x in verdicts], dtype=np.float64)
    quant = {
        v: {"synthetic": _quantiles(nearest[v]), "heldout": _quantiles(cal.null[v])}
        for v in VIEW_NAMES
    }
    quant["fused"] = {"synthetic": _quantiles(fused), "heldout": _quantiles(cal.statistic_null)}
    summary: dict[str, Any] = {
        "n_images": n,
        "counts": counts,
        "copy_rate": round(counts["reject"] / n, 6),
        "review_rate": round(counts["review"] / n, 6),
        "alpha": a,
        "review_alpha": ra,
        "expected_chance_flags": {"reject": round(a * n, 3), "review_or_reject": round(ra * n, 3)},
        "training_images_copied": len(copied),
        "share_training_images_copied": round(len(copied) / len(index.ids), 6),
        "copied_training_ids": copied,
        "similarity_quantiles": quant,
        "authenticity_share": round(float(np.mean([x.authentic for x in verdicts])), 6),
        "thresholds": {"reject": index.thresholds(a), "review": index.thresholds(ra)},
        "statistic_thresholds": {"reject": cal.threshold(a), "review": cal.threshold(ra)},
        "leak_threshold": index.leak_threshold,
        "holdout": dict(index.holdout),
        "n_references": len(index.ids),
        "resolution": index.resolution,
        "statement": GUARANTEE_STATEMENT,
    }
    if has_pids:
        pats = sorted({x.nearest_patient_id for x in rejected if x.nearest_patient_id is not None})
        n_pat = len({p for p in index.patient_ids if p is not None})
        summary["training_patients_copied"] = len(pats)
        summary["share_training_patients_copied"] = round(len(pats) / max(n_pat, 1), 6)
        summary["copied_patient_ids"] = pats
    if isinstance(self_test, Mapping):
        summary["self_test"] = dict(self_test)
    elif self_test:
        summary["self_test"] = planted_copy_self_test(index, alpha=a)
    return AuditResult(images=verdicts, summary=summary)


# ---------------------------------------------------------------------- split across processes
#: Version of the per-process record layout written by :func:`verdict_to_record`.
PART_FORMAT = 1


def audit_verdicts(
    index: ReferenceIndex,
    images: np.ndarray,
    file_names: Sequence[str],
    alpha: float | None = None,
    k: int = 5,
    progress: bool = False,
) -> list[ImageVerdict]:
    """Verdicts for one process's share of the images (no summary); an empty share gives ``[]``.

    Args:
        index: The calibrated reference index.
        images: ``(Q, R, R)`` float32 images in ``[0, 1]`` at the index resolution; ``Q`` may be 0.
        file_names: ``(Q,)`` ids.
        alpha: Reject false-flag rate; default the index's.
        k: Neighbours reported per view.
        progress: Show progress.

    Raises:
        ValueError: wrong resolution, bad ``alpha``, ``file_names`` of the wrong length.
    """
    if len(file_names) != len(images):
        raise ValueError(f"file_names has {len(file_names)} entries but images has {len(images)}")
    if len(images) == 0:
        return []
    return verdicts_from_scores(index, index.score(images, k=k, progress=progress), list(file_names), alpha)


def verdict_to_record(verdict: ImageVerdict) -> dict[str, Any]:
    """A lossless JSON-serialisable record of an :class:`ImageVerdict` (raw floats, unlike
    :meth:`ImageVerdict.to_dict`, which rounds): ``verdict_from_record(json.loads(json.dumps(r)))``
    equals the original. Non-finite floats are written as JSON ``NaN``/``Infinity``."""
    return {
        "file_name": verdict.file_name,
        "verdict": verdict.verdict.value,
        "reasons": list(verdict.reasons),
        "similarity": {k: float(v) for k, v in verdict.similarity.items()},
        "view_thresholds": {k: float(v) for k, v in verdict.view_thresholds.items()},
        "review_thresholds": {k: float(v) for k, v in verdict.review_thresholds.items()},
        "deciding_view": verdict.deciding_view,
        "score": float(verdict.score),
        "threshold": float(verdict.threshold),
        "review_threshold": float(verdict.review_threshold),
        "alpha": float(verdict.alpha),
        "review_alpha": float(verdict.review_alpha),
        "p_value": float(verdict.p_value),
        "neighbours": {k: [dict(n) for n in v] for k, v in verdict.neighbours.items()},
        "nn_ratio": float(verdict.nn_ratio),
        "nearest_patient_id": verdict.nearest_patient_id,
        "authentic": bool(verdict.authentic),
    }


def verdict_from_record(record: Mapping[str, Any]) -> ImageVerdict:
    """Inverse of :func:`verdict_to_record`.

    Raises:
        ValueError: ``record`` is not such a record (a missing or unknown key, an unknown verdict).
    """
    names = set(ImageVerdict.__dataclass_fields__)
    if not isinstance(record, Mapping) or set(record) != names:
        got = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise ValueError(f"record must have exactly the keys {sorted(names)}, got {got}")
    try:
        return ImageVerdict(**dict(record))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"record of {record.get('file_name')!r} is not an image verdict: {exc}") from None


def merge_verdict_parts(
    index: ReferenceIndex,
    parts: Iterable[tuple[Sequence[int], Sequence[ImageVerdict]]],
    n_images: int,
    self_test: bool | Mapping[str, float] = True,
) -> AuditResult:
    """Put the verdicts of several processes back in input order and summarize them.

    Args:
        index: The calibrated reference index all parts were scored with.
        parts: Per process ``(positions, verdicts)``: the input positions of its images and their
            verdicts, in the same order.
        n_images: Number of images of the whole audit; the positions of all parts together must be
            exactly ``0 .. n_images - 1``.
        self_test: As in :func:`summarize_verdicts`.

    Returns:
        The :class:`AuditResult` that :func:`audit_images` gives for the whole input, when the
        per-image scores do not depend on the batch they were computed in.

    Raises:
        ValueError: a part whose positions and verdicts differ in length, or positions that repeat,
            fall outside ``[0, n_images)`` or leave an image out.
    """
    slots: list[ImageVerdict | None] = [None] * int(n_images)
    for positions, verdicts in parts:
        if len(positions) != len(verdicts):
            raise ValueError(f"a part has {len(positions)} positions but {len(verdicts)} verdicts")
        for pos, verdict in zip(positions, verdicts):
            if not 0 <= int(pos) < n_images:
                raise ValueError(f"position {pos} is outside [0, {n_images})")
            if slots[int(pos)] is not None:
                raise ValueError(f"position {pos} appears in more than one part")
            slots[int(pos)] = verdict
    missing = [i for i, v in enumerate(slots) if v is None]
    if missing:
        raise ValueError(f"{len(missing)} of {n_images} images have no verdict (first: position {missing[0]})")
    return summarize_verdicts(index, [v for v in slots if v is not None], self_test=self_test)
