"""The reference index: what an audit compares synthetic images against (DESIGN.md §4).

A :class:`ReferenceIndex` holds, for the training images at one resolution: the images themselves
(float16, for the review gallery and the pixel views), their perceptual hashes, their embeddings
under a :class:`~privacy.embedding.CopyEmbedder` trained on them, and a
:class:`~privacy.calibration.Calibration` (null distribution per view, thresholds at ``alpha``).

It is **training-derived data**: anyone holding it holds (downsampled) patient images. It is a
separate artifact, never written into a model folder or an export; :meth:`ReferenceIndex.save`
writes a ``README.md`` saying so.

Views and search:
- ``ncc``: max pixel correlation over left-right flips, shifts up to ``max_shift`` pixels of the
  NCC view and small rotations/zooms of the query (``warps``), computed exactly against candidate
  references: the top ``candidates`` of a blurred low-resolution correlation (with and without
  flip) and of the embedding view; the ``refine_top`` best candidates are then re-aligned to
  sub-pixel precision by warping the reference (:func:`privacy.views.refine_ncc`), which recovers
  the correlation that crops resized back lose between the grid's zooms and whole-pixel shifts.
  With ``noise_correction`` the correlation is divided by the
  attenuation that the query's estimated additive noise implies (see
  :func:`privacy.views.noise_corrected_ncc`).
- ``phash``: perceptual-hash similarity ``1 - hamming/64``, max over the query and its mirror.
- ``embedding``: cosine similarity of learned embeddings, max over the query and its mirror.
- ``mix``: multiple correlation of the query with the best pair of training images (the nearest
  one, and one found by searching the residual), which exposes blends of two training images.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np

from privacy import views as V
from privacy.calibration import Calibration, alpha_resolvable, patient_disjoint_split
from privacy.embedding import CopyEmbedder, EmbedderConfig, config_dict, train_embedder
from privacy.search import topk_search

#: Version of the on-disk layout.
INDEX_FORMAT = 1
#: Views computed, in report order.
VIEW_NAMES = ("ncc", "phash", "embedding", "mix")
#: Query warps (angle in degrees, zoom) searched by the pixel view: rotations up to 12 degrees and
#: zooms down to 0.85 (undoing crops of 85-100% that were resized back).
DEFAULT_WARPS = tuple((float(a), float(z)) for a in (-12, -6, 0, 6, 12) for z in (1.0, 0.95, 0.9, 0.85))
#: Files of an index folder.
INDEX_JSON = "index.json"
REFERENCES_FILE = "references.safetensors"
EMBEDDER_FILE = "embedder.safetensors"

_README = """# RadSynth reference index: CONTAINS TRAINING-DERIVED DATA

This folder was written by `radsynth index`. It holds the training images ({n} images at
{res} x {res} pixels, float16), their perceptual hashes and embeddings, an embedding network trained
on them, and the calibration of copy thresholds (held-out -> train similarities).

**Treat it like the training data itself**: the images are patient images (downsampled). Keep it
with the same access controls as the training set, never put it inside a model folder, a synthetic
dataset or an export, and delete it when the training data must be deleted.

- Built: {created}
- Resolution: {res} px; alpha (reject): {alpha}; alpha (review): {review_alpha}
- Held-out set for calibration: {holdout}
- Use: `radsynth audit --index THIS_FOLDER --synthetic SYNTHETIC_FOLDER` or
  `radsynth generate ... --privacy-index THIS_FOLDER`.

A passed audit means no synthetic image is more similar to a training image than real unseen images
usually are, under the views measured here. It is not a guarantee of privacy; only differentially
private training gives one.
"""


@dataclass
class Scores:
    """Similarities of query images to the references.

    Attributes:
        neighbours: view name -> ``(sims, idx)``, each ``(Q, k)``, sorted by decreasing similarity.
        nearest: view name -> ``(Q,)`` nearest-reference similarity.
        fused: ``(Q,)`` fused score (see :class:`~privacy.calibration.Calibration`).
    """

    neighbours: dict[str, tuple[np.ndarray, np.ndarray]]
    nearest: dict[str, np.ndarray]
    fused: np.ndarray

    def __len__(self) -> int:
        return int(len(self.fused))


@dataclass
class ReferenceIndex:
    """Training images' features, embedder and calibration at one resolution.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`, query with :meth:`score`.

    Attributes:
        resolution: Side of the square images the index was built at (pixels).
        ids: ``(N,)`` reference ids (training file names).
        patient_ids: ``(N,)`` patient id per reference, ``None`` where unknown.
        images: ``(N, R, R)`` float32 reference images in ``[0, 1]``.
        embedding: ``(N, D)`` float32 unit embeddings.
        phash: ``(N, 64)`` uint8 hash bits.
        embedder: The trained embedding network.
        calibration: Null distributions and standardization.
        alpha: Default false-flag rate for ``reject``.
        review_alpha: Default false-flag rate for ``review`` (>= ``alpha``).
        max_shift: Largest shift (pixels of the NCC view) searched.
        leak_threshold: Pixel NCC at or above which an image is a copy whatever the null says.
        candidates: Candidates per candidate view re-scored with the shifted NCC.
        refine_top: Best candidates per query (by the grid-searched NCC) whose alignment is then
            refined to sub-pixel precision by warping the reference (:func:`privacy.views.refine_ncc`);
            0 turns the refinement off (indexes saved before it existed load with 0).
        holdout: Description of the held-out set (source, counts, exclusions).
        info: Free-form build information (created, versions, timings).
    """

    resolution: int
    ids: list[str]
    patient_ids: list[str | None]
    images: np.ndarray
    embedding: np.ndarray
    phash: np.ndarray
    embedder: CopyEmbedder
    calibration: Calibration | None = None
    alpha: float = 0.01
    review_alpha: float = 0.05
    max_shift: int = 3
    leak_threshold: float = 0.995
    candidates: int = 32
    refine_top: int = 2
    smooth_sigma: float = 0.0
    warps: list[tuple[float, float]] = field(default_factory=lambda: list(DEFAULT_WARPS))
    noise_correction: bool = True
    holdout: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_images(
        cls,
        images: np.ndarray,
        ids: Sequence[str] | None = None,
        patient_ids: Sequence[str | None] | None = None,
        embedder: CopyEmbedder | None = None,
        embedder_config: EmbedderConfig | None = None,
        max_shift: int | None = None,
        progress: bool = True,
    ) -> "ReferenceIndex":
        """Reference features for ``images`` (no calibration yet).

        Args:
            images: ``(N, R, R)`` float images in ``[0, 1]``.
            ids: ``(N,)`` reference ids; default ``"0"..."N-1"``.
            patient_ids: ``(N,)`` patient ids or ``None``.
            embedder: A trained embedder to reuse; trained on ``images`` when ``None``.
            embedder_config: Settings for training the embedder.
            max_shift: NCC shift range; default :func:`privacy.views.default_max_shift`.
            progress: Show progress bars.

        Raises:
            ValueError: bad images, non-square images, or id lists of the wrong length.
        """
        images = V.check_images(images, "images")
        n, h, w = images.shape
        if h != w:
            raise ValueError(f"images must be square, got {h} x {w}; resample them to one resolution")
        ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
        if len(ids) != n:
            raise ValueError(f"ids has {len(ids)} entries but there are {n} images")
        pids = [None] * n if patient_ids is None else [None if p is None else str(p) for p in patient_ids]
        if len(pids) != n:
            raise ValueError(f"patient_ids has {len(pids)} entries but there are {n} images")
        if embedder is None:
            embedder = train_embedder(images, embedder_config, progress=progress)
        size = V.ncc_size(h)
        shift = V.default_max_shift(size) if max_shift is None else int(max_shift)
        if shift < 0 or size - 2 * shift < 4:
            raise ValueError(f"max_shift must be in [0, {(size - 4) // 2}] for a {size}-px view, got {max_shift}")
        return cls(
            resolution=int(h),
            ids=ids,
            patient_ids=pids,
            images=images,
            embedding=embedder.embed(images, progress=progress),
            phash=V.phash_bits(images),
            embedder=embedder,
            max_shift=shift,
        )

    @classmethod
    def build(
        cls,
        images: np.ndarray,
        ids: Sequence[str] | None = None,
        patient_ids: Sequence[str | None] | None = None,
        holdout_images: np.ndarray | None = None,
        holdout_ids: Sequence[str] | None = None,
        holdout_patient_ids: Sequence[str | None] | None = None,
        alpha: float = 0.01,
        review_alpha: float = 0.05,
        holdout_fraction: float = 0.2,
        embedder_config: EmbedderConfig | None = None,
        fused_views: Sequence[str] = VIEW_NAMES,
        leak_threshold: float = 0.995,
        max_leak_share: float = 0.05,
        seed: int = 0,
        progress: bool = True,
        refine_top: int = 2,
    ) -> "ReferenceIndex":
        """Build and calibrate an index from training images.

        Without ``holdout_images``, a patient-disjoint split of the training images (``seed``,
        ``holdout_fraction`` of patients) is held out: the embedder is trained and the null computed
        on the rest, then the held-out images are added to the references so copies of them are
        caught too (slightly optimistic: the null saw ``1 - holdout_fraction`` of the references).

        Held-out images are excluded from the null, and counted in :attr:`holdout`, when their
        patient id occurs in the training set or their pixel NCC to a training image is at least
        ``leak_threshold`` (a duplicate that leaked across the split).

        Args:
            images: ``(N, R, R)`` training images in ``[0, 1]``.
            ids: Training ids (file names).
            patient_ids: Training patient ids, ``None`` where unknown.
            holdout_images: ``(M, R, R)`` real images never used in training.
            holdout_ids: Their ids.
            holdout_patient_ids: Their patient ids.
            alpha: Reject false-flag rate, in ``(0, 1)``.
            review_alpha: Review false-flag rate, in ``[alpha, 1)``.
            holdout_fraction: Share of patients held out when splitting.
            embedder_config: Embedder training settings.
            fused_views: Views entering the fused decision.
            leak_threshold: Pixel correlation treated as an exact copy, in ``(0, 1]``.
            max_leak_share: If more than this share of independent held-out images reach
                ``leak_threshold``, that correlation is natural for the data rather than a sign of
                leaked duplicates: none is excluded, and the copy rule's threshold is raised above the
                largest held-out correlation (recorded in :attr:`holdout`).
            seed: Split seed.
            progress: Show progress.
            refine_top: Candidates per query whose NCC alignment is refined (see
                :attr:`refine_top`; 0: grid search only). Calibration uses the same setting.

        Raises:
            ValueError: bad arguments, a held-out set at another resolution, or an empty null.
        """
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not alpha <= review_alpha < 1.0:
            raise ValueError(f"review_alpha must be in [alpha={alpha}, 1), got {review_alpha}")
        if not 0.0 < leak_threshold <= 1.0:
            raise ValueError(f"leak_threshold must be in (0, 1], got {leak_threshold}")
        if not 0.0 <= max_leak_share <= 1.0:
            raise ValueError(f"max_leak_share must be in [0, 1], got {max_leak_share}")
        if int(refine_top) < 0:
            raise ValueError(f"refine_top must be >= 0, got {refine_top}")
        images = V.check_images(images, "images")
        n = len(images)
        ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
        pids = [None] * n if patient_ids is None else [None if p is None else str(p) for p in patient_ids]
        if len(ids) != n or len(pids) != n:
            raise ValueError(f"ids ({len(ids)}) and patient_ids ({len(pids)}) must match images ({n})")
        if holdout_images is None:
            ref_idx, hold_idx = patient_disjoint_split(pids, holdout_fraction, seed)
            h_images, h_ids, h_pids = images[hold_idx], [ids[i] for i in hold_idx], [pids[i] for i in hold_idx]
            source = (
                f"patient-disjoint split of the training data ({len(hold_idx)} of {n} images, "
                f"seed {seed}); no --holdout folder was given"
                if any(p is not None for p in pids)
                else f"random split of the training data ({len(hold_idx)} of {n} images, seed {seed}; "
                "no patient ids, so each image counts as its own patient); no --holdout folder was given"
            )
        else:
            h_images = V.check_images(holdout_images, "holdout_images")
            if h_images.shape[1:] != images.shape[1:]:
                raise ValueError(
                    f"holdout images are {h_images.shape[1]}x{h_images.shape[2]} but training images are "
                    f"{images.shape[1]}x{images.shape[2]}; load both at one resolution"
                )
            m = len(h_images)
            h_ids = [f"holdout:{i}" for i in range(m)] if holdout_ids is None else [str(i) for i in holdout_ids]
            h_pids = [None] * m if holdout_patient_ids is None else [None if p is None else str(p) for p in holdout_patient_ids]
            if len(h_ids) != m or len(h_pids) != m:
                raise ValueError(f"holdout_ids ({len(h_ids)}) and holdout_patient_ids ({len(h_pids)}) must match holdout_images ({m})")
            ref_idx = np.arange(n)
            source = f"separate held-out folder ({m} images)"

        # 1. references used for calibration, with an embedder trained on them only
        cal_index = cls.from_images(
            images[ref_idx],
            [ids[i] for i in ref_idx],
            [pids[i] for i in ref_idx],
            embedder_config=embedder_config,
            progress=progress,
        )
        cal_index.refine_top = int(refine_top)
        # 2. held-out images that are not independent of the references are left out of the null
        train_patients = {pids[i] for i in ref_idx if pids[i] is not None}
        same_patient = [j for j, p in enumerate(h_pids) if p is not None and p in train_patients]
        scores = cal_index.score(h_images, progress=progress, calibrated=False)
        independent = [j for j in range(len(h_images)) if j not in same_patient]
        ncc_h = scores.nearest["ncc"]
        leaked = [j for j in np.flatnonzero(ncc_h >= leak_threshold) if j not in same_patient]
        self_similar = len(independent) > 0 and len(leaked) > max_leak_share * len(independent)
        if self_similar:
            # So many held-out images reach the "exact copy" correlation that it is the data's natural
            # similarity (e.g. very homogeneous images), not leakage: keep them all in the null, and
            # raise the copy rule above every independent held-out image.
            leaked = []
            leak_threshold = max(leak_threshold, float(np.max(ncc_h[independent])) + 1e-4)
        drop = set(same_patient) | set(int(j) for j in leaked)
        keep = np.array([j for j in range(len(h_images)) if j not in drop], dtype=np.int64)
        if len(keep) == 0:
            raise ValueError(
                f"no held-out image is usable for calibration ({len(same_patient)} share a patient with "
                f"the training data, {len(leaked)} duplicate a training image)"
            )
        null = {v: scores.nearest[v][keep] for v in VIEW_NAMES}
        calibration = Calibration.fit(null, list(fused_views))

        # 3. final references: all training images (held-out split images added back)
        if len(ref_idx) == n:
            index = cal_index
        else:
            index = cls.from_images(images, ids, pids, embedder=cal_index.embedder, progress=progress)
            index.max_shift = cal_index.max_shift
            index.refine_top = cal_index.refine_top
        index.calibration = calibration
        index.alpha = float(alpha)
        index.review_alpha = float(review_alpha)
        index.leak_threshold = float(leak_threshold)
        index.holdout = {
            "source": source,
            "split": holdout_images is None,
            "n_holdout": int(len(h_images)),
            "n_null": int(len(keep)),
            "excluded_same_patient": [h_ids[j] for j in same_patient],
            "excluded_duplicates": [h_ids[int(j)] for j in leaked],
            "alpha_resolvable": bool(alpha_resolvable(len(keep), alpha)),
            "self_similar_data": bool(self_similar),
            "leak_threshold": float(leak_threshold),
        }
        index.info = {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "n_references": int(n),
            "n_patients": int(len({p for p in pids if p is not None})),
            "torch": torch.__version__,
        }
        return index

    # ------------------------------------------------------------------ query
    @property
    def ncc_size(self) -> int:
        """Side of the pixel-correlation view."""
        return V.ncc_size(self.resolution)

    def _ref_windows(self) -> np.ndarray:
        key = f"windows{self.max_shift}_{self.smooth_sigma}"
        if key not in self._cache:
            self._cache[key] = V.reference_windows(V.ncc_images(self.images, self.smooth_sigma), self.max_shift)
        return self._cache[key]

    def _ref_plain(self) -> np.ndarray:
        if "plain" not in self._cache:
            self._cache["plain"] = V.plain_ncc_features(self.images)
        return self._cache["plain"]

    def _ref_coarse(self) -> np.ndarray:
        if "coarse" not in self._cache:
            self._cache["coarse"] = V.coarse_features(self.images)
        return self._cache["coarse"]

    def ref_nn_similarity(self) -> np.ndarray:
        """``(N,)`` embedding similarity of each reference to its nearest *other* reference
        (computed once, then cached and saved with the index)."""
        if "ref_nn" not in self._cache:
            if len(self.ids) < 2:
                self._cache["ref_nn"] = np.full(len(self.ids), np.inf, dtype=np.float32)
            else:
                s, i = topk_search(self.embedding, self.embedding, 2)
                own = i[:, 0] == np.arange(len(i))
                self._cache["ref_nn"] = np.where(own, s[:, 1], s[:, 0]).astype(np.float32)
        return self._cache["ref_nn"]

    def check_resolution(self, images: np.ndarray, name: str = "images") -> np.ndarray:
        """Validate query images against the index resolution.

        Raises:
            ValueError: naming both resolutions when they differ.
        """
        images = V.check_images(images, name)
        if images.shape[1:] != (self.resolution, self.resolution):
            raise ValueError(
                f"{name} are {images.shape[1]}x{images.shape[2]} pixels but the reference index was built "
                f"at {self.resolution}x{self.resolution}; resample the images to {self.resolution} px "
                "or rebuild the index with --resolution"
            )
        return images

    def score(
        self, images: np.ndarray, k: int = 5, progress: bool = False, calibrated: bool = True
    ) -> Scores:
        """Nearest training images of each query under every view.

        Args:
            images: ``(Q, R, R)`` float images in ``[0, 1]`` at the index resolution.
            k: Neighbours kept per view.
            progress: Show progress.
            calibrated: Compute the fused score (needs :attr:`calibration`); else it is all-NaN.

        Returns:
            :class:`Scores`.

        Raises:
            ValueError: wrong resolution or ``k < 1``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        images = self.check_resolution(images)
        n_ref = len(self.ids)
        kk = min(k, n_ref)
        neighbours: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        # embedding view (query and its mirror)
        emb = self.embedder.embed(images, progress=progress)
        emb_f = self.embedder.embed(images[:, :, ::-1].copy(), progress=progress)
        c = min(self.candidates, n_ref)
        s1, i1 = topk_search(emb, self.embedding, c, progress=progress)
        s2, i2 = topk_search(emb_f, self.embedding, c, progress=progress)
        neighbours["embedding"] = _merge_variants([(s1, i1), (s2, i2)], kk)

        # perceptual hash (query and its mirror)
        ref_h = V.hash_features(self.phash)
        hs = [topk_search(V.hash_features(V.phash_bits(images, flip=f)), ref_h, kk) for f in (False, True)]
        hs = [(V.hash_similarity_from_dot(s), i) for s, i in hs]
        neighbours["phash"] = _merge_variants(hs, kk)

        # shifted NCC on candidates from the coarse pixel view and the embedding view
        ref_c = self._ref_coarse()
        cand = [
            topk_search(V.coarse_features(images, flip=f), ref_c, c, progress=progress)[1] for f in (False, True)
        ]
        cand_all = np.concatenate(cand + [i1, i2], axis=1)
        cand_all = _unique_rows(cand_all)
        query_ncc = V.ncc_images(images, self.smooth_sigma)
        sims, variant = V.shifted_ncc_max(
            query_ncc, self._ref_windows(), cand_all, self.max_shift,
            flips=True, warps=self.warps, return_argmax=True,
        )
        if self.refine_top > 0:
            # sub-pixel refinement of the best few alignments, warping the (clean) reference
            top = np.argsort(-sims, axis=1, kind="stable")[:, : self.refine_top]
            rows = np.repeat(np.arange(len(images)), top.shape[1])
            cols = top.ravel()
            ok = cand_all[rows, cols] >= 0
            rows, cols = rows[ok], cols[ok]
            init = V.decode_variant(variant[rows, cols], self.max_shift, True, self.warps)
            # pixel views of the few references involved only (no full-size cache)
            used, ref_pos = np.unique(cand_all[rows, cols], return_inverse=True)
            refined, _ = V.refine_ncc(
                query_ncc, V.ncc_images(self.images[used], self.smooth_sigma), rows, ref_pos.ravel(),
                init, self.max_shift,
            )
            sims[rows, cols] = np.maximum(sims[rows, cols], refined)
        if self.noise_correction:
            sims = V.noise_corrected_ncc(sims, images).astype(np.float32)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
        neighbours["ncc"] = (
            np.take_along_axis(sims, order, axis=1).astype(np.float32),
            np.take_along_axis(cand_all, order, axis=1).astype(np.int64),
        )
        # pair mixtures: nearest reference plus the best match of the residual
        ref_p = self._ref_plain()
        qp = V.plain_ncc_features(images)
        _, first = topk_search(qp, ref_p, min(2, n_ref))
        residual = V.residual_features(qp, ref_p, first[:, 0])
        _, second = topk_search(residual, ref_p, min(5, n_ref))
        mix = V.pair_mix_correlation(qp, ref_p, first, second)
        neighbours["mix"] = (mix[:, None], first[:, :1].astype(np.int64))
        nearest = {v: neighbours[v][0][:, 0].astype(np.float64) for v in VIEW_NAMES}
        if calibrated:
            if self.calibration is None:
                raise ValueError("the index has no calibration; build it with ReferenceIndex.build")
            fused = self.calibration.fuse(nearest)
        else:
            fused = np.full(len(images), np.nan)
        return Scores(neighbours={v: neighbours[v] for v in VIEW_NAMES}, nearest=nearest, fused=fused)

    def thresholds(self, alpha: float | None = None) -> dict[str, float]:
        """Decision thresholds of the fused views at ``alpha`` (default :attr:`alpha`): each view's
        conformal threshold at ``alpha / V`` (see :meth:`Calibration.margin`)."""
        if self.calibration is None:
            raise ValueError("the index has no calibration; build it with ReferenceIndex.build")
        a = self.alpha if alpha is None else float(alpha)
        return self.calibration.view_thresholds(a)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the index folder (JSON + safetensors + README), atomically.

        Files are written to a temporary sibling folder which then replaces ``directory``.

        Raises:
            FileExistsError: ``directory`` exists and ``overwrite`` is false.
            ValueError: the index is not calibrated.
        """
        if self.calibration is None:
            raise ValueError("refusing to save an uncalibrated index; build it with ReferenceIndex.build")
        directory = Path(directory)
        if directory.exists() and not overwrite:
            raise FileExistsError(f"{directory} already exists; pass --overwrite to replace it")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            save_np(
                {
                    "images": self.images.astype(np.float16),
                    "embedding": self.embedding.astype(np.float32),
                    "phash": self.phash.astype(np.uint8),
                    "ref_nn": self.ref_nn_similarity().astype(np.float32),
                },
                str(tmp / REFERENCES_FILE),
            )
            self.embedder.save(tmp / EMBEDDER_FILE)
            meta = {
                "format": INDEX_FORMAT,
                "kind": "radsynth-reference-index",
                "contains_training_data": True,
                "resolution": self.resolution,
                "alpha": self.alpha,
                "review_alpha": self.review_alpha,
                "max_shift": self.max_shift,
                "ncc_size": self.ncc_size,
                "leak_threshold": self.leak_threshold,
                "candidates": self.candidates,
                "refine_top": self.refine_top,
                "smooth_sigma": self.smooth_sigma,
                "warps": [list(w) for w in self.warps],
                "noise_correction": self.noise_correction,
                "thresholds": {
                    "alpha": self.thresholds(self.alpha),
                    "review_alpha": self.thresholds(self.review_alpha),
                },
                "holdout": self.holdout,
                "info": self.info,
                "embedder": config_dict(self.embedder.config),
                "calibration": self.calibration.to_dict(),
                "ids": self.ids,
                "patient_ids": self.patient_ids,
            }
            (tmp / INDEX_JSON).write_text(json.dumps(meta, indent=1))
            (tmp / "README.md").write_text(
                _README.format(
                    n=len(self.ids),
                    res=self.resolution,
                    created=self.info.get("created", "unknown"),
                    alpha=self.alpha,
                    review_alpha=self.review_alpha,
                    holdout=self.holdout.get("source", "unknown"),
                )
            )
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
                os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ReferenceIndex":
        """Read an index folder written by :meth:`save`.

        Raises:
            FileNotFoundError: missing folder or files.
            ValueError: not a RadSynth index, or an unknown format version.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"no reference index at {directory}; build one with 'radsynth index --data TRAIN_DIR --output {directory}'"
            )
        meta_path = directory / INDEX_JSON
        for p in (meta_path, directory / REFERENCES_FILE, directory / EMBEDDER_FILE):
            if not p.is_file():
                raise FileNotFoundError(f"{directory} is not a complete reference index: {p.name} is missing")
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != "radsynth-reference-index":
            raise ValueError(f"{meta_path} is not a RadSynth reference index (kind={meta.get('kind')!r})")
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{meta_path} has index format {meta.get('format')!r}; this RadSynth reads {INDEX_FORMAT}")
        arrays = load_np(str(directory / REFERENCES_FILE))
        index = cls(
            resolution=int(meta["resolution"]),
            ids=list(meta["ids"]),
            patient_ids=list(meta["patient_ids"]),
            images=arrays["images"].astype(np.float32),
            embedding=arrays["embedding"].astype(np.float32),
            phash=arrays["phash"].astype(np.uint8),
            embedder=CopyEmbedder.load(directory / EMBEDDER_FILE),
            calibration=Calibration.from_dict(meta["calibration"]),
            alpha=float(meta["alpha"]),
            review_alpha=float(meta["review_alpha"]),
            max_shift=int(meta["max_shift"]),
            leak_threshold=float(meta["leak_threshold"]),
            candidates=int(meta["candidates"]),
            refine_top=int(meta.get("refine_top", 0)),
            smooth_sigma=float(meta.get("smooth_sigma", 0.0)),
            warps=[(float(a), float(z)) for a, z in meta.get("warps", [[0.0, 1.0]])],
            noise_correction=bool(meta.get("noise_correction", False)),
            holdout=dict(meta.get("holdout", {})),
            info=dict(meta.get("info", {})),
        )
        if "ref_nn" in arrays:
            index._cache["ref_nn"] = arrays["ref_nn"].astype(np.float32)
        return index


def _merge_variants(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge top-k lists of several query variants: best similarity per reference, top ``k``."""
    sims = np.concatenate([r[0] for r in results], axis=1)
    idx = np.concatenate([r[1] for r in results], axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")
    sims = np.take_along_axis(sims, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    out_s = np.full((len(sims), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(sims), k), -1, dtype=np.int64)
    for q in range(len(sims)):
        _, first = np.unique(idx[q], return_index=True)
        first = np.sort(first)[:k]
        out_s[q, : len(first)] = sims[q, first]
        out_i[q, : len(first)] = idx[q, first]
    return out_s, out_i


def _unique_rows(cand: np.ndarray) -> np.ndarray:
    """Deduplicate candidate indices per row, padding with ``-1``."""
    srt = np.sort(cand, axis=1)
    dup = np.zeros_like(srt, dtype=bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    srt = np.where(dup, -1, srt)
    return np.sort(srt, axis=1)[:, ::-1].copy()
