"""Voxel grid geometry in the DICOM patient frame (LPS) and its NIfTI (RAS) form.

Array convention: a volume is ``(slices, rows, columns)``; ``volume[k, r, c]`` is the voxel in slice
``k``, row ``r`` (top to bottom as displayed), column ``c`` (left to right as displayed). A 2D image is
the one-slice volume ``image[None]``. The patient frame is DICOM LPS (x to patient Left, y to
Posterior, z to Superior), in millimetres. With ``row_direction`` = the direction of increasing
column index (DICOM Image Orientation's first triplet), ``column_direction`` = the direction of
increasing row index (the second triplet) and ``normal = row_direction x column_direction``, voxel
``(k, r, c)`` lies at ``origin + c*dc*row_direction + r*dr*column_direction + k*dk*normal``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "Geometry",
    "AXIAL",
    "CORONAL",
    "SAGITTAL",
    "LPS_TO_RAS",
    "plane_for_view",
    "image_geometry",
    "validate_pixel_spacing",
]

#: Image Orientation (Patient) of an axial slice displayed radiologically (patient left on screen right).
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: A frontal radiograph / coronal slice: columns toward patient left, rows toward the feet.
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
#: A lateral radiograph / sagittal slice: columns toward posterior, rows toward the feet.
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
#: Nominal field of view (mm across the image width) assumed for 2D images without a pixel spacing.
DEFAULT_FIELD_OF_VIEW_MM = {"DX": 430.0, "CR": 430.0, "CT": 350.0, "MR": 240.0, "OT": 430.0}
_LATERAL_VIEWS = {"LATERAL", "LAT", "LL", "RL", "LLD", "RLD"}
#: diag(-1, -1, 1, 1): LPS to RAS (DESIGN.md §5).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _vec(values: Sequence[float], name: str, n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise ValueError(f"{name}={values!r}: expected {n} finite numbers")
    return arr


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a ``(slices, rows, columns)`` voxel grid lies in the patient (LPS) frame.

    Attributes:
        shape: ``(slices, rows, columns)``.
        spacing: ``(slice, row, column)`` spacing in mm; DICOM Pixel Spacing is ``spacing[1:]``
            (row spacing, i.e. between rows, then column spacing).
        orientation: Image Orientation (Patient): row direction then column direction (LPS unit
            vectors, orthogonal).
        origin: LPS position (mm) of the centre of voxel ``(0, 0, 0)`` (Image Position of slice 0).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: tuple[float, ...]
    origin: tuple[float, float, float]

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape={self.shape!r}: expected (slices, rows, columns), all >= 1")
        spacing = _vec(self.spacing, "spacing", 3)
        if (spacing <= 0).any():
            raise ValueError(f"spacing={self.spacing!r}: expected positive (slice, row, column) mm")
        orient = _vec(self.orientation, "orientation", 6)
        row, col = orient[:3], orient[3:]
        if abs(np.linalg.norm(row) - 1) > 1e-4 or abs(np.linalg.norm(col) - 1) > 1e-4 or abs(row @ col) > 1e-4:
            raise ValueError(f"orientation={self.orientation!r}: expected two orthogonal unit vectors")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", tuple(float(s) for s in spacing))
        object.__setattr__(self, "orientation", tuple(float(v) for v in orient))
        object.__setattr__(self, "origin", tuple(float(v) for v in _vec(self.origin, "origin", 3)))

    @classmethod
    def centred(
        cls,
        shape: Sequence[int],
        spacing: Sequence[float],
        orientation: Sequence[float] = AXIAL,
        centre: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> "Geometry":
        """A grid whose centre lies at ``centre`` (LPS mm)."""
        shape3 = tuple(int(s) for s in shape)
        if len(shape3) != 3:
            raise ValueError(f"shape={shape!r}: expected (slices, rows, columns)")
        probe = cls(shape3, tuple(spacing), tuple(orientation), (0.0, 0.0, 0.0))
        half = probe.lps_affine() @ np.array([(shape3[2] - 1) / 2, (shape3[1] - 1) / 2, (shape3[0] - 1) / 2, 1.0])
        origin = _vec(centre, "centre", 3) - half[:3]
        return cls(shape3, probe.spacing, probe.orientation, tuple(origin))

    @property
    def row_direction(self) -> np.ndarray:
        """LPS unit vector of increasing column index."""
        return np.array(self.orientation[:3])

    @property
    def column_direction(self) -> np.ndarray:
        """LPS unit vector of increasing row index."""
        return np.array(self.orientation[3:])

    @property
    def normal(self) -> np.ndarray:
        """LPS unit vector of increasing slice index (row x column direction)."""
        return np.cross(self.row_direction, self.column_direction)

    def lps_affine(self) -> np.ndarray:
        """4x4 map from voxel index ``(column, row, slice, 1)`` to LPS mm."""
        dk, dr, dc = self.spacing
        aff = np.eye(4)
        aff[:3, 0] = self.row_direction * dc
        aff[:3, 1] = self.column_direction * dr
        aff[:3, 2] = self.normal * dk
        aff[:3, 3] = self.origin
        return aff

    def ras_affine(self) -> np.ndarray:
        """4x4 map from NIfTI voxel index ``(i=column, j=row, k=slice, 1)`` to RAS mm."""
        return LPS_TO_RAS @ self.lps_affine()

    def slice_positions(self) -> np.ndarray:
        """``(slices, 3)`` LPS Image Position (Patient) of each slice's first voxel."""
        k = np.arange(self.shape[0])[:, None]
        return np.asarray(self.origin)[None, :] + k * self.spacing[0] * self.normal[None, :]

    def corners_ras(self) -> np.ndarray:
        """``(8, 3)`` RAS mm centres of the eight corner voxels (for cross-checks)."""
        nk, nr, nc = self.shape
        idx = np.array([[c, r, k, 1.0] for k in (0, nk - 1) for r in (0, nr - 1) for c in (0, nc - 1)])
        return (self.ras_affine() @ idx.T).T[:, :3]


def plane_for_view(modality: str, view: str | None) -> tuple[float, ...]:
    """Image Orientation (Patient) assumed for a 2D image of ``modality`` and ``view``.

    CT/MR slices are axial; radiographs are coronal (columns toward patient left, rows toward the
    feet: a PA/AP chest displayed with the patient's right on the viewer's left), or sagittal for a
    lateral view (columns toward posterior, rows toward the feet).
    """
    if modality in ("CT", "MR"):
        return AXIAL
    if view and str(view).strip().upper() in _LATERAL_VIEWS:
        return SAGITTAL
    return CORONAL


def validate_pixel_spacing(pixel_spacing: float | Sequence[float] | None) -> tuple[float, float] | None:
    """``None`` or a ``(row, column)`` spacing in mm from one or two positive numbers.

    Raises:
        ValueError: anything else.
    """
    if pixel_spacing is None:
        return None
    try:
        ps = np.atleast_1d(np.asarray(pixel_spacing, dtype=np.float64))
    except (TypeError, ValueError):
        ps = np.array([])
    if ps.shape not in ((1,), (2,)) or not np.isfinite(ps).all() or (ps <= 0).any():
        raise ValueError(f"pixel_spacing={pixel_spacing!r}: expected one or two positive mm values")
    return float(ps[0]), float(ps[-1])


def image_geometry(
    shape: Sequence[int], modality: str, view: str | None = None, pixel_spacing: Sequence[float] | None = None
) -> Geometry:
    """Geometry of a 2D ``(rows, columns)`` image as a one-slice volume centred at the origin.

    Args:
        shape: ``(rows, columns)``.
        modality: Chooses the plane (:func:`plane_for_view`) and the nominal field of view.
        view: Radiograph view (``PA``, ``AP``, ``LL``, ``lateral``, ...) or ``None``.
        pixel_spacing: ``(row, column)`` mm; ``None``: the modality's nominal field of view
            (:data:`DEFAULT_FIELD_OF_VIEW_MM`) across the width, square pixels. The slice
            thickness is taken equal to the row spacing (nominal).
    """
    rows, cols = (int(s) for s in shape)
    spacing = validate_pixel_spacing(pixel_spacing) or (DEFAULT_FIELD_OF_VIEW_MM.get(modality, 430.0) / cols,) * 2
    return Geometry.centred((1, rows, cols), (spacing[0], spacing[0], spacing[1]), plane_for_view(modality, view))


def image_slab(
    image: np.ndarray, modality: str, view: str | None = None, pixel_spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, Geometry]:
    """A 2D image as a ``(1, H, W)`` slab with its one-slice geometry (see :func:`image_geometry`).

    Args:
        image: ``(H, W)`` array, or ``(1, H, W)`` / ``(H, W, 1)``.

    Raises:
        ValueError: any other shape.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"image shape {np.shape(image)}: expected (H, W)")
    return arr[None], image_geometry(arr.shape, modality, view, pixel_spacing)


def volume_slab(
    volume: np.ndarray,
    spacing: Sequence[float],
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] | None = None,
) -> tuple[np.ndarray, Geometry]:
    """A ``(slices, rows, columns)`` volume with its geometry; ``origin=None`` centres it at 0.

    Raises:
        ValueError: not a non-empty 3D array, or bad geometry.
    """
    arr = np.asarray(volume)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"volume shape {arr.shape}: expected (slices, rows, columns)")
    if origin is None:
        return arr, Geometry.centred(arr.shape, spacing, orientation)
    return arr, Geometry(arr.shape, tuple(spacing), tuple(orientation), tuple(origin))
