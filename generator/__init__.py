"""RadSynth generator: data ingest, the latent diffusion model, training, generation.

Subpackages and modules, one concern each (dependencies run one way, downwards in this list):

- :mod:`generator.data`: read training folders (imagefolder, DICOM, NIfTI, ``.npz``) into records.
- :mod:`generator.models`: config, network builders, :class:`RadSynthPipeline`, the model folder.
- :mod:`generator.training`: :class:`Trainer` (VAE, latent cache, text-conditioned UNet).
- :mod:`generator.generation`: generate an imagefolder of synthetic images (resumable, gated).
- :mod:`generator.manifest`: ``metadata.jsonl``, PNG files, atomic writes.
- :mod:`generator.gallery`: contact sheets and gallery pages.
- :mod:`generator.phantoms`: procedural chest phantoms and their measurement (demo and test data).
- :mod:`generator.evaluation`: metrics and the real-data classifier for benchmarks.
- :mod:`generator.demo`: the bundled demonstration model.

The main names are importable from the package (loaded on first use)::

    from generator import RadSynthPipeline, load_pipeline, Trainer, TrainConfig, load_dataset
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_dataset": "generator.data",
    "IngestResult": "generator.data",
    "IntensityMapping": "generator.data",
    "TrainConfig": "generator.models.config",
    "get_preset": "generator.models.config",
    "RadSynthPipeline": "generator.models.pipeline",
    "ModelInfo": "generator.models.model_folder",
    "load_pipeline": "generator.models.model_folder",
    "Trainer": "generator.training",
    "TrainResult": "generator.training",
    "Request": "generator.generation",
    "make_requests": "generator.generation",
    "generate_to_folder": "generator.generation",
    "bundled_model_path": "generator.demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'generator' has no attribute {name!r}")
