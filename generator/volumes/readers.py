"""Readers of one volume: a 3D NIfTI file, a DICOM series folder, or the files of one DICOM series
(:func:`read_dicom_files`, for a series found in an archive folder) -> :class:`Volume` in the standard
layout (see :mod:`generator.volumes.records`), physical units kept (HU for CT).

DICOM series rules (one folder, or one list of files, = one series): files are grouped by
SeriesInstanceUID (a folder or list with several series is refused); slices must share Image
Orientation (Patient), rows, columns and Pixel Spacing; they are sorted by the projection of Image
Position (Patient) on the slice normal (row direction x column direction); the slice spacing comes
from those positions, which must be evenly spaced (a gap of about a whole multiple of the others is
reported as missing slices) and lie on the normal (no gantry tilt); stored values go through Rescale
Slope/Intercept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from generator.volumes.geometry import to_layout
from generator.volumes.records import DEFAULT_CT_WINDOW, DEFAULT_MR_PERCENTILES, LPS_TO_RAS, Volume, ct_mapping, mr_mapping

__all__ = ["SeriesError", "read_nifti", "read_dicom_series", "read_dicom_files", "NIFTI_SUFFIXES"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Relative tolerance on slice gaps before a series counts as unevenly spaced.
GAP_TOLERANCE = 0.01


class SeriesError(ValueError):
    """A file or series that cannot be read as one volume; the message is the reason."""


def _mapping(array: np.ndarray, modality: str, ct_window: Sequence[float], mr_percentiles: Sequence[float]):
    if modality == "MR":
        return mr_mapping(array, mr_percentiles)
    if modality == "CT":
        return ct_mapping(ct_window)
    raise SeriesError(f"modality must be 'CT' or 'MR', got {modality!r}")


def read_nifti(path: str | Path, *, modality: str = "CT", ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
               mr_percentiles: Sequence[float] = DEFAULT_MR_PERCENTILES, **fields: Any) -> Volume:
    """Read a 3D NIfTI file (``nib.as_closest_canonical``, then the standard layout).

    Args:
        path: ``.nii`` or ``.nii.gz``.
        modality: ``"CT"`` (values are HU) or ``"MR"``.
        ct_window: HU range mapped to ``[0, 1]`` for CT.
        mr_percentiles: Percentiles mapped to ``[0, 1]`` for MR.
        **fields: ``file_name``, ``text``, ``attributes``, ``patient_id``, ``extra`` of the Volume.

    Raises:
        SeriesError: unreadable file, not 3D (a 4D file with one volume is accepted), bad modality.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types
        raise SeriesError(f"{path.name}: not a readable NIfTI file ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SeriesError(f"{path.name}: expected a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise SeriesError(f"{path.name}: holds NaN or infinite values")
    array, affine = to_layout(data, np.asarray(img.affine, dtype=np.float64))
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    mapping = _mapping(array, modality, ct_window, mr_percentiles)
    return Volume(array=array, affine=affine, spacing=spacing, intensity=mapping, **fields)


def read_dicom_series(folder: str | Path, *, ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
                      mr_percentiles: Sequence[float] = DEFAULT_MR_PERCENTILES, **fields: Any) -> Volume:
    """Read one DICOM series folder (CT or MR image slices) as a volume.

    Args:
        folder: Folder with the series' files (any names; sub-folders ignored, non-DICOM files too).
        ct_window: HU range mapped to ``[0, 1]`` for CT.
        mr_percentiles: Percentiles mapped to ``[0, 1]`` for MR.
        **fields: ``file_name``, ``text``, ``attributes``, ``patient_id``, ``extra`` of the Volume.

    Raises:
        SeriesError: no slices, several series, inconsistent orientation or size, duplicate
            positions, uneven spacing, missing slices, gantry tilt, or an unsupported modality.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SeriesError(f"{folder.name}: not a folder")
    paths = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return read_dicom_files(paths, name=folder.name, ct_window=ct_window, mr_percentiles=mr_percentiles, **fields)


def read_dicom_files(paths: Sequence[str | Path], *, name: str, ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
                     mr_percentiles: Sequence[float] = DEFAULT_MR_PERCENTILES, **fields: Any) -> Volume:
    """Read the DICOM files of one series (CT or MR image slices, any order) as a volume.

    The core of :func:`read_dicom_series`, for callers that found the files themselves (e.g. one
    series out of an archive folder holding several). Files that are not DICOM, or DICOM objects
    without Pixel Data or Image Position/Orientation (Patient), are ignored.

    Args:
        paths: The series' files (read in full with ``pydicom.dcmread``).
        name: How messages name the series (e.g. its folder, relative to the data root).
        ct_window: HU range mapped to ``[0, 1]`` for CT.
        mr_percentiles: Percentiles mapped to ``[0, 1]`` for MR.
        **fields: ``file_name``, ``text``, ``attributes``, ``patient_id``, ``extra`` of the Volume;
            ``patient_id`` defaults to the first slice's PatientID.

    Returns:
        The volume in the standard layout: ``array`` ``(D, H, W)`` float32 in HU for CT (stored values
        through Rescale Slope/Intercept for MR), ``affine`` voxel -> RAS+ mm, ``spacing``
        ``(slice, row, column)`` mm.

    Raises:
        SeriesError: no slices, several series, inconsistent orientation or size, duplicate
            positions, uneven spacing, missing slices, gantry tilt, or an unsupported modality.
        ValueError: ``paths`` is one path rather than a list of them.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(paths, (str, Path)):
        raise ValueError(f"paths must be a list of files, got the single path {str(paths)!r} "
                         "(use read_dicom_series for a folder)")
    slices = []
    for p in paths:
        try:
            ds = pydicom.dcmread(str(p))
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "PixelData" not in ds or "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            continue
        slices.append(ds)
    if not slices:
        raise SeriesError(f"{name}: no DICOM image slices with Image Position/Orientation (Patient)")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in slices}
    if len(series) > 1:
        raise SeriesError(f"{name}: holds {len(series)} series (SeriesInstanceUID); one folder must be one series")
    modality = str(slices[0].get("Modality", "")).upper()
    if modality not in ("CT", "MR"):
        raise SeriesError(f"{name}: Modality {modality!r} is not CT or MR")
    if len(slices) < 2:
        raise SeriesError(f"{name}: a series needs at least 2 slices to give a slice spacing, got 1")

    iop = np.array([float(v) for v in slices[0].ImageOrientationPatient])
    for ds in slices[1:]:
        other = np.array([float(v) for v in ds.ImageOrientationPatient])
        if not np.allclose(other, iop, atol=1e-4):
            raise SeriesError(f"{name}: inconsistent orientation: ImageOrientationPatient {list(other)} "
                              f"differs from {list(iop)}")
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    pix = [float(v) for v in slices[0].PixelSpacing]
    for ds in slices[1:]:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise SeriesError(f"{name}: slices differ in size ({ds.Rows}x{ds.Columns} vs {rows}x{cols})")
        if not np.allclose([float(v) for v in ds.PixelSpacing], pix, atol=1e-4):
            raise SeriesError(f"{name}: slices differ in PixelSpacing")
    row_dir, col_dir = iop[:3], iop[3:]  # row_dir: along a row (increasing column); col_dir: down a column
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        raise SeriesError(f"{name}: two slices share a position along the slice normal")
    step = float(np.min(gaps))
    if not np.allclose(gaps, step, rtol=GAP_TOLERANCE, atol=1e-3):
        multiples = gaps / step
        if np.allclose(multiples, np.round(multiples), atol=0.05):
            missing = int(np.sum(np.round(multiples) - 1))
            raise SeriesError(f"{name}: {missing} missing slice(s): gaps of {sorted(set(np.round(gaps, 3)))} mm "
                              f"along the normal")
        raise SeriesError(f"{name}: uneven slice spacing: gaps {sorted(set(np.round(gaps, 3)))} mm")
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    if np.abs(offsets).max() > 1e-2 * max(step, 1.0):
        raise SeriesError(f"{name}: slice positions do not lie on the slice normal (gantry tilt or mixed stacks)")

    data = np.empty((len(slices), rows, cols), dtype=np.float32)
    for k, ds in enumerate(slices):
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        data[k] = ds.pixel_array.astype(np.float32) * slope + intercept
    # voxel (k, r, c) -> LPS: origin + k*step*normal + r*dr*col_dir + c*dc*row_dir
    lps = np.eye(4)
    lps[:3, 0] = normal * step
    lps[:3, 1] = col_dir * pix[0]
    lps[:3, 2] = row_dir * pix[1]
    lps[:3, 3] = positions[0]
    array, affine = to_layout(data, LPS_TO_RAS @ lps)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    mapping = _mapping(array, modality, ct_window, mr_percentiles)
    if "patient_id" not in fields or fields.get("patient_id") is None:
        pid = slices[0].get("PatientID")
        fields = {**fields, "patient_id": str(pid) if pid else None}
    return Volume(array=array, affine=affine, spacing=spacing, intensity=mapping, **fields)
