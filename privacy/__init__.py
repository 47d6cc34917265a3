"""Memorization audit of synthetic images against their training data (DESIGN.md §4).

Takes numpy arrays plus metadata, never a pipeline object, so it works with images from any
generator. Modules, one kind of object each:

- :mod:`privacy.views`: pixel correlation (max over flips, shifts, small rotations/zooms), perceptual hash.
- :mod:`privacy.embedding`: a copy-detection CNN trained contrastively on the training images.
- :mod:`privacy.search`: exact chunked top-k search; an approximate FAISS IVF index (exact re-ranking,
  memory-mapped references) above ~1e5 references.
- :mod:`privacy.calibration`: conformal threshold of the max-over-views statistic from held-out → train similarities.
- :mod:`privacy.index`: :class:`ReferenceIndex` (build, save, load, score), immutable and calibrated.
- :mod:`privacy.audit`: per-image verdicts (:class:`Verdict`: keep / review / reject) and the dataset summary.
- :mod:`privacy.gate`: :class:`PrivacyGate`, used by ``radsynth generate --privacy-index``.
- :mod:`privacy.report`: JSON and HTML review page.

The main names are importable from the package (loaded on first use)::

    from privacy import ReferenceIndex, PrivacyGate, Verdict, audit_images
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ReferenceIndex": "privacy.index",
    "Scores": "privacy.index",
    "PrivacyGate": "privacy.gate",
    "audit_images": "privacy.audit",
    "AuditResult": "privacy.audit",
    "ImageVerdict": "privacy.audit",
    "Verdict": "privacy.audit",
    "Calibration": "privacy.calibration",
    "EmbedderConfig": "privacy.embedding",
    "SearchIndex": "privacy.search",
    "CopyEmbedder": "privacy.embedding",
    "write_json": "privacy.report",
    "write_html": "privacy.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'privacy' has no attribute {name!r}")
