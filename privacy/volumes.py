"""Memorization views, calibration and audit for 3D volumes (DESIGN.md §4, §8; issue 10).

The 3D counterpart of :mod:`privacy.index` + :mod:`privacy.audit`, on the same principles: compare each
synthetic volume with its nearest training volumes under a few views, standardize every view on a null
distribution of *real held-out volumes -> training volumes*, and reject when the maximum standardized
similarity is above its split-conformal ``(1 - alpha)`` threshold (:class:`privacy.calibration.Calibration`,
the same rule as 2D), or when the pixel correlation reaches ``leak_threshold`` (a near-exact copy).
Verdicts are the 2D :class:`privacy.audit.Verdict` / :class:`privacy.audit.ImageVerdict` and the result an
:class:`privacy.audit.AuditResult`, so manifests and JSON reports have the 2D shape.

Arrays: a volume stack is ``(N, D, H, W)`` float32 in the model range ``[0, 1]`` (for CT the HU window of
the training data's intensity mapping), all on one voxel grid: the same shape and spacing (mm).

Views (:data:`VOLUME_VIEW_NAMES`):

- ``ncc``: normalized cross-correlation, maximum over the 8 flips of the three axes and over shifts of up to
  ``max_shift`` voxels along each axis. The query's centre crop (``max_shift`` voxels off every face) is
  correlated with every window of the reference (a 3D convolution), each window standardized on its
  own mean and norm, so a shifted copy scores 1 exactly. Computed exactly for the ``candidates`` nearest
  references of a coarse search (unshifted NCC of blurred, 2x average-pooled volumes, over the flips) and
  the ``candidates // 4`` (at least 1) nearest of the same search on volumes centred on their centres of
  mass, which keeps shifted copies of small sparse structures among the candidates.
- ``slice``: aggregation over 2D axial slices: for each reference, the mean over the query's slices of the
  best in-plane NCC with any of the reference's slices (over the four in-plane flips); the view is the
  maximum over references. It catches copied slabs and slices that the whole-volume correlation dilutes.

This module holds training-derived data (the reference volumes): a :class:`VolumeIndex` folder is a
separate artifact, like the 2D index, never part of a model folder or an export.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from scipy import ndimage

from privacy._files import staged_folder
from privacy.views import check_unit_values
from privacy.audit import GUARANTEE_STATEMENT, VERDICTS, AuditResult, ImageVerdict, Verdict
from privacy.calibration import Calibration, min_null_size, patient_disjoint_split

__all__ = [
    "VOLUME_VIEW_NAMES",
    "VOLUME_INDEX_KIND",
    "VolumeScores",
    "VolumeIndex",
    "check_volumes",
    "shifted_ncc",
    "is_volume_index",
    "audit_volumes",
]

#: Views computed, in report order.
VOLUME_VIEW_NAMES = ("ncc", "slice")
#: ``kind`` of a volume index's ``index.json``.
VOLUME_INDEX_KIND = "radsynth-volume-reference-index"
INDEX_JSON = "index.json"
REFERENCES_FILE = "references.safetensors"
#: Training volumes checked as identity copies after calibration.
SELF_CHECK_VOLUMES = 8
#: The 8 flips of a (D, H, W) volume, as tuples of flipped axes.
_FLIPS_3D = tuple(tuple(a for a, f in zip((0, 1, 2), bits) if f) for bits in itertools.product((0, 1), repeat=3))
_EPS = 1e-8

_README = """# RadSynth volume reference index: CONTAINS TRAINING-DERIVED DATA

Written by `radsynth index` for 3D volumes. It holds the training volumes ({n} volumes of shape {shape}
at spacing {spacing} mm, float16 in the model range) and the calibration of copy thresholds (held-out ->
train similarities).

**Treat it like the training data itself**: keep it with the same access controls, never inside a
model folder, a synthetic dataset or an export, and delete it when the training data must be deleted.

- Built: {created}
- alpha (reject): {alpha}; alpha (review): {review_alpha}
- Held-out set for calibration: {holdout}
- Use: `radsynth audit --index THIS_FOLDER --synthetic SYNTHETIC_VOLUME_FOLDER`.

A passed audit is not a guarantee of privacy; only differentially private training gives one.
"""


def check_volumes(volumes: np.ndarray, name: str = "volumes") -> np.ndarray:
    """Validate a volume stack and return it as C-contiguous float32.

    Args:
        volumes: ``(N, D, H, W)`` values in ``[0, 1]``, ``N >= 1``.
        name: Argument name for error messages.

    Raises:
        ValueError: wrong dimensions, empty, non-finite or outside ``[0, 1]`` (beyond 1e-3).
    """
    arr = np.asarray(volumes)
    if arr.ndim != 4 or arr.shape[0] == 0 or min(arr.shape[1:]) < 1:
        raise ValueError(f"{name} must have shape (N, D, H, W) with N >= 1, got shape {arr.shape}")
    return check_unit_values(arr, name)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``(M, P)`` centred and scaled to unit norm (constant rows become 0), float32."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, _EPS) * (norm > _EPS)).astype(np.float32)


def _centred(volumes: np.ndarray) -> np.ndarray:
    """Each ``(D, H, W)`` volume moved by whole voxels so that its centre of mass (of the values above
    the volume's minimum) sits at the grid centre; edges repeat the border voxel. Shifted copies of one
    volume come out identical (up to what the shift pushed off the grid), whatever the shift."""
    out = np.empty_like(volumes)
    centre = (np.array(volumes.shape[1:], dtype=np.float64) - 1.0) / 2.0
    for i, v in enumerate(volumes):
        w = v - v.min()
        com = np.array(ndimage.center_of_mass(w)) if w.sum() > 0 else centre
        move = np.round(centre - np.nan_to_num(com, nan=0.0)).astype(int)
        out[i] = ndimage.shift(v, move, order=0, mode="nearest") if move.any() else v
    return out


def _coarse(volumes: np.ndarray, max_shift: int = 1, centre: bool = False) -> np.ndarray:
    """``(N, P)`` unit rows of the volumes average-pooled by 2 (when every side allows it) and blurred
    (Gaussian, sd ``max_shift`` voxels), so that the unshifted correlation of the coarse search ranks
    shifted copies near their source; with ``centre`` each volume is first moved to put its centre of
    mass at the grid centre (:func:`_centred`), which keeps shifted copies of small, sparse structures
    (a gland a few voxels thick) near their source where the blur alone does not."""
    arr = np.array(volumes, dtype=np.float32)  # a copy: inputs may be read-only
    if centre:
        arr = _centred(arr)
    arr = ndimage.gaussian_filter(arr, (0, *(max(1.0, float(max_shift)),) * 3), mode="nearest")
    t = torch.from_numpy(arr)[:, None]
    if min(t.shape[2:]) >= 8:
        t = F.avg_pool3d(t, 2, ceil_mode=True)
    return _unit_rows(t.flatten(1).numpy())


def default_max_shift(shape: Sequence[int]) -> int:
    """Largest shift searched by the ``ncc`` view: 1 voxel below 32 per side, then ``side / 16``."""
    return int(max(1, round(min(shape) / 16)))


def shifted_ncc(query: np.ndarray, refs: np.ndarray, max_shift: int) -> np.ndarray:
    """Max NCC of one query with each reference over the 8 flips and shifts up to ``max_shift`` voxels.

    Args:
        query: ``(D, H, W)`` float32.
        refs: ``(K, D, H, W)`` float32 on the same grid.
        max_shift: Largest shift per axis (voxels), ``>= 0`` and below half of the smallest side.

    Returns:
        ``(K,)`` float64 in ``[-1, 1]``.

    Raises:
        ValueError: a ``max_shift`` the grid cannot hold.
    """
    s = int(max_shift)
    d, h, w = query.shape
    if s < 0 or 2 * s >= min(d, h, w):
        raise ValueError(f"max_shift must be in [0, {(min(d, h, w) - 1) // 2}] for shape {query.shape}, got {max_shift}")
    crops = []
    for axes in _FLIPS_3D:
        q = np.flip(query, axes) if axes else query
        crops.append(q[s:d - s, s:h - s, s:w - s].reshape(-1))
    kernel = torch.from_numpy(_unit_rows(np.stack(crops))).reshape(len(crops), 1, d - 2 * s, h - 2 * s, w - 2 * s)
    r = torch.from_numpy(np.array(refs, dtype=np.float32))[:, None]
    k = kernel
    n = float(k[0].numel())
    dots = F.conv3d(r, k)  # (K, 8, 2s+1, 2s+1, 2s+1): window . unit(crop); the crop has zero mean
    mean, sq = _window_means(r[:, 0], tuple(k.shape[2:]))
    norm = torch.sqrt(torch.clamp((sq - mean * mean) * n, min=0.0)).to(dots.dtype)[:, None]
    ncc = torch.where(norm > 1e-4, dots / torch.clamp(norm, min=1e-4), torch.zeros_like(dots))
    return ncc.flatten(1).amax(dim=1).clamp(-1.0, 1.0).double().numpy()


def _window_means(r: torch.Tensor, size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and mean square of every ``size`` window of ``(K, D, H, W)`` volumes (stride 1), float64.

    Summed-volume tables (3D cumulative sums) give each window in 8 lookups: the same numbers as
    ``F.avg_pool3d(r, size, stride=1)`` (to float rounding) at a cost independent of the window size,
    where pooling a window nearly as large as the volume costs its full size at each position.

    Returns:
        ``(mean, mean_square)``, each ``(K, D - size[0] + 1, H - size[1] + 1, W - size[2] + 1)``.
    """
    def box_means(x: torch.Tensor) -> torch.Tensor:
        c = F.pad(x.cumsum(1).cumsum(2).cumsum(3), (1, 0, 1, 0, 1, 0))
        a, b, e = size
        total = (c[:, a:, b:, e:] - c[:, :-a, b:, e:] - c[:, a:, :-b, e:] - c[:, a:, b:, :-e]
                 + c[:, :-a, :-b, e:] + c[:, :-a, b:, :-e] + c[:, a:, :-b, :-e] - c[:, :-a, :-b, :-e])
        return total / float(a * b * e)

    x = r.double()
    return box_means(x), box_means(x * x)


def _slice_features(volumes: np.ndarray) -> np.ndarray:
    """``(N, D, H*W)`` unit rows of every axial slice."""
    n, d, h, w = volumes.shape
    return _unit_rows(volumes.reshape(n * d, h * w)).reshape(n, d, h * w)


def _slice_scores(query: np.ndarray, ref_slices: np.ndarray) -> np.ndarray:
    """``(N,)`` slice-view similarity of one ``(D, H, W)`` query with each reference.

    Per reference: the mean over the query's non-constant slices of the best NCC with any slice of the
    reference, maximum over the four in-plane flips of the query.
    """
    n, dr, p = ref_slices.shape
    refs = torch.from_numpy(ref_slices.reshape(n * dr, p))
    best = None
    for axes in ((), (1,), (2,), (1, 2)):
        q = np.flip(query, axes) if axes else query
        qs = _unit_rows(q.reshape(q.shape[0], -1))
        live = np.linalg.norm(qs, axis=1) > 0.5
        if not live.any():
            return np.zeros(n)
        sims = (torch.from_numpy(qs[live]) @ refs.T).reshape(int(live.sum()), n, dr).amax(dim=2)
        score = sims.double().mean(dim=0).numpy()
        best = score if best is None else np.maximum(best, score)
    return best  # type: ignore[return-value]


@dataclass(frozen=True)
class VolumeScores:
    """Similarities of query volumes to the references (the 3D :class:`privacy.index.Scores`).

    Attributes:
        neighbours: view -> ``(sims, idx)``, each ``(Q, k)``, by decreasing similarity (``idx`` -1 past the end).
        nearest: view -> ``(Q,)`` float64 nearest-reference similarity.
        fused: ``(Q,)`` float64 decision statistic (max standardized similarity over the fused views).
    """

    neighbours: Mapping[str, tuple[np.ndarray, np.ndarray]]
    nearest: Mapping[str, np.ndarray]
    fused: np.ndarray

    def __len__(self) -> int:
        return int(len(self.fused))


def _neighbours(volumes: np.ndarray, refs: np.ndarray, max_shift: int, candidates: int, k: int,
                exclude_self: bool = False,
                slice_view: bool = True) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Top-``k`` references per view for each query (see the module docstring); ``slice_view=False``
    leaves the slice view out (NaN similarities, index -1): it compares every query slice with every
    reference slice, most of the cost, and only the ``ncc`` view is needed for some uses."""
    q_n, n = len(volumes), len(refs)
    k = max(1, min(int(k), n))
    ref_slices = _slice_features(refs) if slice_view else None
    # two coarse rankings: as the volumes lie (`candidates` references), and centred on their centres of
    # mass (a quarter as many: a shifted copy of a sparse structure falls out of the first ranking but
    # comes first in the second; each exact candidate costs as much as the coarse search of all references)
    rankings = []
    for centre in (False, True):
        ref_coarse = _coarse(refs, max_shift, centre)
        flips = [_coarse(np.flip(volumes, tuple(a + 1 for a in axes)) if axes else volumes, max_shift, centre)
                 for axes in _FLIPS_3D]
        rankings.append(np.max(np.stack([f @ ref_coarse.T for f in flips]), axis=0))  # (Q, N)
    out = {v: (np.full((q_n, k), np.nan), np.full((q_n, k), -1, dtype=np.int64)) for v in VOLUME_VIEW_NAMES}
    for q in range(q_n):
        proposals = []
        for coarse, many in zip(rankings, (max(int(candidates), k), max(1, int(candidates) // 4))):
            row = coarse[q].copy()
            if exclude_self:
                row[q] = -np.inf
            proposals.append(np.argsort(-row, kind="stable")[:many])
        cand = np.unique(np.concatenate(proposals))
        if exclude_self:
            cand = cand[cand != q]
        ncc = shifted_ncc(volumes[q], refs[cand], max_shift)
        views = [("ncc", ncc, cand)]
        if slice_view:
            sl = _slice_scores(volumes[q], ref_slices)
            if exclude_self:
                sl[q] = -np.inf
            views.append(("slice", sl, np.arange(n)))
        for view, sims, idx in views:
            order = np.argsort(-sims, kind="stable")[:k]
            m = len(order)
            out[view][0][q, :m] = sims[order]
            out[view][1][q, :m] = idx[order]
    nearest = {v: out[v][0][:, 0].astype(np.float64) for v in VOLUME_VIEW_NAMES}
    return out, nearest


def volumes_fingerprint(volumes: np.ndarray) -> str:
    """``"sha256:<hex>"`` of a volume stack's shape and float32 bytes."""
    arr = np.ascontiguousarray(volumes, dtype=np.float32)
    h = hashlib.sha256(json.dumps(list(arr.shape)).encode())
    h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()


def _readonly(a: np.ndarray, dtype: Any) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class VolumeIndex:
    """Training volumes and the calibration of their copy thresholds; immutable.

    Build with :meth:`build` (complete and calibrated), persist with :meth:`save` / :meth:`load`,
    query with :meth:`score`, :meth:`check` and :func:`audit_volumes`.

    Attributes:
        volumes: ``(N, D, H, W)`` float32 in ``[0, 1]`` (float16-exact), read-only.
        ids: ``(N,)`` training ids (file names).
        patient_ids: ``(N,)`` patient ids, ``None`` where unknown.
        spacing: ``(slice, row, column)`` mm of the grid.
        calibration: Null distributions of held-out -> train similarity (views and decision statistic).
        alpha: Default false-flag rate for ``reject``.
        review_alpha: Default false-flag rate for ``review`` (``>= alpha``).
        leak_threshold: ``ncc`` at or above which a volume is a copy whatever the null says.
        max_shift: Largest shift (voxels per axis) of the ``ncc`` view.
        candidates: References per query proposed by the coarse search and checked exactly by the ``ncc``
            view (the centred search proposes a quarter as many more).
        ref_nn: ``(N,)`` each reference's ``ncc`` to its nearest other reference (authenticity).
        holdout: Description of the held-out set (``source``, ``split``, ``n_holdout``, ``n_null``,
            ``excluded_same_patient``, ``excluded_duplicates``, ``min_null_size``, ``warnings``).
        intensity: The intensity mapping of the model range (dict: ``kind``, ``low``, ``high``, ...).
        data_fingerprint: Fingerprint of the reference volumes.
        info: Build information (no absolute paths).

    Raises:
        ValueError: on construction, for inconsistent fields.
    """

    volumes: np.ndarray
    ids: tuple[str, ...]
    patient_ids: tuple[str | None, ...]
    spacing: tuple[float, float, float]
    calibration: Calibration
    alpha: float = 0.01
    review_alpha: float = 0.05
    leak_threshold: float = 0.995
    max_shift: int = 1
    candidates: int = 16
    ref_nn: np.ndarray = field(default_factory=lambda: np.zeros(0))
    holdout: Mapping[str, Any] = field(default_factory=dict)
    intensity: Mapping[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vols = check_volumes(self.volumes, "volumes")
        n = len(vols)
        if len(self.ids) != n or len(self.patient_ids) != n or len(self.ref_nn) != n:
            raise ValueError(f"ids ({len(self.ids)}), patient_ids ({len(self.patient_ids)}) and ref_nn "
                             f"({len(self.ref_nn)}) must match volumes ({n})")
        if not 0.0 < self.alpha < 1.0 or not self.alpha <= self.review_alpha < 1.0:
            raise ValueError(f"need 0 < alpha <= review_alpha < 1, got alpha={self.alpha}, review_alpha={self.review_alpha}")
        missing = [v for v in VOLUME_VIEW_NAMES if v not in self.calibration.views]
        if missing:
            raise ValueError(f"calibration has no null for view(s) {missing}")
        sp = tuple(float(s) for s in self.spacing)
        if len(sp) != 3 or min(sp) <= 0:
            raise ValueError(f"spacing must be 3 positive mm, got {self.spacing!r}")
        object.__setattr__(self, "volumes", _readonly(vols, np.float32))
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "patient_ids", tuple(None if p is None else str(p) for p in self.patient_ids))
        object.__setattr__(self, "spacing", sp)
        object.__setattr__(self, "ref_nn", _readonly(self.ref_nn, np.float64))
        object.__setattr__(self, "holdout", MappingProxyType(json.loads(json.dumps(dict(self.holdout)))))
        object.__setattr__(self, "intensity", MappingProxyType(dict(self.intensity)))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of the grid."""
        return tuple(int(s) for s in self.volumes.shape[1:])  # type: ignore[return-value]

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        volumes: np.ndarray,
        ids: Sequence[str] | None = None,
        patient_ids: Sequence[str | None] | None = None,
        *,
        spacing: Sequence[float],
        holdout_volumes: np.ndarray | None = None,
        holdout_ids: Sequence[str] | None = None,
        holdout_patient_ids: Sequence[str | None] | None = None,
        alpha: float = 0.01,
        review_alpha: float = 0.05,
        holdout_fraction: float = 0.2,
        leak_threshold: float = 0.995,
        max_shift: int | None = None,
        candidates: int = 16,
        seed: int = 0,
        intensity: Mapping[str, Any] | None = None,
        holdout_name: str = "holdout_volumes",
        info: Mapping[str, Any] | None = None,
    ) -> "VolumeIndex":
        """Build and calibrate an index from training volumes.

        Without ``holdout_volumes`` a patient-disjoint split (``holdout_fraction`` of patients, ``seed``)
        is held out, calibrated against the rest, then added back to the references. Held-out volumes
        sharing a patient with the references, or whose ``ncc`` reaches ``leak_threshold``, are left out
        of the null (recorded in :attr:`holdout`).

        Args:
            volumes: ``(N, D, H, W)`` training volumes in ``[0, 1]``.
            ids: Training ids; default ``"0"...``.
            patient_ids: Training patient ids (``None`` where unknown).
            spacing: ``(slice, row, column)`` mm of the grid.
            holdout_volumes: ``(M, D, H, W)`` real volumes never used in training, same grid.
            holdout_ids: Their ids.
            holdout_patient_ids: Their patient ids.
            alpha: Reject false-flag rate in ``(0, 1)``; the null must resolve it (``M >= 1/alpha - 1``).
            review_alpha: Review false-flag rate in ``[alpha, 1)``.
            holdout_fraction: Share of patients held out when splitting.
            leak_threshold: ``ncc`` treated as an exact copy, in ``(0, 1]``.
            max_shift: Shift range of the ``ncc`` view; default :func:`default_max_shift`.
            candidates: References per query proposed by the coarse search and checked exactly by the
                ``ncc`` view (``>= 1``; the centred search proposes a quarter as many more).
            seed: Split and self-check seed.
            intensity: The model-range intensity mapping of the volumes (recorded).
            holdout_name: How errors name the held-out set (e.g. ``"--holdout val/"``).
            info: Extra build information (no absolute paths).

        Raises:
            ValueError: bad arguments, grids that differ, too few held-out volumes for ``alpha``, or a
                calibration that would not reject exact copies of training volumes.
        """
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not alpha <= review_alpha < 1.0:
            raise ValueError(f"review_alpha must be in [alpha={alpha}, 1), got {review_alpha}")
        if not 0.0 < leak_threshold <= 1.0:
            raise ValueError(f"leak_threshold must be in (0, 1], got {leak_threshold}")
        if int(candidates) < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        # float16-exact, so that a saved and loaded index scores exactly like the built one
        vols = check_volumes(volumes, "volumes").astype(np.float16).astype(np.float32)
        n = len(vols)
        shape = vols.shape[1:]
        shift = default_max_shift(shape) if max_shift is None else int(max_shift)
        if shift < 0 or 2 * shift >= min(shape):
            raise ValueError(f"max_shift must be in [0, {(min(shape) - 1) // 2}] for shape {shape}, got {max_shift}")
        ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
        pids = [None] * n if patient_ids is None else [None if p is None else str(p) for p in patient_ids]
        if len(ids) != n or len(pids) != n:
            raise ValueError(f"ids ({len(ids)}) and patient_ids ({len(pids)}) must match volumes ({n})")
        t_start = _dt.datetime.now(_dt.timezone.utc)
        if holdout_volumes is None:
            ref_idx, hold_idx = patient_disjoint_split(pids, holdout_fraction, seed)
            h_vols, h_ids, h_pids = vols[hold_idx], [ids[i] for i in hold_idx], [pids[i] for i in hold_idx]
            source = (f"patient-disjoint split of the training data ({len(hold_idx)} of {n} volumes, seed {seed}, "
                      f"holdout_fraction {holdout_fraction})")
        else:
            h_vols = check_volumes(holdout_volumes, "holdout_volumes").astype(np.float16).astype(np.float32)
            if h_vols.shape[1:] != shape:
                raise ValueError(f"{holdout_name}: held-out volumes are {h_vols.shape[1:]} but training volumes are "
                                 f"{shape}; load both on one grid (same --resolution and --spacing)")
            m = len(h_vols)
            h_ids = [f"holdout:{i}" for i in range(m)] if holdout_ids is None else [str(i) for i in holdout_ids]
            h_pids = [None] * m if holdout_patient_ids is None else [None if p is None else str(p) for p in holdout_patient_ids]
            if len(h_ids) != m or len(h_pids) != m:
                raise ValueError(f"holdout_ids ({len(h_ids)}) and holdout_patient_ids ({len(h_pids)}) must match "
                                 f"holdout_volumes ({m})")
            ref_idx = np.arange(n)
            source = f"separate held-out folder ({m} volumes)"
        m = len(h_vols)
        need = min_null_size(alpha)
        if m < need:
            raise ValueError(f"{holdout_name}: {m} held-out volumes cannot resolve alpha={alpha}: at least {need} are "
                             f"needed (ceil(1/alpha - 1)); add held-out volumes or raise --alpha")
        cal_refs = vols[ref_idx]
        train_patients = {pids[i] for i in ref_idx if pids[i] is not None}
        same_patient = [j for j, p in enumerate(h_pids) if p is not None and p in train_patients]
        _, nearest = _neighbours(h_vols, cal_refs, shift, candidates, 1)
        leaked = [j for j in range(m) if j not in same_patient and nearest["ncc"][j] >= leak_threshold]
        warn: list[str] = []
        if leaked:
            warn.append(f"{len(leaked)} held-out volume(s) correlate >= {leak_threshold} with a training volume and "
                        f"were left out of the null: {[h_ids[j] for j in leaked][:5]}")
        keep = np.array([j for j in range(m) if j not in set(same_patient) | set(leaked)], dtype=np.int64)
        if len(keep) < need:
            raise ValueError(
                f"{holdout_name}: only {len(keep)} of {m} held-out volumes remain for calibration "
                f"({len(same_patient)} share a patient with the training data, {len(leaked)} duplicate a training "
                f"volume); alpha={alpha} needs at least {need}; add held-out volumes or raise --alpha")
        if len(keep) < 2 * need:
            warn.append(f"only {len(keep)} held-out volumes calibrate alpha={alpha} ({need} needed, {2 * need} "
                        "recommended): this index's false-flag rate varies widely around alpha")
        calibration = Calibration.fit({v: nearest[v][keep] for v in VOLUME_VIEW_NAMES}, list(VOLUME_VIEW_NAMES))
        # each training volume's nearest other one (ncc view only: ref_nn is an ncc similarity)
        ref_nb, _ = (_neighbours(vols, vols, shift, candidates, 1, exclude_self=True, slice_view=False) if n > 1
                     else (None, None))
        ref_nn = ref_nb["ncc"][0][:, 0] if ref_nb is not None else np.full(n, -1.0)
        for w_msg in warn:
            warnings.warn(f"volume reference index: {w_msg}", UserWarning, stacklevel=2)
        t_end = _dt.datetime.now(_dt.timezone.utc)
        index = cls(
            volumes=vols, ids=tuple(ids), patient_ids=tuple(pids), spacing=tuple(spacing),  # type: ignore[arg-type]
            calibration=calibration, alpha=float(alpha), review_alpha=float(review_alpha),
            leak_threshold=float(leak_threshold), max_shift=shift, candidates=int(candidates),
            ref_nn=np.nan_to_num(ref_nn, nan=-1.0),
            holdout={"source": source, "split": holdout_volumes is None, "n_holdout": int(m), "n_null": int(len(keep)),
                     "excluded_same_patient": [h_ids[j] for j in same_patient],
                     "excluded_duplicates": [h_ids[j] for j in leaked], "min_null_size": int(need),
                     "alpha_resolvable": True, "leak_threshold": float(leak_threshold), "warnings": warn},
            intensity=dict(intensity or {}), data_fingerprint=volumes_fingerprint(vols),
            info={"created": t_start.isoformat(timespec="seconds"), "n_references": int(n),
                  "n_patients": len({p for p in pids if p is not None}),
                  "seconds_build": round((t_end - t_start).total_seconds(), 2), **dict(info or {})},
        )
        pick = np.sort(np.random.default_rng(seed).choice(n, size=min(SELF_CHECK_VOLUMES, n), replace=False))
        s = index.score(vols[pick])
        caught = (s.fused > calibration.threshold(alpha)) | (s.nearest["ncc"] >= index.leak_threshold)
        if not caught.all():
            raise ValueError(f"{holdout_name}: the calibrated thresholds {index.thresholds()} do not reject "
                             f"{int((~caught).sum())} of {len(pick)} exact copies of training volumes; the held-out "
                             "set is not independent of the training set")
        return index

    # ------------------------------------------------------------------ query
    def check_grid(self, volumes: np.ndarray, name: str = "volumes") -> np.ndarray:
        """Validate query volumes against the index grid.

        Raises:
            ValueError: naming both shapes when they differ.
        """
        vols = check_volumes(volumes, name)
        if vols.shape[1:] != self.shape:
            raise ValueError(f"{name} are {vols.shape[1:]} voxels but the volume index was built at {self.shape}; "
                             "resample them to the index grid or rebuild the index with --resolution/--spacing")
        return vols

    def score(self, volumes: np.ndarray, k: int = 5) -> VolumeScores:
        """Nearest training volumes of each query under every view, and the decision statistic.

        Args:
            volumes: ``(Q, D, H, W)`` in ``[0, 1]`` on the index grid.
            k: Neighbours kept per view.
        """
        vols = self.check_grid(volumes)
        nb, nearest = _neighbours(vols, self.volumes, self.max_shift, self.candidates, k)
        return VolumeScores(neighbours=nb, nearest=nearest, fused=self.calibration.statistic(nearest))

    def thresholds(self, alpha: float | None = None) -> dict[str, float]:
        """Each view's threshold at ``alpha`` (default the index's) in its own units; ``ncc`` capped at
        ``leak_threshold``."""
        thr = self.calibration.view_thresholds(self.alpha if alpha is None else float(alpha))
        thr["ncc"] = min(thr["ncc"], self.leak_threshold)
        return thr

    def verdicts(self, scores: VolumeScores, file_names: Sequence[str], alpha: float | None = None) -> list[ImageVerdict]:
        """Turn scores into :class:`~privacy.audit.ImageVerdict` s (rule of :mod:`privacy.audit`).

        Raises:
            ValueError: ``alpha`` outside ``(0, 1)`` or ``file_names`` of the wrong length.
        """
        cal = self.calibration
        a = self.alpha if alpha is None else float(alpha)
        if not 0.0 < a < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if len(file_names) != len(scores):
            raise ValueError(f"file_names has {len(file_names)} entries but {len(scores)} volumes were scored")
        ra = max(self.review_alpha, a)
        t_reject, t_review = cal.threshold(a), cal.threshold(ra)
        view_thr, review_thr = self.thresholds(a), self.thresholds(ra)
        p_values = cal.p_value(scores.nearest)
        out = []
        for q, name in enumerate(file_names):
            neighbours = {v: [{"id": self.ids[int(i)], "similarity": _f(s), "patient_id": self.patient_ids[int(i)]}
                              for s, i in zip(*(arr[q] for arr in scores.neighbours[v])) if i >= 0]
                          for v in VOLUME_VIEW_NAMES}
            sim = {v: float(scores.nearest[v][q]) for v in VOLUME_VIEW_NAMES}
            stat = float(scores.fused[q])
            reasons: list[str] = []
            leak = sim["ncc"] >= self.leak_threshold
            if leak:
                reasons.append(f"3D correlation {sim['ncc']:.4f} >= {self.leak_threshold} with its nearest training "
                               "volume (over flips and shifts): near-exact copy")
            level = Verdict.REJECT if (stat > t_reject or leak) else Verdict.REVIEW if stat > t_review else Verdict.KEEP
            pos = {v: (sim[v] - cal.center[v]) / max(view_thr[v] - cal.center[v], 1e-12) for v in view_thr}
            deciding = "ncc" if leak else max(pos, key=lambda v: pos[v])
            if level is not Verdict.KEEP:
                cut, cut_alpha = (view_thr, a) if level is Verdict.REJECT else (review_thr, ra)
                reasons += [f"{v} similarity {sim[v]:.4f} to its nearest training volume exceeds its threshold "
                            f"{cut[v]:.4f} (alpha {cut_alpha:g}, all views together)" for v in cut if sim[v] > cut[v]]
            sims = scores.neighbours["ncc"][0][q]
            ratio = (1.0 - sims[0]) / max(1.0 - sims[1], 1e-9) if len(sims) > 1 and np.isfinite(sims[1]) else float("nan")
            top = neighbours["ncc"][0] if neighbours["ncc"] else None
            out.append(ImageVerdict(
                file_name=str(name), verdict=level, reasons=tuple(reasons), similarity=sim, view_thresholds=view_thr,
                review_thresholds=review_thr, deciding_view=deciding, score=stat, threshold=t_reject,
                review_threshold=t_review, alpha=a, review_alpha=ra, p_value=float(p_values[q]),
                neighbours=neighbours, nn_ratio=float(ratio),
                nearest_patient_id=top["patient_id"] if top else None,
                authentic=bool(top is None or sim["ncc"] < self.ref_nn[self.ids.index(top["id"])]),
            ))
        return out

    def check(self, volumes: np.ndarray, file_names: Sequence[str] | None = None,
              alpha: float | None = None) -> list[ImageVerdict]:
        """Verdicts for a batch of generated volumes (the privacy gate of 3D generation)."""
        names = [str(i) for i in range(len(volumes))] if file_names is None else list(file_names)
        return self.verdicts(self.score(volumes), names, alpha)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the index folder (``index.json``, ``references.safetensors``, ``README.md``) atomically:
        a temporary sibling folder replaces ``directory``.

        Raises:
            FileExistsError: ``directory`` exists and ``overwrite`` is false.
        """
        directory = Path(directory)
        with staged_folder(directory, overwrite) as tmp:
            save_np({"volumes": self.volumes.astype(np.float16), "ref_nn": self.ref_nn.astype(np.float64)},
                    str(tmp / REFERENCES_FILE))
            meta = {
                "kind": VOLUME_INDEX_KIND, "dims": 3, "contains_training_data": True, "shape": list(self.shape),
                "spacing": list(self.spacing), "alpha": self.alpha, "review_alpha": self.review_alpha,
                "leak_threshold": self.leak_threshold, "max_shift": self.max_shift, "candidates": self.candidates,
                "thresholds": {"alpha": self.thresholds(self.alpha), "review_alpha": self.thresholds(self.review_alpha)},
                "holdout": dict(self.holdout), "intensity": dict(self.intensity),
                "data_fingerprint": self.data_fingerprint, "info": self.info,
                "calibration": self.calibration.to_dict(), "ids": list(self.ids), "patient_ids": list(self.patient_ids),
            }
            (tmp / INDEX_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            (tmp / "README.md").write_text(_README.format(
                n=len(self.ids), shape=self.shape, spacing=self.spacing, created=self.info.get("created", "unknown"),
                alpha=self.alpha, review_alpha=self.review_alpha, holdout=self.holdout.get("source", "unknown")))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "VolumeIndex":
        """Read an index folder written by :meth:`save`.

        Raises:
            FileNotFoundError: no ``index.json`` there.
            ValueError: not a volume index, or a damaged one.
        """
        directory = Path(directory)
        path = directory / INDEX_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a reference index (no {INDEX_JSON})")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("kind") != VOLUME_INDEX_KIND:
            raise ValueError(f"{path}: not a volume reference index (kind {meta.get('kind') if isinstance(meta, dict) else None!r})")
        try:
            arrays = load_np(str(directory / REFERENCES_FILE))
            return cls(
                volumes=arrays["volumes"].astype(np.float32), ids=tuple(meta["ids"]),
                patient_ids=tuple(meta["patient_ids"]), spacing=tuple(meta["spacing"]),
                calibration=Calibration.from_dict(meta["calibration"]), alpha=float(meta["alpha"]),
                review_alpha=float(meta["review_alpha"]), leak_threshold=float(meta["leak_threshold"]),
                max_shift=int(meta["max_shift"]), candidates=int(meta["candidates"]), ref_nn=arrays["ref_nn"],
                holdout=meta.get("holdout", {}), intensity=meta.get("intensity", {}),
                data_fingerprint=str(meta.get("data_fingerprint", "")), info=dict(meta.get("info", {})),
            )
        except KeyError as exc:
            raise ValueError(f"{directory}: damaged volume index (missing {exc.args[0]!r})") from None


def is_volume_index(directory: str | Path) -> bool:
    """Whether ``directory`` holds a volume index (``index.json`` of kind :data:`VOLUME_INDEX_KIND`)."""
    path = Path(directory) / INDEX_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("kind") == VOLUME_INDEX_KIND
    except (OSError, ValueError, AttributeError):
        return False


def _f(x: float) -> float | None:
    x = float(x)
    return None if not np.isfinite(x) else round(x, 6)


def _quantiles(x: np.ndarray) -> dict[str, float | None]:
    x = np.asarray(x, dtype=np.float64)
    return {f"q{int(round(q * 100)):02d}": _f(np.quantile(x, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)}


def planted_copy_self_test(index: VolumeIndex, n: int = 8, alpha: float | None = None, seed: int = 0) -> dict[str, float]:
    """Share of planted transformed copies of training volumes rejected, per transform.

    Transforms: identity, left-right flip, a shift of ``max_shift`` voxels on every axis, brightness x1.2,
    Gaussian noise (sd 0.03), Gaussian blur (sd 0.7 voxel).
    """
    rng = np.random.default_rng(seed)
    base = index.volumes[np.sort(rng.choice(len(index.volumes), size=min(n, len(index.volumes)), replace=False))]
    s = max(1, index.max_shift)
    planted = {
        "identity": base,
        "flip": base[:, :, :, ::-1],
        "shift": np.stack([ndimage.shift(v, (s, -s, s), order=0, mode="nearest") for v in base]),
        "brightness": base * 1.2,
        "noise": base + rng.normal(0, 0.03, base.shape),
        "blur": np.stack([ndimage.gaussian_filter(v, 0.7) for v in base]),
    }
    out = {}
    for name, vols in planted.items():
        v = index.check(np.clip(vols, 0, 1).astype(np.float32), alpha=alpha)
        out[name] = round(float(np.mean([x.verdict is Verdict.REJECT for x in v])), 4)
    return out


def audit_volumes(index: VolumeIndex, volumes: np.ndarray, file_names: Sequence[str] | None = None,
                  alpha: float | None = None, k: int = 5, self_test: bool = True) -> AuditResult:
    """Audit a stack of volumes for copies of the index's training volumes (the 3D :func:`privacy.audit.audit_images`).

    Args:
        index: A calibrated :class:`VolumeIndex`.
        volumes: ``(Q, D, H, W)`` in ``[0, 1]`` on the index grid, ``Q >= 1``.
        file_names: ``(Q,)`` ids; default ``"0"...``.
        alpha: Reject false-flag rate; default the index's.
        k: Neighbours reported per view.
        self_test: Include the planted-copy self-test.

    Returns:
        :class:`~privacy.audit.AuditResult` whose summary has the 2D keys (``counts``, ``copy_rate``,
        ``training_images_copied``, ``similarity_quantiles``, ``thresholds``, ``holdout``, ``statement``, ...)
        with ``shape`` and ``spacing`` in place of ``resolution``.

    Raises:
        ValueError: empty input, another grid, bad ``alpha``.
    """
    if volumes is None or len(volumes) == 0:
        raise ValueError("no volumes to audit: the synthetic set is empty")
    scores = index.score(volumes, k=k)
    names = [str(i) for i in range(len(volumes))] if file_names is None else list(file_names)
    verdicts = index.verdicts(scores, names, alpha)
    a, ra, n = verdicts[0].alpha, verdicts[0].review_alpha, len(verdicts)
    counts = {v.value: sum(x.verdict is v for x in verdicts) for v in VERDICTS}
    rejected = [x for x in verdicts if x.verdict is Verdict.REJECT]
    copied = sorted({x.nearest_ids[0] for x in rejected if x.nearest_ids})
    cal = index.calibration
    quant: dict[str, Any] = {v: {"synthetic": _quantiles(scores.nearest[v]), "heldout": _quantiles(cal.null[v])}
                             for v in VOLUME_VIEW_NAMES}
    quant["fused"] = {"synthetic": _quantiles(scores.fused), "heldout": _quantiles(cal.statistic_null)}
    summary: dict[str, Any] = {
        "dims": 3, "n_images": n, "counts": counts, "copy_rate": round(counts["reject"] / n, 6),
        "review_rate": round(counts["review"] / n, 6), "alpha": a, "review_alpha": ra,
        "expected_chance_flags": {"reject": round(a * n, 3), "review_or_reject": round(ra * n, 3)},
        "training_images_copied": len(copied), "share_training_images_copied": round(len(copied) / len(index.ids), 6),
        "copied_training_ids": copied, "similarity_quantiles": quant,
        "authenticity_share": round(float(np.mean([x.authentic for x in verdicts])), 6),
        "thresholds": {"reject": index.thresholds(a), "review": index.thresholds(ra)},
        "statistic_thresholds": {"reject": cal.threshold(a), "review": cal.threshold(ra)},
        "leak_threshold": index.leak_threshold, "holdout": dict(index.holdout), "n_references": len(index.ids),
        "shape": list(index.shape), "spacing": list(index.spacing), "statement": GUARANTEE_STATEMENT,
    }
    if any(p is not None for p in index.patient_ids):
        pats = sorted({x.nearest_patient_id for x in rejected if x.nearest_patient_id is not None})
        n_pat = len({p for p in index.patient_ids if p is not None})
        summary.update({"training_patients_copied": len(pats),
                        "share_training_patients_copied": round(len(pats) / max(n_pat, 1), 6),
                        "copied_patient_ids": pats})
    if self_test:
        summary["self_test"] = planted_copy_self_test(index, alpha=a)
    return AuditResult(images=verdicts, summary=summary)
