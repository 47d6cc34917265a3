"""The bundled demonstration model: where it lives and how it was trained.

The phantoms it was trained on are rebuilt by :func:`generator.phantoms.phantom_reference_set`.
"""

from __future__ import annotations

__all__ = ["DEMO_TRAINING", "DEMO_MODEL_DIR", "DEMO_EMBEDDER_FILE", "DEMO_VOLUME_TRAINING",
           "DEMO_VOLUME_MODEL_DIR", "bundled_model_path", "bundled_volume_model_path", "resolve_model",
           "demo_settings"]

import json
from pathlib import Path
from typing import Any

#: How ``scripts/train_demo_model.py`` makes the phantom training set of the bundled model. The demo
#: rebuilds the same phantoms from these settings to audit samples against the training data.
DEMO_TRAINING = {"num_images": 3000, "size": 64, "seed": 0, "guidance_scale": 3.0}


#: The privacy copy-embedder trained on the demo model's training phantoms, shipped in the model
#: folder (``scripts/train_demo_model.py`` writes it) so that the demo's index build need not train it.
#: Its safetensors metadata names the phantom set (``num_images``, ``size``, ``seed``) it was trained on.
DEMO_EMBEDDER_FILE = "privacy_embedder.safetensors"

#: Where the demo model lives inside the package.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"

#: How ``scripts/train_demo_model.py --dims 3`` makes the CT phantom training set of the bundled volume
#: demo model (``radsynth phantoms --dims 3``: volume ``i`` has seed ``seed * 100003 + i``); ``radsynth demo
#: --3d`` rebuilds the same phantoms from these settings (or the model's ``radsynth.json`` ``demo`` block)
#: to audit its volumes against the training data.
DEMO_VOLUME_TRAINING = {"num_volumes": 400, "shape": 32, "seed": 0, "guidance_scale": 3.0, "preset": "lean"}

#: Where the volume demo model lives inside the package.
DEMO_VOLUME_MODEL_DIR = Path(__file__).resolve().parent / "demo_volume_model"


def _shipped(path: Path, marker: str, what: str, train_flags: str, flag: str) -> Path:
    """``path`` when ``path / marker`` exists; else FileNotFoundError saying how to make it."""
    if not (path / marker).is_file():
        raise FileNotFoundError(f"the bundled {what} is missing ({path}); train it with "
                                f"'python scripts/train_demo_model.py{train_flags}' or pass {flag} MODEL_DIR")
    return path


def bundled_model_path() -> Path:
    """Folder of the demo model shipped inside the package.

    Raises:
        FileNotFoundError: the package was installed without it.
    """
    return _shipped(DEMO_MODEL_DIR, "model_index.json", "demo model", "", "--model")


def bundled_volume_model_path() -> Path:
    """Folder of the volume (CT) demo model shipped inside the package.

    Raises:
        FileNotFoundError: the package was installed without it.
    """
    return _shipped(DEMO_VOLUME_MODEL_DIR, "radsynth.json", "volume demo model", " --dims 3", "--volume-model")


def resolve_model(model: str | None) -> str:
    """The model folder a user named, or the bundled demo model when ``model`` is ``None``."""
    if model is not None:
        return str(model)
    return str(bundled_model_path())


def demo_settings(model_dir: str | Path) -> tuple[int, dict[str, Any]]:
    """Image side and phantom training settings of a phantom-trained model, read from its
    ``radsynth.json`` alone (no model import, so the demo can render while the model loads).

    Returns:
        ``(resolution, settings)``; ``settings`` is :data:`DEMO_TRAINING` updated with the file's
        ``demo`` block (``num_images``, ``size``, ``seed``, ``guidance_scale``).

    Raises:
        ValueError: ``radsynth.json`` is missing, not a JSON object, or has no usable ``resolution``.
    """
    path = Path(model_dir) / "radsynth.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} cannot be read as JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(raw).__name__}")
    resolution = raw.get("resolution")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"{str(path)!r}: resolution must be a positive integer, got {resolution!r}")
    demo = raw.get("demo") if isinstance(raw.get("demo"), dict) else {}
    return resolution, {**DEMO_TRAINING, **demo}
