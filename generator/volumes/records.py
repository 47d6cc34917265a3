"""Volume records: one study series as a 3D array with its geometry, intensities and text (no I/O).

Array convention (DESIGN.md §8): a volume is a ``float32`` array of shape ``(D, H, W)`` =
(slice, row, column) holding *physical* values (Hounsfield units for CT, scanner units for MR),
with a 4x4 affine that maps voxel indices ``(d, h, w, 1)`` to RAS+ world coordinates in mm
(+x = patient Right, +y = Anterior, +z = Superior; nibabel's convention). Ingest puts every volume in one fixed
voxel layout, the axial slice stack as a radiologist reads it:

- ``d`` runs inferior -> superior (+S),
- ``h`` runs anterior -> posterior (rows top to bottom on screen),
- ``w`` runs patient right -> patient left (columns left to right on screen),

up to the small rotation of an oblique acquisition, which stays in the affine. This is the
``(slices, rows, columns)`` layout of :mod:`exporters.geometry` with the axial Image Orientation
``(1, 0, 0, 0, 1, 0)`` (LPS), so a volume exports with ``spacing=Volume.spacing`` unchanged.

``spacing`` is ``(slice, row, column)`` in mm; it travels with the volume and agrees with the
affine's column norms (checked on construction), never re-derived from pixel counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from generator.data.records import IntensityMapping, SkippedFile

__all__ = [
    "DEFAULT_CT_WINDOW",
    "DEFAULT_MR_PERCENTILES",
    "LPS_TO_RAS",
    "Volume",
    "VolumeIngestResult",
    "VolumeFingerprint",
    "ct_mapping",
    "mr_mapping",
    "mapping_description",
]

#: HU range mapped to the model range ``[0, 1]`` for CT (air at 0; dense bone above 1024 HU clips).
DEFAULT_CT_WINDOW: tuple[float, float] = (-1024.0, 1024.0)
#: Percentiles of an MR volume's non-zero voxels mapped to 0 and 1.
DEFAULT_MR_PERCENTILES: tuple[float, float] = (0.5, 99.5)
#: diag(-1, -1, 1, 1): DICOM LPS <-> NIfTI RAS (DESIGN.md §5).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ct_mapping(window: Sequence[float] = DEFAULT_CT_WINDOW, bits_stored: int = 16) -> IntensityMapping:
    """The CT mapping: ``HU = low + x * (high - low)`` for model values ``x`` in ``[0, 1]``.

    Raises:
        ValueError: ``window`` is not two finite numbers with ``low < high``.
    """
    low, high = _pair(window, "window")
    return IntensityMapping(kind="ct_window", low=low, high=high, unit="HU", bits_stored=bits_stored,
                            modality="CT")


def mr_mapping(array: np.ndarray, percentiles: Sequence[float] = DEFAULT_MR_PERCENTILES,
               bits_stored: int = 16) -> IntensityMapping:
    """The MR mapping of one volume: its ``percentiles`` (of non-zero voxels) map to 0 and 1.

    Args:
        array: The volume, any shape, scanner units.
        percentiles: ``(low, high)`` percentiles in ``[0, 100]``.

    Raises:
        ValueError: bad ``percentiles``, or a volume without two distinct non-zero values.
    """
    p_lo, p_hi = _pair(percentiles, "percentiles")
    if not (0.0 <= p_lo < p_hi <= 100.0):
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {tuple(percentiles)!r}")
    values = np.asarray(array, dtype=np.float64)
    values = values[np.isfinite(values) & (values != 0)]
    if values.size == 0:
        raise ValueError("an MR volume needs non-zero voxels to set its percentile mapping; it is all 0")
    low, high = (float(v) for v in np.percentile(values, [p_lo, p_hi]))
    if not high > low:
        raise ValueError(f"MR percentiles {p_lo}/{p_hi} give the same value {low}: a constant volume")
    return IntensityMapping(kind=f"mr_percentile_{p_lo:g}_{p_hi:g}", low=low, high=high, unit="",
                            bits_stored=bits_stored, modality="MR")


def _pair(values: Sequence[float], name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (low, high), got {values!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be finite with low < high, got {values!r}")
    return lo, hi


@dataclass(eq=False)
class Volume:
    """One volume (one series) with its geometry, intensity mapping and text.

    Attributes:
        array: ``(D, H, W)`` float32, physical units (HU for CT), finite.
        affine: ``(4, 4)`` float64 voxel -> RAS+ mm (see the module docstring for the layout).
        spacing: ``(slice, row, column)`` mm, positive; equals the affine's column norms.
        intensity: Maps model values ``[0, 1]`` to physical ones (``ct_window`` or ``mr_percentile``).
        file_name: Path relative to the data root (a ``.nii.gz`` file or a series folder), POSIX.
        text: Report or caption (the prompt).
        attributes: Known attribute columns (``sex``, ``age``, ``findings``, ``label``, ...).
        patient_id: The patient id, or ``None``.
        extra: Other metadata columns, kept verbatim.

    Raises:
        ValueError: on construction, for a non-3D or non-finite array, a bad affine, or a
            ``spacing`` that disagrees with the affine by more than 1e-3 mm.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    intensity: IntensityMapping
    file_name: str = ""
    text: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    patient_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3 or min(arr.shape) < 1:
            raise ValueError(f"{self.file_name or 'volume'}: array must be (D, H, W), got shape {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{self.file_name or 'volume'}: array holds NaN or infinite values")
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
            raise ValueError(f"{self.file_name or 'volume'}: affine must be a finite invertible 4x4, got {aff!r}")
        if not np.allclose(aff[3], [0, 0, 0, 1]):
            raise ValueError(f"{self.file_name or 'volume'}: affine's last row must be (0, 0, 0, 1), got {aff[3]}")
        sp = tuple(float(s) for s in self.spacing)
        if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
            raise ValueError(f"{self.file_name or 'volume'}: spacing must be 3 positive mm, got {self.spacing!r}")
        norms = np.linalg.norm(aff[:3, :3], axis=0)
        if not np.allclose(norms, sp, atol=1e-3):
            raise ValueError(
                f"{self.file_name or 'volume'}: spacing={sp} disagrees with the affine's voxel sizes "
                f"{tuple(round(float(n), 6) for n in norms)}"
            )
        if not isinstance(self.intensity, IntensityMapping):
            raise ValueError(f"{self.file_name or 'volume'}: intensity must be an IntensityMapping, "
                             f"got {type(self.intensity).__name__}")
        self.array, self.affine, self.spacing = arr, aff, sp  # type: ignore[assignment]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def modality(self) -> str:
        """``"CT"``, ``"MR"`` or ``"OT"`` (from the intensity mapping)."""
        return self.intensity.modality

    def to_model(self) -> np.ndarray:
        """``(D, H, W)`` float32 in ``[0, 1]``: physical values through the intensity mapping, clipped."""
        lo, hi = self.intensity.low, self.intensity.high
        return np.clip((self.array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)

    def lps_origin(self) -> tuple[float, float, float]:
        """LPS mm of voxel ``(0, 0, 0)``: the ``origin`` that ``exporters`` ``add_volume`` takes."""
        lps = LPS_TO_RAS @ self.affine
        return tuple(float(v) for v in lps[:3, 3])  # type: ignore[return-value]

    def lps_orientation(self) -> tuple[float, ...]:
        """Image Orientation (Patient) of the slices: column direction then row direction (LPS)."""
        lps = LPS_TO_RAS @ self.affine
        col_dir = lps[:3, 2] / np.linalg.norm(lps[:3, 2])  # along w (a row of the image)
        row_dir = lps[:3, 1] / np.linalg.norm(lps[:3, 1])  # along h
        return tuple(float(v) for v in (*col_dir, *row_dir))

    def with_array(self, array: np.ndarray, affine: np.ndarray,
                   spacing: Sequence[float] | None = None) -> "Volume":
        """A copy with new voxels and geometry (text, mapping and attributes kept)."""
        sp = tuple(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)) if spacing is None else tuple(spacing)
        return Volume(array=array, affine=affine, spacing=sp, intensity=self.intensity,  # type: ignore[arg-type]
                      file_name=self.file_name, text=self.text, attributes=dict(self.attributes),
                      patient_id=self.patient_id, extra=dict(self.extra))


@dataclass
class VolumeIngestResult:
    """What :func:`generator.volumes.ingest.load_volumes` read.

    Attributes:
        records: Usable volumes, sorted by ``file_name``.
        skipped: Unusable rows, files or series, each with its reason.
        spacing: The common ``(slice, row, column)`` mm after resampling (``None``: kept as read).
        shape: The common ``(D, H, W)`` after crop/pad (``None``: kept as read).
        intensity: A dataset-level description of the mapping (``{"kind": "ct_window", ...}``).
        summary: One line: "read N volumes, skipped K (...)".
    """

    records: list[Volume]
    skipped: list[SkippedFile]
    spacing: tuple[float, float, float] | None
    shape: tuple[int, int, int] | None
    intensity: dict[str, Any]
    summary: str = ""

    def stack(self) -> np.ndarray:
        """``(N, D, H, W)`` float32 in ``[0, 1]`` (model range).

        Raises:
            ValueError: the records have different shapes (load with ``shape=``).
        """
        shapes = sorted({r.shape for r in self.records})
        if len(shapes) > 1:
            raise ValueError(f"records have {len(shapes)} different shapes {shapes[:5]}; load with shape=(D, H, W)")
        if not self.records:
            return np.zeros((0, 0, 0, 0), np.float32)
        return np.stack([r.to_model() for r in self.records])

    def fingerprint(self) -> str:
        """SHA-256 over file names, texts, shapes and model-range voxels (identifies, never contains, the data)."""
        h = VolumeFingerprint()
        for r in self.records:
            h.add(r.file_name, r.text, r.to_model())
        return h.hexdigest()


class VolumeFingerprint:
    """The SHA-256 of :meth:`VolumeIngestResult.fingerprint`, fed one volume at a time (the volume store
    computes it while writing, so both paths record the same ``data_fingerprint``)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"radsynth-volumes-v1")

    def add(self, file_name: str, text: str, model: np.ndarray) -> None:
        """Add one volume: ``model`` ``(D, H, W)`` float32 in ``[0, 1]``."""
        vox = np.ascontiguousarray(model, dtype="<f4")
        for part in (file_name.encode(), text.encode(), repr(tuple(int(s) for s in vox.shape)).encode(),
                     vox.tobytes()):
            self._h.update(len(part).to_bytes(8, "little"))
            self._h.update(part)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def mapping_description(mappings: Sequence[IntensityMapping]) -> dict[str, Any]:
    """Dataset-level mapping: the CT window when all are CT, else the MR percentile rule."""
    if not mappings:
        return {}
    kinds = {m.kind for m in mappings}
    first = mappings[0]
    if kinds == {"ct_window"}:
        return first.to_dict()
    if all(k.startswith("mr_percentile") for k in kinds) and len(kinds) == 1:
        lo, hi = first.kind.split("_")[2:4]
        return {"kind": "mr_percentile", "percentiles": [float(lo), float(hi)], "unit": "", "modality": "MR"}
    return {"kind": "mixed", "kinds": sorted(kinds)}
