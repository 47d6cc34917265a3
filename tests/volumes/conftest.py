"""Fixtures of the volume tests: a phantom volume folder and a tiny trained volume model (16^3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_TRAIN = dict(seed=0, vae_steps=6, unet_steps=8, batch_size=2, unet_batch_size=4, checkpoint_every=3,
                  ema_decay=0.5, unet_lr=1e-2)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def phantom_folder(tmp_path_factory) -> Path:
    """Six 16^3 phantom CT volumes (NIfTI + metadata.jsonl)."""
    from generator.volumes.phantom import write_phantom_volumes

    return write_phantom_volumes(tmp_path_factory.mktemp("phantoms3d"), 6, shape=16, seed=0)


@pytest.fixture(scope="session")
def phantom_data(phantom_folder):
    from generator.volumes.ingest import load_volumes
    from generator.volumes.training import VolumeTrainingData

    return VolumeTrainingData.from_ingest(load_volumes(phantom_folder))


@pytest.fixture(scope="session")
def tiny_volume_model(tmp_path_factory, phantom_data, tiny_text_encoder) -> Path:
    """A model folder of the ``tiny`` preset trained a few steps on the phantoms."""
    from generator.volumes.models import get_volume_preset
    from generator.volumes.training import VolumeTrainConfig, VolumeTrainer

    out = tmp_path_factory.mktemp("tiny_volume_model")
    torch.set_num_threads(1)
    res = VolumeTrainer(phantom_data, out, get_volume_preset("tiny"), VolumeTrainConfig(**TINY_TRAIN),
                        text_encoder=str(tiny_text_encoder)).run()
    assert res.finished
    return out
