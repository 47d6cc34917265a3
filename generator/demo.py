"""The bundled demonstration model: where it lives and how it was trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: How ``scripts/train_demo_model.py`` makes the phantom training set of the bundled model. The demo
#: rebuilds the same phantoms from these settings to audit samples against the training data.
DEMO_TRAINING = {"num_images": 3000, "size": 64, "seed": 0, "guidance_scale": 3.0}


#: Where the demo model lives inside the package.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def bundled_model_path() -> Path:
    """Folder of the demo model shipped inside the package.

    Raises:
        FileNotFoundError: the package was installed without it.
    """
    path = DEMO_MODEL_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the bundled demo model is missing ({path}); train it with "
            "'python scripts/train_demo_model.py' or pass --model MODEL_DIR"
        )
    return path


@dataclass
class PhantomSet:
    """Phantom images as the model saw them in training.

    Attributes:
        images: ``(N, size, size)`` float32 in ``[0, 1]``, quantised to 8 bits like the training PNGs.
        ids: File names the images had in the training folder.
        patient_ids: Their invented patient ids.
        attributes: Their attributes.
    """

    images: np.ndarray
    ids: list[str]
    patient_ids: list[str]
    attributes: list[dict[str, Any]]


def phantom_reference_set(num_images: int, size: int, seed: int) -> PhantomSet:
    """Rebuild the phantoms that ``write_phantom_folder(num_images, size, seed)`` writes, in memory.

    Raises:
        ValueError: ``num_images`` < 1.
    """
    from generator.phantom import phantom_seed, render_phantom, sample_attributes

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    images = np.empty((num_images, size, size), dtype=np.float32)
    attrs = []
    for i in range(num_images):
        s = phantom_seed(seed, i)
        a = sample_attributes(np.random.default_rng(s))
        images[i] = np.round(np.clip(render_phantom(a, size=size, seed=s).image, 0, 1) * 255) / 255
        attrs.append(a)
    ids = [f"phantom_{i:06d}.png" for i in range(num_images)]
    pids = [f"PHANTOM-{seed}-{i:06d}" for i in range(num_images)]
    return PhantomSet(images=images, ids=ids, patient_ids=pids, attributes=attrs)
