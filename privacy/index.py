"""The reference index: what an audit compares synthetic images against (DESIGN.md §4).

A :class:`ReferenceIndex` holds, for the training images at one resolution: the images themselves
(float16 on disk, for the review gallery and the pixel views), their perceptual hashes, their
embeddings under a :class:`~privacy.embedding.CopyEmbedder` trained on them, and a
:class:`~privacy.calibration.Calibration` (null distribution per view, the null of the decision
statistic). :meth:`ReferenceIndex.build` returns it complete and calibrated; it is immutable.

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
import hashlib
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np

from privacy import views as V
from privacy.calibration import Calibration, min_null_size, patient_disjoint_split
from privacy._files import staged_folder
from privacy.embedding import CopyEmbedder, EmbedderConfig, config_dict, train_embedder
from privacy.search import SearchIndex, topk_search

#: Version of the on-disk layout (2: max-standardized calibration, fingerprints, embedding.npy).
INDEX_FORMAT = 2
#: Views computed, in report order.
VIEW_NAMES = ("ncc", "phash", "embedding", "mix")
#: Query warps (angle in degrees, zoom) searched by the pixel view: rotations up to 12 degrees and
#: zooms down to 0.85 (undoing crops of 85-100% that were resized back).
DEFAULT_WARPS = tuple((float(a), float(z)) for a in (-12, -6, 0, 6, 12) for z in (1.0, 0.95, 0.9, 0.85))
#: Files of an index folder.
INDEX_JSON = "index.json"
REFERENCES_FILE = "references.safetensors"
EMBEDDER_FILE = "embedder.safetensors"
#: Reference embeddings as a plain ``.npy`` (memory-mapped on load, for large indexes).
EMBEDDING_FILE = "embedding.npy"
#: A held-out image whose largest absolute pixel difference to a training image is at most this
#: (one 8-bit grey level) is an exact duplicate of it.
EXACT_DUPLICATE_MAX_DIFF = 1.0 / 255.0 + 1e-6
#: Training images checked as identity copies after calibration (a degenerate null misses them).
SELF_CHECK_IMAGES = 8

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


def _readonly(a: np.ndarray, dtype: Any) -> np.ndarray:
    out = np.ascontiguousarray(a, dtype=dtype)
    if out is a and out.flags.writeable:
        out = out.copy()
    out.setflags(write=False)
    return out


def images_fingerprint(images: np.ndarray, extra: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of an image stack (shape and float32 bytes) plus optional JSON-able settings.

    Args:
        images: ``(N, H, W)`` float images.
        extra: Settings that change what would be derived from the images (e.g. an embedder config).

    Returns:
        ``"sha256:<hex>"``.
    """
    arr = np.ascontiguousarray(images, dtype=np.float32)
    h = hashlib.sha256()
    h.update(json.dumps([list(arr.shape), dict(extra or {})], sort_keys=True).encode())
    h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Scores:
    """Similarities of query images to the references.

    Attributes:
        neighbours: view name -> ``(sims, idx)``, each ``(Q, k)``, sorted by decreasing similarity.
        nearest: view name -> ``(Q,)`` float64 nearest-reference similarity.
        fused: ``(Q,)`` float64 decision statistic (max standardized similarity over the fused views,
            see :meth:`~privacy.calibration.Calibration.statistic`); all-NaN for uncalibrated scores.
    """

    neighbours: Mapping[str, tuple[np.ndarray, np.ndarray]]
    nearest: Mapping[str, np.ndarray]
    fused: np.ndarray

    def __len__(self) -> int:
        return int(len(self.fused))


@dataclass(frozen=True, eq=False)
class _ReferenceFeatures:
    """The uncalibrated stage: reference images, their features and the view settings.

    Internal to :mod:`privacy.index`: :meth:`ReferenceIndex.build` computes one (or two, when the
    held-out set is split off the training images), scores the held-out images with it, and wraps
    it with the calibration into a :class:`ReferenceIndex`.

    Attributes: see the properties of :class:`ReferenceIndex` of the same names.
    """

    resolution: int
    ids: tuple[str, ...]
    patient_ids: tuple[str | None, ...]
    images: np.ndarray
    embedding: np.ndarray
    phash: np.ndarray
    embedder: CopyEmbedder
    max_shift: int
    candidates: int = 32
    refine_top: int = 2
    smooth_sigma: float = 0.0
    warps: tuple[tuple[float, float], ...] = DEFAULT_WARPS
    noise_correction: bool = True
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name, arr, shape in (
            ("images", self.images, (n, self.resolution, self.resolution)),
            ("phash", self.phash, (n, V.HASH_BITS)),
        ):
            if tuple(arr.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(arr.shape)}")
        if self.embedding.ndim != 2 or len(self.embedding) != n:
            raise ValueError(f"embedding must have shape ({n}, D), got {tuple(self.embedding.shape)}")
        if len(self.patient_ids) != n:
            raise ValueError(f"patient_ids has {len(self.patient_ids)} entries but there are {n} references")
        size = V.ncc_size(self.resolution)
        if self.max_shift < 0 or size - 2 * self.max_shift < 4:
            raise ValueError(f"max_shift must be in [0, {(size - 4) // 2}] for a {size}-px view, got {self.max_shift}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.refine_top < 0:
            raise ValueError(f"refine_top must be >= 0, got {self.refine_top}")
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "patient_ids", tuple(None if p is None else str(p) for p in self.patient_ids))
        object.__setattr__(self, "images", _readonly(self.images, np.float32))
        object.__setattr__(self, "phash", _readonly(self.phash, np.uint8))
        if not isinstance(self.embedding, np.memmap):
            object.__setattr__(self, "embedding", _readonly(self.embedding, np.float32))
        object.__setattr__(self, "warps", tuple((float(a), float(z)) for a, z in self.warps))
        self.embedder.eval()

    @classmethod
    def compute(
        cls,
        images: np.ndarray,
        ids: Sequence[str],
        patient_ids: Sequence[str | None],
        embedder: CopyEmbedder,
        max_shift: int | None = None,
        refine_top: int = 2,
        progress: bool = False,
    ) -> "_ReferenceFeatures":
        """Features of ``(N, R, R)`` square images in ``[0, 1]`` under a trained ``embedder``."""
        size = V.ncc_size(images.shape[1])
        shift = V.default_max_shift(size) if max_shift is None else int(max_shift)
        return cls(
            resolution=int(images.shape[1]),
            ids=tuple(ids),
            patient_ids=tuple(patient_ids),
            images=images,
            embedding=embedder.embed(images, progress=progress),
            phash=V.phash_bits(images),
            embedder=embedder,
            max_shift=shift,
            refine_top=int(refine_top),
        )

    # ------------------------------------------------------------------ cached reference views
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

    def _searcher(self, name: str) -> SearchIndex:
        """Search index over one reference feature matrix (approximate above ~1e5 references)."""
        key = f"search_{name}"
        if key not in self._cache:
            feats = {
                "embedding": lambda: self.embedding,
                "coarse": self._ref_coarse,
                "hash": lambda: V.hash_features(self.phash),
            }[name]()
            self._cache[key] = SearchIndex(feats)
        return self._cache[key]

    def ref_nn_similarity(self) -> np.ndarray:
        """``(N,)`` embedding similarity of each reference to its nearest *other* reference."""
        if "ref_nn" not in self._cache:
            if len(self.ids) < 2:
                self._cache["ref_nn"] = np.full(len(self.ids), np.inf, dtype=np.float32)
            else:
                s, i = self._searcher("embedding").search(self.embedding, 2)
                own = i[:, 0] == np.arange(len(i))
                self._cache["ref_nn"] = np.where(own, s[:, 1], s[:, 0]).astype(np.float32)
        return self._cache["ref_nn"]

    # ------------------------------------------------------------------ scoring
    def neighbours(
        self, images: np.ndarray, k: int = 5, progress: bool = False
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
        """Top-``k`` neighbours and nearest similarity of each query under every view.

        Args:
            images: ``(Q, R, R)`` float32 in ``[0, 1]`` at :attr:`resolution` (validated by the caller).
            k: Neighbours kept per view (``>= 1``).
            progress: Show progress.

        Returns:
            ``(neighbours, nearest)`` as in :class:`Scores`.
        """
        n_ref = len(self.ids)
        kk = min(k, n_ref)
        neighbours: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        # embedding view (query and its mirror)
        emb = self.embedder.embed(images, progress=progress)
        emb_f = self.embedder.embed(images[:, :, ::-1].copy(), progress=progress)
        c = min(self.candidates, n_ref)
        s1, i1 = self._searcher("embedding").search(emb, c, progress=progress)
        s2, i2 = self._searcher("embedding").search(emb_f, c, progress=progress)
        neighbours["embedding"] = _merge_variants([(s1, i1), (s2, i2)], kk)

        # perceptual hash (query and its mirror)
        hs = [self._searcher("hash").search(V.hash_features(V.phash_bits(images, flip=f)), kk) for f in (False, True)]
        hs = [(V.hash_similarity_from_dot(s), i) for s, i in hs]
        neighbours["phash"] = _merge_variants(hs, kk)

        # shifted NCC on candidates from the coarse pixel view and the embedding view
        cand = [
            self._searcher("coarse").search(V.coarse_features(images, flip=f), c, progress=progress)[1]
            for f in (False, True)
        ]
        cand_all = _unique_rows(np.concatenate(cand + [i1, i2], axis=1))
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
        return {v: neighbours[v] for v in VIEW_NAMES}, nearest


@dataclass(frozen=True, eq=False)
class ReferenceIndex:
    """Training images' features, embedder and calibration at one resolution; immutable.

    Build with :meth:`build` (which returns it complete and calibrated), persist with
    :meth:`save` / :meth:`load`, query with :meth:`score` and :meth:`thresholds`.

    Attributes:
        features: The reference images and their features (internal; read them through the
            properties :attr:`resolution`, :attr:`ids`, :attr:`patient_ids`, :attr:`images`
            ``(N, R, R)`` float32 in ``[0, 1]``, :attr:`embedding` ``(N, D)`` float32 unit rows,
            :attr:`phash` ``(N, 64)`` uint8 bits, :attr:`embedder`, :attr:`max_shift`,
            :attr:`candidates`, :attr:`refine_top`, :attr:`smooth_sigma`, :attr:`warps`,
            :attr:`noise_correction`).
        calibration: Null distributions of held-out -> train similarity and of the decision
            statistic.
        alpha: Default false-flag rate for ``reject``, in ``(0, 1)``, resolvable by the null.
        review_alpha: Default false-flag rate for ``review``, in ``[alpha, 1)``.
        leak_threshold: Pixel NCC at or above which an image is a copy whatever the null says,
            in ``(0, 1]``; above 1 (self-similar data whose held-out images reach 1) the rule is off.
        holdout: Description of the held-out set: ``source``, ``split``, ``n_holdout``, ``n_null``,
            ``excluded_same_patient``, ``excluded_duplicates`` (near-exact, pixel NCC >=
            ``leak_threshold``), ``exact_duplicates``, ``min_null_size``, ``alpha_resolvable``,
            ``self_similar_data``, ``leak_threshold``, ``warnings`` (borderline conditions found
            at build time).
        data_fingerprint: ``images_fingerprint`` of the reference images (all training images).
        embedder_fingerprint: ``images_fingerprint`` of the images the embedder was trained on,
            with its config; :meth:`build` reuses the embedder of a ``previous`` index when equal.
        info: Free-form build information (created, versions, timings). A plain dict so that
            callers may add provenance before :meth:`save`; never put absolute paths here.
    """

    features: _ReferenceFeatures
    calibration: Calibration
    alpha: float = 0.01
    review_alpha: float = 0.05
    leak_threshold: float = 0.995
    holdout: Mapping[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    embedder_fingerprint: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not self.alpha <= self.review_alpha < 1.0:
            raise ValueError(f"review_alpha must be in [alpha={self.alpha}, 1), got {self.review_alpha}")
        if not 0.0 < self.leak_threshold < 2.0:
            raise ValueError(f"leak_threshold must be in (0, 2) (above 1: rule off), got {self.leak_threshold}")
        missing = [v for v in VIEW_NAMES if v not in self.calibration.views]
        if missing:
            raise ValueError(f"calibration has no null for view(s) {missing}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "review_alpha", float(self.review_alpha))
        object.__setattr__(self, "leak_threshold", float(self.leak_threshold))
        object.__setattr__(self, "holdout", MappingProxyType(json.loads(json.dumps(dict(self.holdout)))))

    # ------------------------------------------------------------------ read-only views of features
    @property
    def resolution(self) -> int:
        """Side of the square images the index was built at (pixels)."""
        return self.features.resolution

    @property
    def ids(self) -> tuple[str, ...]:
        """``(N,)`` reference ids (training file names)."""
        return self.features.ids

    @property
    def patient_ids(self) -> tuple[str | None, ...]:
        """``(N,)`` patient id per reference, ``None`` where unknown."""
        return self.features.patient_ids

    @property
    def images(self) -> np.ndarray:
        """``(N, R, R)`` float32 reference images in ``[0, 1]`` (read-only)."""
        return self.features.images

    @property
    def embedding(self) -> np.ndarray:
        """``(N, D)`` float32 unit embeddings (read-only; memory-mapped after :meth:`load`)."""
        return self.features.embedding

    @property
    def phash(self) -> np.ndarray:
        """``(N, 64)`` uint8 perceptual-hash bits (read-only)."""
        return self.features.phash

    @property
    def embedder(self) -> CopyEmbedder:
        """The trained embedding network (eval mode)."""
        return self.features.embedder

    @property
    def max_shift(self) -> int:
        """Largest shift (pixels of the NCC view) searched."""
        return self.features.max_shift

    @property
    def candidates(self) -> int:
        """Candidates per candidate view re-scored with the shifted NCC."""
        return self.features.candidates

    @property
    def refine_top(self) -> int:
        """Best NCC candidates per query re-aligned to sub-pixel precision (0: off)."""
        return self.features.refine_top

    @property
    def smooth_sigma(self) -> float:
        """Gaussian sigma (pixels of the NCC view) applied before the pixel correlation (0: none)."""
        return self.features.smooth_sigma

    @property
    def warps(self) -> tuple[tuple[float, float], ...]:
        """Query warps ``(angle_degrees, zoom)`` searched by the pixel view."""
        return self.features.warps

    @property
    def noise_correction(self) -> bool:
        """Whether the pixel correlation is corrected for the query's estimated additive noise."""
        return self.features.noise_correction

    @property
    def ncc_size(self) -> int:
        """Side of the pixel-correlation view."""
        return V.ncc_size(self.resolution)

    def ref_nn_similarity(self) -> np.ndarray:
        """``(N,)`` embedding similarity of each reference to its nearest *other* reference
        (computed once, then cached and saved with the index)."""
        return self.features.ref_nn_similarity()

    # ------------------------------------------------------------------ construction
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
        max_duplicate_share: float = 0.05,
        seed: int = 0,
        progress: bool = True,
        refine_top: int = 2,
        embedder: CopyEmbedder | None = None,
        previous: "ReferenceIndex | None" = None,
        holdout_name: str = "holdout_images",
        info: Mapping[str, Any] | None = None,
    ) -> "ReferenceIndex":
        """Build and calibrate an index from training images.

        Without ``holdout_images``, a patient-disjoint split of the training images (``seed``,
        ``holdout_fraction`` of patients) is held out: the embedder is trained and the null computed
        on the rest, then the held-out images are added to the references so copies of them are
        caught too (slightly optimistic: the null saw ``1 - holdout_fraction`` of the references).

        Held-out images are excluded from the null, and counted in :attr:`holdout`, when their
        patient id occurs in the training set or their pixel NCC to a training image is at least
        ``leak_threshold`` (a duplicate that leaked across the split). The build refuses a held-out
        set that is not independent of the training images, or too small to resolve ``alpha``,
        and warns (``UserWarning``, also recorded in ``holdout["warnings"]``) in borderline cases.

        The embedder is the costly part. It is reused, not trained, when ``embedder`` is given, or
        when ``previous`` (e.g. ``ReferenceIndex.load`` of the index being rebuilt) has the same
        :attr:`embedder_fingerprint` (same images for the embedder, same config).

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
            fused_views: Views entering the decision statistic.
            leak_threshold: Pixel correlation treated as an exact copy, in ``(0, 1]``.
            max_leak_share: If more than this share of independent held-out images reach
                ``leak_threshold`` and the training images are as similar among themselves, that
                correlation is natural for the data rather than a sign of leaked duplicates: none
                is excluded, and the copy rule's threshold is raised above the largest held-out
                correlation (recorded in :attr:`holdout`). If the training images are not, the
                held-out set overlaps the training set and the build is refused.
            max_duplicate_share: Largest share of held-out images that may be exact duplicates
                (every pixel within one 8-bit grey level) of a training image; they are excluded
                with a warning, beyond it the build is refused.
            seed: Split seed.
            progress: Show progress.
            refine_top: Candidates per query whose NCC alignment is refined (see
                :attr:`refine_top`; 0: grid search only). Calibration uses the same setting.
            embedder: An already trained embedder to use (not trained here).
            previous: An earlier index whose embedder is reused when its fingerprint matches.
            holdout_name: How error messages name the held-out set (e.g. ``"--holdout data/val"``).
            info: Extra build information stored in :attr:`info` (no absolute paths).

        Raises:
            ValueError: bad arguments, a held-out set at another resolution, a held-out set that
                duplicates the training images, too few held-out images for ``alpha``, or a
                calibration that would not reject exact copies of training images.
        """
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not alpha <= review_alpha < 1.0:
            raise ValueError(f"review_alpha must be in [alpha={alpha}, 1), got {review_alpha}")
        if not 0.0 < leak_threshold <= 1.0:
            raise ValueError(f"leak_threshold must be in (0, 1], got {leak_threshold}")
        if not 0.0 <= max_leak_share <= 1.0:
            raise ValueError(f"max_leak_share must be in [0, 1], got {max_leak_share}")
        if not 0.0 <= max_duplicate_share <= 1.0:
            raise ValueError(f"max_duplicate_share must be in [0, 1], got {max_duplicate_share}")
        if int(refine_top) < 0:
            raise ValueError(f"refine_top must be >= 0, got {refine_top}")
        images = V.check_images(images, "images")
        n, h, w = images.shape
        if h != w:
            raise ValueError(f"images must be square, got {h} x {w}; resample them to one resolution")
        ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
        pids = [None] * n if patient_ids is None else [None if p is None else str(p) for p in patient_ids]
        if len(ids) != n or len(pids) != n:
            raise ValueError(f"ids ({len(ids)}) and patient_ids ({len(pids)}) must match images ({n})")
        config = embedder_config or EmbedderConfig()
        t_start = _dt.datetime.now(_dt.timezone.utc)

        if holdout_images is None:
            ref_idx, hold_idx = patient_disjoint_split(pids, holdout_fraction, seed)
            h_images = images[hold_idx]
            h_ids = [ids[i] for i in hold_idx]
            h_pids = [pids[i] for i in hold_idx]
            source = (
                f"patient-disjoint split of the training data ({len(hold_idx)} of {n} images, "
                f"seed {seed}, holdout_fraction {holdout_fraction})"
            )
            holdout_name = f"holdout_fraction={holdout_fraction}"
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
        m = len(h_images)
        need = min_null_size(alpha)
        if m < need:
            raise ValueError(
                f"{holdout_name}: {m} held-out images cannot resolve alpha={alpha}: at least {need} are "
                f"needed (ceil(1/alpha - 1)); add held-out images or raise alpha"
            )

        # 1. embedder: given, reused from `previous`, or trained on the calibration references
        cal_images = images[ref_idx]
        emb_fp = images_fingerprint(cal_images, config_dict(config))
        reused = "trained"
        if embedder is not None:
            emb_fp, reused = f"supplied:{emb_fp}", "supplied"
        elif previous is not None and previous.embedder_fingerprint == emb_fp:
            embedder, reused = previous.embedder, "reused from previous index"
        else:
            embedder = train_embedder(cal_images, config, progress=progress)
        t_embedder = _dt.datetime.now(_dt.timezone.utc)
        cal_feats = _ReferenceFeatures.compute(
            cal_images, [ids[i] for i in ref_idx], [pids[i] for i in ref_idx], embedder,
            refine_top=int(refine_top), progress=progress,
        )

        # 2. held-out images that are not independent of the references are left out of the null
        train_patients = {pids[i] for i in ref_idx if pids[i] is not None}
        same_patient = [j for j, p in enumerate(h_pids) if p is not None and p in train_patients]
        independent = [j for j in range(m) if j not in same_patient]
        # exact duplicates (every pixel within one grey level of the unshifted nearest reference)
        _, near = topk_search(V.plain_ncc_features(h_images), cal_feats._ref_plain(), 1)
        diff = np.abs(h_images - cal_images[near[:, 0]]).reshape(m, -1).max(axis=1)
        exact = [j for j in independent if diff[j] <= EXACT_DUPLICATE_MAX_DIFF]
        if len(exact) > max_duplicate_share * m:
            raise ValueError(
                f"{holdout_name}: {len(exact)} of {m} held-out images are exact duplicates of training images "
                f"(more than max_duplicate_share={max_duplicate_share:g}); the held-out set must hold real "
                "images never used in training (e.g. the validation split), not the training images"
            )
        nb, nearest = cal_feats.neighbours(h_images, progress=progress)
        ncc_h = nearest["ncc"]
        near_exact = [j for j in independent if ncc_h[j] >= leak_threshold and j not in exact]
        leaked = sorted(near_exact + exact)
        warn: list[str] = []
        self_similar = False
        if len(independent) > 0 and len(near_exact) > max_leak_share * len(independent):
            train_share = _self_similar_share(cal_feats, leak_threshold, seed)
            if train_share <= max_leak_share:
                raise ValueError(
                    f"{holdout_name}: {len(near_exact)} of {len(independent)} independent held-out images are "
                    f"near-exact duplicates of training images (pixel correlation >= {leak_threshold}), more "
                    f"than max_leak_share={max_leak_share:g}, while only {train_share:.1%} of training images "
                    "are that close to another training image: the held-out set overlaps the training set"
                )
            # So many held-out images reach the "exact copy" correlation, and so do training images
            # among themselves, that it is the data's natural similarity (e.g. very homogeneous
            # images), not leakage: keep them all in the null and raise the copy rule above them.
            self_similar = True
            leaked = list(exact)
            rest = [j for j in independent if j not in exact]
            leak_threshold = max(leak_threshold, float(np.max(ncc_h[rest])) + 1e-4) if rest else leak_threshold
            warn.append(
                f"self-similar data: {len(rest)} held-out images correlate >= {leak_threshold:.4f} with training "
                "images as training images do among themselves; none treated as leaked, exact-copy rule "
                f"raised to pixel correlation >= {leak_threshold:.4f}"
            )
            if leak_threshold > 1.0:
                warn.append("held-out images reach pixel correlation 1.0: the exact-copy rule is off, copies "
                            "must stand out in the other views")
        if exact:
            warn.append(
                f"{len(exact)} held-out image(s) are exact duplicates of training images and were left out "
                f"of the null: {[h_ids[j] for j in exact][:5]}"
            )
        drop = set(same_patient) | set(int(j) for j in leaked)
        keep = np.array([j for j in range(m) if j not in drop], dtype=np.int64)
        if len(keep) < need:
            raise ValueError(
                f"{holdout_name}: only {len(keep)} of {m} held-out images remain for calibration "
                f"({len(same_patient)} share a patient with the training data, {len(leaked)} duplicate a "
                f"training image); alpha={alpha} needs at least {need} (ceil(1/alpha - 1)); add held-out "
                "images or raise alpha"
            )
        if len(keep) < 2 * need:
            warn.append(
                f"only {len(keep)} held-out images calibrate alpha={alpha} (at least {need} needed, "
                f"{2 * need} recommended): the threshold is the {len(keep) + 1 - int(np.floor(alpha * (len(keep) + 1)))}"
                f"-th of {len(keep)} null values, so the false-flag rate of this particular index varies "
                "widely around alpha"
            )
        calibration = Calibration.fit({v: nearest[v][keep] for v in VIEW_NAMES}, list(fused_views))

        # 3. final references: all training images (held-out split images added back)
        if len(ref_idx) == n:
            feats = cal_feats
        else:
            feats = _ReferenceFeatures.compute(
                images, ids, pids, embedder, max_shift=cal_feats.max_shift, refine_top=int(refine_top),
                progress=progress,
            )
        for w_msg in warn:
            warnings.warn(f"reference index: {w_msg}", UserWarning, stacklevel=2)
        t_end = _dt.datetime.now(_dt.timezone.utc)
        index = cls(
            features=feats,
            calibration=calibration,
            alpha=float(alpha),
            review_alpha=float(review_alpha),
            leak_threshold=float(leak_threshold),
            holdout={
                "source": source,
                "split": holdout_images is None,
                "n_holdout": int(m),
                "n_null": int(len(keep)),
                "excluded_same_patient": [h_ids[j] for j in same_patient],
                "excluded_duplicates": [h_ids[int(j)] for j in leaked],
                "exact_duplicates": [h_ids[int(j)] for j in exact],
                "min_null_size": int(need),
                "alpha_resolvable": True,
                "self_similar_data": bool(self_similar),
                "leak_threshold": float(leak_threshold),
                "warnings": warn,
            },
            data_fingerprint=images_fingerprint(images),
            embedder_fingerprint=emb_fp,
            info={
                "created": t_start.isoformat(timespec="seconds"),
                "n_references": int(n),
                "n_patients": int(len({p for p in pids if p is not None})),
                "torch": torch.__version__,
                "embedder": reused,
                "seconds_embedder": round((t_embedder - t_start).total_seconds(), 2),
                "seconds_build": round((t_end - t_start).total_seconds(), 2),
                **dict(info or {}),
            },
        )
        # 4. a calibration that lets exact copies of training images through is degenerate
        pick = np.random.default_rng(seed).choice(n, size=min(SELF_CHECK_IMAGES, n), replace=False)
        copies = images[np.sort(pick)]
        s = index.score(copies)
        caught = (s.fused > index.calibration.threshold(index.alpha)) | (s.nearest["ncc"] >= index.leak_threshold)
        if not caught.all():
            raise ValueError(
                f"{holdout_name}: the calibrated thresholds ({index.thresholds()}) do not reject "
                f"{int((~caught).sum())} of {len(copies)} exact copies of training images; the held-out set "
                "is not independent of the training set (or too similar to it) to calibrate a copy detector"
            )
        return index

    # ------------------------------------------------------------------ query
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

    def score(self, images: np.ndarray, k: int = 5, progress: bool = False) -> Scores:
        """Nearest training images of each query under every view, and the decision statistic.

        Args:
            images: ``(Q, R, R)`` float images in ``[0, 1]`` at the index resolution.
            k: Neighbours kept per view.
            progress: Show progress.

        Returns:
            :class:`Scores`.

        Raises:
            ValueError: wrong resolution or ``k < 1``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        images = self.check_resolution(images)
        neighbours, nearest = self.features.neighbours(images, k=k, progress=progress)
        return Scores(neighbours=neighbours, nearest=nearest, fused=self.calibration.statistic(nearest))

    def thresholds(self, alpha: float | None = None) -> dict[str, float]:
        """Each fused view's threshold at ``alpha`` (default :attr:`alpha`), in that view's units.

        An image is flagged at ``alpha`` exactly when some view's nearest similarity is strictly
        above its entry here (or its pixel NCC reaches :attr:`leak_threshold`; the ``ncc`` entry is
        capped at it).

        Raises:
            ValueError: ``alpha`` outside ``(0, 1)``.
        """
        a = self.alpha if alpha is None else float(alpha)
        thr = self.calibration.view_thresholds(a)
        if "ncc" in thr:
            thr["ncc"] = min(thr["ncc"], self.leak_threshold)
        return thr

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the index folder (JSON + safetensors + ``embedding.npy`` + README), atomically.

        Files are written to a temporary sibling folder which then replaces ``directory``; file
        modes follow the umask.

        Raises:
            FileExistsError: ``directory`` exists and ``overwrite`` is false.
        """
        directory = Path(directory)
        with staged_folder(directory, overwrite) as tmp:
            save_np(
                {
                    "images": np.asarray(self.images, dtype=np.float16),
                    "phash": np.asarray(self.phash, dtype=np.uint8),
                    "ref_nn": self.ref_nn_similarity().astype(np.float32),
                },
                str(tmp / REFERENCES_FILE),
            )
            np.save(tmp / EMBEDDING_FILE, np.asarray(self.embedding, dtype=np.float32))
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
                "holdout": dict(self.holdout),
                "data_fingerprint": self.data_fingerprint,
                "embedder_fingerprint": self.embedder_fingerprint,
                "info": self.info,
                "embedder": config_dict(self.embedder.config),
                "calibration": self.calibration.to_dict(),
                "ids": list(self.ids),
                "patient_ids": list(self.patient_ids),
            }
            (tmp / INDEX_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
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
        return directory

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> "ReferenceIndex":
        """Read an index folder written by :meth:`save`.

        Args:
            directory: The index folder.
            mmap: Memory-map ``embedding.npy`` (read-only) instead of reading it into memory.

        Raises:
            FileNotFoundError: missing folder or files.
            ValueError: not a RadSynth index, an unknown format version, or a truncated, empty or
                corrupt file (naming the file and the problem).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"no reference index at {directory}; build one with 'radsynth index --data TRAIN_DIR --output {directory}'"
            )
        meta_path = directory / INDEX_JSON
        for name in (INDEX_JSON, REFERENCES_FILE, EMBEDDER_FILE, EMBEDDING_FILE):
            p = directory / name
            if not p.is_file():
                raise FileNotFoundError(f"{directory} is not a complete reference index: {name} is missing")
            if p.stat().st_size == 0:
                raise ValueError(f"{p} is empty (0 bytes): the index folder is damaged; rebuild it")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{meta_path} is not valid JSON (truncated or corrupt?): {exc}") from None
        if not isinstance(meta, dict) or meta.get("kind") != "radsynth-reference-index":
            kind = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{meta_path} is not a RadSynth reference index (kind={kind!r})")
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(
                f"{meta_path} has index format {meta.get('format')!r}; this RadSynth reads {INDEX_FORMAT}: "
                "rebuild the index with 'radsynth index ... --overwrite'"
            )
        ref_path = directory / REFERENCES_FILE
        try:
            arrays = load_np(str(ref_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{ref_path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
        emb_path = directory / EMBEDDING_FILE
        try:
            embedding = np.load(emb_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"{emb_path} is not a readable .npy file (truncated or corrupt?): {exc}") from None
        emb_model_path = directory / EMBEDDER_FILE
        try:
            embedder = CopyEmbedder.load(emb_model_path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{emb_model_path} is not a readable embedder (truncated or corrupt?): {exc}") from None
        missing = [k for k in ("images", "phash") if k not in arrays]
        if missing:
            raise ValueError(f"{ref_path} lacks the array(s) {missing}")
        try:
            feats = _ReferenceFeatures(
                resolution=int(meta["resolution"]),
                ids=tuple(meta["ids"]),
                patient_ids=tuple(meta["patient_ids"]),
                images=arrays["images"].astype(np.float32),
                embedding=embedding if embedding.dtype == np.float32 else embedding.astype(np.float32),
                phash=arrays["phash"].astype(np.uint8),
                embedder=embedder,
                max_shift=int(meta["max_shift"]),
                candidates=int(meta["candidates"]),
                refine_top=int(meta["refine_top"]),
                smooth_sigma=float(meta["smooth_sigma"]),
                warps=tuple((float(a), float(z)) for a, z in meta["warps"]),
                noise_correction=bool(meta["noise_correction"]),
            )
            index = cls(
                features=feats,
                calibration=Calibration.from_dict(meta["calibration"]),
                alpha=float(meta["alpha"]),
                review_alpha=float(meta["review_alpha"]),
                leak_threshold=float(meta["leak_threshold"]),
                holdout=dict(meta.get("holdout", {})),
                data_fingerprint=str(meta.get("data_fingerprint", "")),
                embedder_fingerprint=str(meta.get("embedder_fingerprint", "")),
                info=dict(meta.get("info", {})),
            )
        except KeyError as exc:
            raise ValueError(f"{meta_path} lacks the key {exc.args[0]!r}") from None
        except ValueError as exc:
            raise ValueError(f"{directory} is inconsistent: {exc}") from None
        if "ref_nn" in arrays:
            feats._cache["ref_nn"] = arrays["ref_nn"].astype(np.float32)
        return index

    def with_info(self, **info: Any) -> "ReferenceIndex":
        """A copy of this index with ``info`` entries added (e.g. provenance set by the CLI)."""
        return replace(self, info={**self.info, **info})




def _self_similar_share(feats: _ReferenceFeatures, leak_threshold: float, seed: int, sample: int = 256) -> float:
    """Share of (up to ``sample``) training images whose nearest *other* training image reaches
    ``leak_threshold`` in the pixel view: how self-similar the training data is."""
    n = len(feats.ids)
    if n < 2:
        return 0.0
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    imgs = feats.images[pick]
    sims, idx = feats.neighbours(imgs, k=2)[0]["ncc"]
    own = idx[:, 0] == pick
    other = np.where(own, sims[:, 1] if sims.shape[1] > 1 else -np.inf, sims[:, 0])
    return float(np.mean(other >= leak_threshold))


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
