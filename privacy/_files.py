"""File-mode helper shared by the privacy modules that write files (privacy imports no other RadSynth package)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["current_umask", "publish_folder", "staged_folder"]


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


@contextmanager
def staged_folder(directory: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder of ``directory`` to write into; when the block ends without an error it
    is published as ``directory`` (:func:`publish_folder`), otherwise removed.

    Raises:
        FileExistsError: ``directory`` exists and ``overwrite`` is false (before anything is written).
    """
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass --overwrite to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        publish_folder(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
