"""File-mode helper shared by the privacy modules that write files (privacy imports no other RadSynth package)."""

from __future__ import annotations

import os

__all__ = ["current_umask"]


def current_umask() -> int:
    """The process umask (set back at once; files written here end with ``0o666 & ~umask``)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
