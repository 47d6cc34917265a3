"""Atomic, non-clobbering file writes shared by the exporters.

Every file is first written under a hidden temporary name in its destination folder and then moved
into place with :func:`os.replace`, so a reader never sees a half-written file and an interrupted
export leaves no truncated outputs behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["check_target", "atomic_write", "atomic_write_bytes"]


def check_target(path: str | Path, overwrite: bool) -> Path:
    """Raise if ``path`` exists and may not be overwritten; create its parent folder.

    Args:
        path: Destination file.
        overwrite: Whether an existing file may be replaced.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ValueError: ``path`` exists and is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path={str(path)!r} is a folder; expected a file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | Path, writer: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Write ``path`` through ``writer(tmp_path)`` and move the result into place.

    The temporary file lives in the same folder (same file system, so :func:`os.replace` is atomic)
    and keeps ``path``'s suffixes, so writers that pick a format from the name still work.

    Args:
        path: Destination file.
        writer: Called once with the temporary path; must create that file.
        overwrite: Whether an existing ``path`` may be replaced.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = check_target(path, overwrite)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{''.join(path.suffixes) or '.part'}")
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite)
