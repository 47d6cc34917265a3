"""Write tiny synthetic DICOM CT series for the ingest tests (pydicom, no external files)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_series(folder: Path, hu: np.ndarray, *, spacing: Sequence[float] = (2.5, 0.8, 0.7),
                 iop: Sequence[float] = (1, 0, 0, 0, 1, 0), origin: Sequence[float] = (-10.0, -12.0, 30.0),
                 positions: Sequence[Sequence[float]] | None = None, names: Sequence[str] | None = None,
                 iops: Sequence[Sequence[float]] | None = None, series_uid: str | None = None,
                 modality: str = "CT", study_uid: str | None = None, patient_id: str = "SYN001",
                 patient_sex: str | None = None, patient_age: str | None = None) -> list[Path]:
    """One file per slice of ``hu`` ``(slices, rows, columns)``; slice k at ``origin + k*dk*normal``
    unless ``positions`` says otherwise. ``study_uid`` (default: one per folder) lets several series
    share a study; ``patient_sex``/``patient_age`` (e.g. ``"F"``, ``"070Y"``) are written when given.
    Returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    series_uid = series_uid or generate_uid(entropy_srcs=[str(folder)])
    study_uid = study_uid or generate_uid(entropy_srcs=[str(folder), "study"])
    paths = []
    for k in range(hu.shape[0]):
        pos = positions[k] if positions is not None else np.asarray(origin) + k * spacing[0] * normal
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(folder), str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.PatientID = patient_id
        if patient_sex is not None:
            ds.PatientSex = patient_sex
        if patient_age is not None:
            ds.PatientAge = patient_age
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [float(v) for v in (iops[k] if iops is not None else iop)]
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.round(hu[k] + 1024).astype("<u2").tobytes()
        name = names[k] if names is not None else f"slice{k:03d}.dcm"
        path = folder / name
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def lps_affine(spacing: Sequence[float], iop: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """Voxel ``(k, r, c)`` -> LPS mm of the series written by :func:`write_series`."""
    iop = np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    a = np.eye(4)
    a[:3, 0] = normal * spacing[0]
    a[:3, 1] = iop[3:] * spacing[1]
    a[:3, 2] = iop[:3] * spacing[2]
    a[:3, 3] = origin
    return a
