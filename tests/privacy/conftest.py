"""Tiny fixtures for the privacy tests: smooth random 'radiographs' under fixed seeds."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.embedding import EmbedderConfig, torch_threads
from privacy.index import ReferenceIndex

RES = 24
TINY_EMBEDDER = EmbedderConfig(steps=25, batch_size=32, width=8, seed=0, bf16=False)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread (the CI CPUs are shared); restored afterwards."""
    with torch_threads(1):
        yield


def blob_images(n: int, size: int = RES, seed: int = 0) -> np.ndarray:
    """``(n, size, size)`` float32 images in [0, 1]: a body-like gradient plus random blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        img = 0.2 + 0.1 * yy
        for _ in range(6):
            cy, cx = rng.uniform(0.1, 0.9, 2)
            s = rng.uniform(0.05, 0.2)
            img = img + rng.uniform(0.2, 0.6) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        img = img + rng.normal(0, 0.01, img.shape)
        out[i] = np.clip(img / img.max(), 0, 1)
    return out


@pytest.fixture(scope="session")
def train_images() -> np.ndarray:
    return blob_images(40, seed=1)


@pytest.fixture(scope="session")
def holdout_images() -> np.ndarray:
    return blob_images(40, seed=2)


@pytest.fixture(scope="session")
def novel_images() -> np.ndarray:
    return blob_images(12, seed=3)


@pytest.fixture(scope="session")
def patient_ids() -> list[str]:
    return [f"p{i // 2}" for i in range(40)]  # two images per patient


@pytest.fixture(scope="session")
def index(train_images, holdout_images, patient_ids) -> ReferenceIndex:
    return ReferenceIndex.build(
        train_images,
        ids=[f"train/{i}.png" for i in range(len(train_images))],
        patient_ids=patient_ids,
        holdout_images=holdout_images,
        alpha=0.05,
        review_alpha=0.1,
        embedder_config=TINY_EMBEDDER,
        progress=False,
    )


@pytest.fixture(scope="session")
def make_images():
    """The image factory, for tests that need their own images."""
    return blob_images
