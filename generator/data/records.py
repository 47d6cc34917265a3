"""Training records and their intensity mapping: the data contract of DESIGN.md §3.1 (no I/O).

Pixel convention everywhere in RadSynth: a 2D image is a ``float32`` array of shape ``(H, W)`` with
values in ``[0, 1]``, 0 meaning black (MONOCHROME2: low attenuation is dark), rows top to bottom,
columns left to right as the image is displayed (patient right on the image left for a frontal
radiograph). ``IntensityMapping`` says how that range maps back to stored or physical values.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["ATTRIBUTE_KEYS", "IntensityMapping", "ImageRecord", "SkippedFile", "IngestResult"]

#: Attribute columns that RadSynth understands (DESIGN.md §3.1); other columns are kept in ``extra``.
ATTRIBUTE_KEYS = ("patient_id", "modality", "view", "sex", "age", "findings", "label")


@dataclass(frozen=True)
class IntensityMapping:
    """Linear map from model range ``[0, 1]`` back to stored/physical values.

    ``physical = low + x * (high - low)`` for ``x`` in ``[0, 1]``.

    Attributes:
        kind: How the source was read: ``"png8"``, ``"png16"``, ``"jpeg"``, ``"dicom_voi"``,
            ``"ct_window"``, ``"nifti"``, ``"npz_uint8"``; also ``"dicom_minmax"`` (no window:
            the image's own range), ``"dicom_voi_lut"`` (non-linear VOI LUT, approximate),
            ``"dicom_rgb"``, ``"npz_uint16"``, ``"npz_float"``; ``"_inverted"`` appended for
            MONOCHROME1 DICOM.
        low: Physical value shown as black (e.g. -160 HU for a CT window 40/400, or 0 for 8-bit).
            Readers always give ``low < high``; for a MONOCHROME1 source (kind ending
            ``"_inverted"``) they describe the MONOCHROME2 picture, see :mod:`generator.data.readers`.
        high: Physical value shown as white (e.g. 240 HU, or 255 for 8-bit).
        unit: Physical unit of ``low``/``high`` (``"HU"`` for CT, ``""`` for unitless grey levels).
        bits_stored: Bit depth of the source pixels (8 or 16 for PNG; BitsStored for DICOM; 8 or
            16 for NIfTI and ``.npz``, 16 standing for any wider or floating-point type).
        modality: DICOM modality of the source (``"DX"``, ``"CR"``, ``"CT"``, ``"MR"``, ``"OT"``).
    """

    kind: str
    low: float
    high: float
    unit: str = ""
    bits_stored: int = 8
    modality: str = "OT"

    def to_physical(self, x: np.ndarray) -> np.ndarray:
        """Map model-range values (any shape, ``[0, 1]``) to physical values (float64)."""
        return self.low + np.asarray(x, dtype=np.float64) * (self.high - self.low)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, stored in ``radsynth.json`` and manifests."""
        return {
            "kind": self.kind,
            "low": float(self.low),
            "high": float(self.high),
            "unit": self.unit,
            "bits_stored": int(self.bits_stored),
            "modality": self.modality,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IntensityMapping":
        """Inverse of :meth:`to_dict`."""
        return cls(
            kind=str(d["kind"]),
            low=float(d["low"]),
            high=float(d["high"]),
            unit=str(d.get("unit", "")),
            bits_stored=int(d.get("bits_stored", 8)),
            modality=str(d.get("modality", "OT")),
        )


@dataclass
class ImageRecord:
    """One training image with its text.

    Attributes:
        file_name: Path relative to the data root, POSIX separators (for a slice of a volume:
            ``"vol.nii.gz#z=12"``; for an ``.npz``: ``"file.npz#train/17"``).
        text: Report or caption text used as the prompt.
        image: ``(H, W)`` float32 in ``[0, 1]`` at the source resolution, or at the requested
            resolution when :func:`load_dataset` was given one.
        attributes: Known attribute columns present for this record (subset of ``ATTRIBUTE_KEYS``).
        intensity: How this record's pixels map back to physical values.
        extra: Other metadata columns, kept verbatim.
    """

    file_name: str
    text: str
    image: np.ndarray
    attributes: dict[str, Any] = field(default_factory=dict)
    intensity: IntensityMapping | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def patient_id(self) -> str | None:
        """The record's patient id, or ``None`` when the data has none."""
        pid = self.attributes.get("patient_id")
        return None if pid is None else str(pid)


@dataclass
class SkippedFile:
    """A file that could not be used, with the reason (reported, counted, never fatal alone)."""

    path: str
    reason: str


@dataclass
class IngestResult:
    """What :func:`load_dataset` read.

    Attributes:
        root: The data folder (or ``.npz`` file) that was read.
        records: Usable images, in a deterministic order (sorted by ``file_name``).
        skipped: Unusable files with reasons.
        intensity: The dataset-level mapping (the most common one among records).
        source: ``"imagefolder"``, ``"dicom_folder"`` or ``"npz"``.
        ignored: Image files present under ``root`` but not listed in any metadata file.
        summary: The one-line summary ("read N images from F files, skipped K (...)").
    """

    root: Path
    records: list[ImageRecord]
    skipped: list[SkippedFile]
    intensity: IntensityMapping
    source: str
    ignored: int = 0
    summary: str = ""

    def stack(self) -> np.ndarray:
        """All images as one ``(N, H, W)`` float32 array in ``[0, 1]``.

        Raises:
            ValueError: if the records have different shapes (load with ``resolution``).
        """
        if not self.records:
            return np.zeros((0, 0, 0), dtype=np.float32)
        shapes = Counter(r.image.shape for r in self.records)
        if len(shapes) > 1:
            listed = ", ".join(f"{s} x{n}" for s, n in shapes.most_common(5))
            raise ValueError(
                f"records have {len(shapes)} different image shapes ({listed}); "
                "load the dataset with resolution=R to resize them to R x R"
            )
        return np.stack([np.asarray(r.image, dtype=np.float32) for r in self.records])

    def fingerprint(self) -> str:
        """SHA-256 hex digest over file names, texts and pixel bytes: identifies the training data
        without containing it.

        Each record contributes its file name, text, image shape and float32 little-endian pixel
        bytes, each length-prefixed, in record order; the digest is stable across runs and
        platforms for the same files and ``load_dataset`` arguments.
        """
        h = hashlib.sha256(b"radsynth-ingest-v1")
        for r in self.records:
            pixels = np.ascontiguousarray(r.image, dtype="<f4")
            for part in (r.file_name.encode("utf-8"), r.text.encode("utf-8"),
                         repr(tuple(pixels.shape)).encode("ascii"), pixels.tobytes()):
                h.update(len(part).to_bytes(8, "little"))
                h.update(part)
        return h.hexdigest()
