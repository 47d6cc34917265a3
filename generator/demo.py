"""The bundled demonstration model: where it lives and how it was trained.

The phantoms it was trained on are rebuilt by :func:`generator.phantoms.phantom_reference_set`.
"""

from __future__ import annotations

__all__ = ["DEMO_TRAINING", "DEMO_MODEL_DIR", "DEMO_EMBEDDER_FILE", "bundled_model_path", "resolve_model"]

from pathlib import Path

#: How ``scripts/train_demo_model.py`` makes the phantom training set of the bundled model. The demo
#: rebuilds the same phantoms from these settings to audit samples against the training data.
DEMO_TRAINING = {"num_images": 3000, "size": 64, "seed": 0, "guidance_scale": 3.0}


#: The privacy copy-embedder trained on the demo model's training phantoms, shipped in the model
#: folder (``scripts/train_demo_model.py`` writes it) so that the demo's index build need not train it.
#: Its safetensors metadata names the phantom set (``num_images``, ``size``, ``seed``) it was trained on.
DEMO_EMBEDDER_FILE = "privacy_embedder.safetensors"

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


def resolve_model(model: str | None) -> str:
    """The model folder a user named, or the bundled demo model when ``model`` is ``None``."""
    if model is not None:
        return str(model)
    return str(bundled_model_path())
