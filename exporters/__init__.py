"""Exporters: synthetic images as DICOM studies and NIfTI volumes with honest, synthetic headers.

Takes arrays plus metadata (never a pipeline object) and so works on images from any generator
(DESIGN.md §2, §5). Pixel convention: ``float32`` in ``[0, 1]``, 0 = black (MONOCHROME2), ``(H, W)``
images or ``(slices, rows, columns)`` volumes; DICOM geometry in LPS, NIfTI affines in RAS.

Main entry points:
    :class:`DicomExporter` - ``.add(image, metadata)`` / ``.add_volume(volume, metadata, spacing)``.
    :class:`NiftiExporter` - the same for NIfTI-1 with JSON sidecars.
    :func:`export_imagefolder` - convert an imagefolder of PNGs and/or NIfTI volumes (``radsynth
    export``): every row checked first, resumable, nothing outside the folder read.
    :func:`resolve_member` - a metadata ``file_name`` resolved safely inside its folder.
"""

from exporters.dicom import DicomExporter
from exporters.folder import export_imagefolder, read_imagefolder, resolve_member
from exporters.geometry import AXIAL, CORONAL, SAGITTAL, Geometry
from exporters.identity import SyntheticPatient
from exporters.intensity import PixelEncoding
from exporters.nifti import NiftiExporter
from exporters.provenance import Provenance
from exporters.uids import derive_uid

__all__ = [
    "DicomExporter",
    "NiftiExporter",
    "export_imagefolder",
    "read_imagefolder",
    "resolve_member",
    "Geometry",
    "AXIAL",
    "CORONAL",
    "SAGITTAL",
    "SyntheticPatient",
    "PixelEncoding",
    "Provenance",
    "derive_uid",
]
