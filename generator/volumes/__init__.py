"""Volumes (3D CT/MR): ingest, a 3D phantom, MONAI 3D networks, the sampling pipeline, a trainer, previews.

- :mod:`generator.volumes.records`: :class:`Volume` ``(D, H, W)`` + RAS affine + spacing + mapping.
- :mod:`generator.volumes.readers`: NIfTI and DICOM series readers (a series folder or a list of files).
- :mod:`generator.volumes.geometry`: standard layout, resampling, crop/pad.
- :mod:`generator.volumes.ingest`: :func:`load_volumes` / :func:`iter_volumes` for an imagefolder of
  volumes or a DICOM archive (one volume per series, texts from a reports CSV).
- :mod:`generator.volumes.store`: the on-disk volume store of ``train --dims 3 --stream-from-disk``.
- :mod:`generator.volumes.phantom`: procedural CT phantom in HU and its imagefolder writer.
- :mod:`generator.volumes.models`: :class:`VolumeModelConfig`, presets, MONAI network builders.
- :mod:`generator.volumes.model_folder`: save/load volume model folders.
- :mod:`generator.volumes.pipeline`: :class:`VolumePipeline`.
- :mod:`generator.volumes.training`: :class:`VolumeTrainer` (data-parallel through ``accelerate``; its loop
  is separate from the 2D trainer's, the UNet recipe is shared: :mod:`generator.recipe`).
- :mod:`generator.volumes.previews`: axial/coronal/sagittal preview PNGs.
- :mod:`generator.volumes.generation`: generation runs into a folder (NIfTI via a writer callable, previews,
  manifest, resume, privacy gate callable).

Names are imported lazily (``from generator.volumes import load_volumes`` imports only ingest).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Volume": "generator.volumes.records",
    "VolumeIngestResult": "generator.volumes.records",
    "ct_mapping": "generator.volumes.records",
    "mr_mapping": "generator.volumes.records",
    "read_nifti": "generator.volumes.readers",
    "read_dicom_series": "generator.volumes.readers",
    "read_dicom_files": "generator.volumes.readers",
    "SeriesError": "generator.volumes.readers",
    "resample": "generator.volumes.geometry",
    "crop_or_pad": "generator.volumes.geometry",
    "centred_affine": "generator.volumes.geometry",
    "load_volumes": "generator.volumes.ingest",
    "iter_volumes": "generator.volumes.ingest",
    "VolumeStore": "generator.volumes.store",
    "write_volume_store": "generator.volumes.store",
    "prepare_volume": "generator.volumes.ingest",
    "render_ct_phantom": "generator.volumes.phantom",
    "phantom_attributes": "generator.volumes.phantom",
    "write_phantom_volumes": "generator.volumes.phantom",
    "VolumeModelConfig": "generator.volumes.models",
    "get_volume_preset": "generator.volumes.models",
    "save_volume_model": "generator.volumes.model_folder",
    "load_volume_model": "generator.volumes.model_folder",
    "read_volume_info": "generator.volumes.model_folder",
    "VolumePipeline": "generator.volumes.pipeline",
    "VolumePipelineOutput": "generator.volumes.pipeline",
    "VolumeTrainer": "generator.volumes.training",
    "VolumeTrainConfig": "generator.volumes.training",
    "VolumeTrainingData": "generator.volumes.training",
    "preview_image": "generator.volumes.previews",
    "save_preview": "generator.volumes.previews",
    "VolumeRequest": "generator.volumes.generation",
    "make_volume_requests": "generator.volumes.generation",
    "prepare_volume_output": "generator.volumes.generation",
    "generate_volumes_to_folder": "generator.volumes.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'generator.volumes' has no attribute {name!r}")
