"""The diffusion model: configuration, network builders, the sampling pipeline, the model folder.

- :mod:`generator.models.config`: :class:`TrainConfig` and presets.
- :mod:`generator.models.build`: VAE, UNet, noise scheduler and samplers from a config.
- :mod:`generator.models.pipeline`: :class:`RadSynthPipeline` (a ``diffusers.DiffusionPipeline``).
- :mod:`generator.models.model_folder`: save/load the model folder (DESIGN.md §3.2).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "generator.models.config",
    "get_preset": "generator.models.config",
    "build_vae": "generator.models.build",
    "build_unet": "generator.models.build",
    "build_noise_scheduler": "generator.models.build",
    "make_sampler": "generator.models.samplers",
    "SAMPLERS": "generator.models.samplers",
    "RadSynthPipeline": "generator.models.pipeline",
    "RadSynthPipelineOutput": "generator.models.pipeline",
    "ModelInfo": "generator.models.model_folder",
    "load_pipeline": "generator.models.model_folder",
    "read_model_info": "generator.models.model_folder",
    "save_model_folder": "generator.models.model_folder",
    "weights_hash": "generator.models.model_folder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'generator.models' has no attribute {name!r}")
