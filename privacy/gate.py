"""The privacy gate used during generation (``radsynth generate --privacy-index``).

Typical use::

    gate = PrivacyGate.load(index_dir)
    verdicts = gate.check(images)          # (N, R, R) float32 in [0, 1] at gate.resolution
    redo = [i for i, v in enumerate(verdicts) if gate.should_resample(v)]

or let :meth:`PrivacyGate.run_with_resampling` drive a sampler: it re-samples rejected images with
new seeds (recorded) up to a bound and reports how many were rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from privacy.audit import ImageVerdict, verdicts_from_scores
from privacy.index import ReferenceIndex

#: Offset between the seed of a rejected sample and the seed of its replacement.
RESAMPLE_SEED_STRIDE = 1_000_003


def resample_seed(seed: int, attempt: int) -> int:
    """Seed of the ``attempt``-th replacement (``attempt >= 1``) of a sample drawn with ``seed``."""
    return int(seed) + int(attempt) * RESAMPLE_SEED_STRIDE


@dataclass
class GateOutcome:
    """Result of :meth:`PrivacyGate.run_with_resampling`.

    Attributes:
        images: ``(N, R, R)`` final images (a still-rejected image is kept here, verdict ``reject``).
        seeds: ``(N,)`` seed of each final image.
        verdicts: Final verdict of each image.
        attempts: Per image, every seed tried, in order (the last one is ``seeds[i]``).
        n_rejected: Samples rejected along the way (each rejection counts once).
        n_unresolved: Images still rejected after ``max_resamples`` replacements.
    """

    images: np.ndarray
    seeds: list[int]
    verdicts: list[ImageVerdict]
    attempts: list[list[int]] = field(default_factory=list)
    n_rejected: int = 0
    n_unresolved: int = 0


class PrivacyGate:
    """Checks generated images against a :class:`~privacy.index.ReferenceIndex`.

    Args:
        index: A calibrated reference index.
        alpha: Reject false-flag rate; default the index's ``alpha``.
    """

    def __init__(self, index: ReferenceIndex, alpha: float | None = None) -> None:
        if index.calibration is None:
            raise ValueError("index has no calibration; build it with ReferenceIndex.build")
        if alpha is not None and not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.index = index
        self.alpha = index.alpha if alpha is None else float(alpha)

    @classmethod
    def load(cls, index_dir: str | Path, alpha: float | None = None) -> "PrivacyGate":
        """Gate from an index folder written by ``radsynth index``.

        Raises:
            FileNotFoundError: no index there.
        """
        return cls(ReferenceIndex.load(index_dir), alpha=alpha)

    @property
    def resolution(self) -> int:
        """Image side (pixels) the index was built at; :meth:`check` needs this size."""
        return self.index.resolution

    def check(self, images: np.ndarray, file_names: Sequence[str] | None = None) -> list[ImageVerdict]:
        """Verdicts for a batch of generated images.

        Args:
            images: ``(N, R, R)`` float32 in ``[0, 1]`` with ``R == self.resolution``.
            file_names: Optional ids, default ``"0"..."N-1"``.

        Returns:
            One :class:`~privacy.audit.ImageVerdict` per image.

        Raises:
            ValueError: wrong resolution (naming both), bad shape or range.
        """
        images = self.index.check_resolution(np.asarray(images), "images")
        names = [str(i) for i in range(len(images))] if file_names is None else list(file_names)
        return verdicts_from_scores(self.index, self.index.score(images), names, self.alpha)

    @staticmethod
    def should_resample(verdict: ImageVerdict) -> bool:
        """Whether generation should draw a replacement (verdict ``reject``)."""
        return verdict.verdict == "reject"

    def run_with_resampling(
        self,
        sample: Callable[[list[int]], np.ndarray],
        seeds: Sequence[int],
        max_resamples: int = 3,
    ) -> GateOutcome:
        """Sample, check, and re-sample rejected images with new seeds, up to a bound.

        Args:
            sample: ``sample(seeds) -> (len(seeds), R, R)`` float32 images in ``[0, 1]``; must be
                deterministic in the seeds.
            seeds: Initial seed per image.
            max_resamples: Replacements tried per image (``>= 0``); the loop always terminates.

        Returns:
            :class:`GateOutcome`.

        Raises:
            ValueError: negative ``max_resamples``, or ``sample`` returning the wrong count.
        """
        if max_resamples < 0:
            raise ValueError(f"max_resamples must be >= 0, got {max_resamples}")
        seeds = [int(s) for s in seeds]
        images = np.asarray(sample(seeds), dtype=np.float32)
        if len(images) != len(seeds):
            raise ValueError(f"sample returned {len(images)} images for {len(seeds)} seeds")
        images = images.copy()
        verdicts = self.check(images)
        attempts = [[s] for s in seeds]
        current = list(seeds)
        n_rejected = 0
        for attempt in range(1, max_resamples + 1):
            redo = [i for i, v in enumerate(verdicts) if self.should_resample(v)]
            if not redo:
                break
            n_rejected += len(redo)
            new_seeds = [resample_seed(seeds[i], attempt) for i in redo]
            new_images = np.asarray(sample(new_seeds), dtype=np.float32)
            if len(new_images) != len(redo):
                raise ValueError(f"sample returned {len(new_images)} images for {len(redo)} seeds")
            new_verdicts = self.check(new_images)
            for j, i in enumerate(redo):
                images[i] = new_images[j]
                verdicts[i] = new_verdicts[j]
                current[i] = new_seeds[j]
                attempts[i].append(new_seeds[j])
        unresolved = sum(self.should_resample(v) for v in verdicts)
        n_rejected += unresolved
        return GateOutcome(
            images=images,
            seeds=current,
            verdicts=verdicts,
            attempts=attempts,
            n_rejected=n_rejected,
            n_unresolved=unresolved,
        )
