"""Data ingest (DESIGN.md §3.1): the only code in ``generator`` that opens source files.

- :mod:`generator.data.records`: :class:`ImageRecord`, :class:`IntensityMapping`, :class:`IngestResult` (no I/O).
- :mod:`generator.data.metadata`: ``metadata.jsonl``/``.csv`` rows and the ``file_name`` resolver.
- :mod:`generator.data.readers`: pixel readers for PNG/JPEG, DICOM and NIfTI.
- :mod:`generator.data.dataset`: :func:`load_dataset` over an imagefolder, a DICOM folder or an ``.npz``.
- :mod:`generator.data.preparing` / :mod:`generator.data.prepared`: ``radsynth prepare`` writes a source once
  into sharded ``.npy`` files on disk; :class:`PreparedDataset` reads them with flat memory.
- :mod:`generator.data.augment`: augmentation that radiology allows (no left-right flips by default).

Dependencies run one way: records <- metadata <- readers <- dataset.
"""

from generator.data.augment import Augment
from generator.data.dataset import load_dataset
from generator.data.prepared import PreparedDataset, is_prepared
from generator.data.preparing import PrepareResult, SourceChanged, prepare
from generator.data.metadata import resolve_member
from generator.data.records import ATTRIBUTE_KEYS, ImageRecord, IngestResult, IntensityMapping, SkippedFile

__all__ = [
    "Augment", "PreparedDataset", "is_prepared", "PrepareResult", "SourceChanged", "prepare",
    "load_dataset", "resolve_member", "ATTRIBUTE_KEYS", "ImageRecord", "IngestResult",
    "IntensityMapping", "SkippedFile",
]
