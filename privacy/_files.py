"""File-mode helper shared by the privacy modules that write files (privacy imports no other RadSynth package)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["current_umask", "publish_folder"]


def current_umask() -> int:
    """The process umask (set back at once; files written here end with ``0o666 & ~umask``)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_folder(tmp: Path, directory: Path) -> None:
    """Give the files of the finished temporary folder ``tmp`` the umask's mode and rename it to
    ``directory``, replacing an existing one (moved aside first, then deleted): readers see the old
    folder or the new one, never a mix."""
    file_mode = 0o666 & ~current_umask()
    for p in tmp.iterdir():
        os.chmod(p, file_mode)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
