"""The privacy gate used during generation (``radsynth generate --privacy-index``).

Typical use::

    gate = PrivacyGate.load(index_dir)
    verdicts = gate.check(images)          # (N, R, R) float32 in [0, 1] at gate.resolution
    redo = [i for i, v in enumerate(verdicts) if gate.should_resample(v)]

Re-sampling rejected images (new seeds, a bound on attempts) is the generator's job
(``generator.generation``); this module only judges images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from privacy.audit import ImageVerdict, Verdict, verdicts_from_scores
from privacy.index import ReferenceIndex


class PrivacyGate:
    """Checks generated images against a :class:`~privacy.index.ReferenceIndex`.

    Args:
        index: A calibrated reference index (every :class:`ReferenceIndex` is).
        alpha: Reject false-flag rate in ``(0, 1)``; default the index's ``alpha``.

    Raises:
        ValueError: ``alpha`` outside ``(0, 1)``.
    """

    def __init__(self, index: ReferenceIndex, alpha: float | None = None) -> None:
        if alpha is not None and not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.index = index
        self.alpha = index.alpha if alpha is None else float(alpha)

    @classmethod
    def load(cls, index_dir: str | Path, alpha: float | None = None) -> "PrivacyGate":
        """Gate from an index folder written by ``radsynth index``.

        Raises:
            FileNotFoundError: no index there.
            ValueError: a damaged index folder or a bad ``alpha``.
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
        return verdict.verdict is Verdict.REJECT
