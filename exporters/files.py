"""Atomic, non-clobbering file writes shared by the exporters.

Every file is first written under a hidden, recognizable temporary name in its destination folder
(``.<name>.radsynth-tmp-<pid>-<8 hex><suffixes>``) and then moved into place with :func:`os.replace`,
so a reader never sees a half-written file. A process killed mid-write can leave such a temporary
file behind; :func:`clean_stale_temps` removes those whose process is gone. Finished files get the
mode an ordinary ``open(path, "w")`` gives, ``0o666 & ~umask``, whatever the writer created.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Callable

__all__ = ["check_target", "atomic_write", "atomic_write_bytes", "file_mode", "clean_stale_temps", "TEMP_MARK"]

#: Part of every temporary name, so leftovers can be recognized.
TEMP_MARK = ".radsynth-tmp-"
_TEMP_RE = re.compile(r"^\..+\.radsynth-tmp-(?P<pid>\d+)-[0-9a-f]{8}(\..*)?$")


def file_mode() -> int:
    """``0o666 & ~umask``: the permission bits of a newly created regular file.

    Read from ``/proc/self/status`` where available (no global state touched); otherwise the
    umask is read by setting and restoring it.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


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


def temp_name(path: Path) -> Path:
    """The hidden temporary sibling of ``path`` used while writing it (keeps its suffixes)."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{''.join(path.suffixes)}")


def atomic_write(path: str | Path, writer: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Write ``path`` through ``writer(tmp_path)`` and move the result into place.

    The temporary file lives in the same folder (same file system, so :func:`os.replace` is atomic)
    and keeps ``path``'s suffixes, so writers that pick a format from the name still work. Before the
    move it gets mode ``0o666 & ~umask`` (:func:`file_mode`), so a writer that creates private files
    (``mkstemp``: 0600) does not leak its mode into the result.

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
    tmp = temp_name(path)
    try:
        writer(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: nothing of ours is being written while we clean
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # it runs, as another user
    return True


def clean_stale_temps(folder: str | Path, *, recursive: bool = True) -> list[Path]:
    """Remove the temporary files that interrupted writes left in ``folder`` (and its sub-folders).

    Only names made by :func:`atomic_write` (``.<name>.radsynth-tmp-<pid>-<hex>...``) are touched,
    and only when process ``<pid>`` no longer runs (or is this process), so a concurrent writer's
    file in flight is kept. A missing ``folder`` is fine.

    Args:
        folder: Where to look.
        recursive: Also look in every sub-folder.

    Returns:
        The removed paths.
    """
    root = Path(folder)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, dirs, names in os.walk(root):
        if not recursive:
            dirs.clear()
        for name in names:
            match = _TEMP_RE.match(name)
            if match is not None and not _alive(int(match.group("pid"))):
                path = Path(dirpath) / name
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed.append(path)
    return removed
