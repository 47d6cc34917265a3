"""Device choice shared by training and sampling."""

from __future__ import annotations

import torch


def best_device() -> str:
    """``"cuda"`` if available, else ``"mps"`` if available, else ``"cpu"``."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_only() -> bool:
    """True when no accelerator is present.

    ``accelerate`` then needs ``cpu=True`` to run several processes (``torchrun`` or
    ``accelerate launch``) as a gloo data-parallel group instead of independent single runs.
    """
    return best_device() == "cpu"
