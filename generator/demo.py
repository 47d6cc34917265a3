"""The bundled demonstration model: where it lives and how it was trained."""

from __future__ import annotations

from pathlib import Path

#: How ``scripts/train_demo_model.py`` makes the phantom training set of the bundled model. The demo
#: rebuilds the same phantoms from these settings to audit samples against the training data.
DEMO_TRAINING = {"num_images": 5000, "size": 64, "seed": 0}


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
