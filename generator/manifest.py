"""The one owner of a folder's ``metadata.jsonl``, of PNG image files and of atomic writes.

- Atomic writes: a file appears under its name only when it is complete (temporary file beside it,
  then :func:`os.replace`), with the mode an ordinary ``open`` would give (``0o666 & ~umask``).
- ``metadata.jsonl``: one JSON object per line. Policy for a torn last line (a line without its
  newline, left by an interrupted append): it is ignored when reading and dropped by the next
  rewrite. Any other line that is not a JSON object is an error naming the file and the line.
- PNG: ``(H, W)`` float images in ``[0, 1]`` saved as 8- or 16-bit grayscale and read back.

``privacy`` and ``exporters`` keep their own small atomic writers (they import no RadSynth package).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from generator._utils import umask_file_mode

__all__ = [
    "MANIFEST", "file_mode", "atomic_write_bytes", "atomic_write_text", "atomic_save_png",
    "save_png", "load_png", "read_manifest", "append_line", "sort_manifest", "update_fields",
]

#: File name of an imagefolder's manifest.
MANIFEST = "metadata.jsonl"


def file_mode() -> int:
    """The mode a new file gets from ``open``: ``0o666 & ~umask`` (reads the process umask)."""
    return umask_file_mode()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it to ``path``.

    The result has mode ``0o666 & ~umask``, like a file created by ``open``. A failure (or an
    interrupt) leaves no temporary file behind and ``path`` untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_png(image: Image.Image, path: str | Path) -> Path:
    """Save a PIL image as PNG atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_png(image: np.ndarray, path: str | Path, bits: int = 8) -> Path:
    """Write a ``(H, W)`` float image in ``[0, 1]`` as an 8- or 16-bit grayscale PNG, atomically.

    Raises:
        ValueError: ``bits`` is not 8 or 16.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    clipped = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if bits == 8:
        pil = Image.fromarray(np.round(clipped * 255).astype(np.uint8))
    else:
        pil = Image.fromarray(np.round(clipped * 65535).astype(np.uint16))
    return atomic_save_png(pil, path)


def load_png(path: str | Path) -> np.ndarray:
    """Read a grayscale PNG written by :func:`save_png` (8 or 16 bit).

    Returns:
        ``(H, W)`` float32 in ``[0, 1]``.

    Raises:
        ValueError: the file is not a readable grayscale PNG (naming the file).
    """
    try:
        with Image.open(path) as im:
            if im.mode == "L":
                scale = 255.0
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                scale = 65535.0
            else:
                raise ValueError(f"{path}: expected a grayscale PNG, got mode {im.mode}")
            return (np.asarray(im, dtype=np.float64) / scale).astype(np.float32)
    except OSError as exc:
        raise ValueError(f"{path}: not a readable PNG ({exc})") from exc


def read_manifest(folder: str | Path) -> list[dict[str, Any]]:
    """Complete lines of ``folder/metadata.jsonl`` (a torn last line is ignored; none: ``[]``).

    Raises:
        ValueError: a complete line is not a JSON object, or the file is not UTF-8 (naming the
            file and the line).
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return []
    lines = []
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            if not raw.endswith(b"\n"):
                break  # torn last line of an interrupted append
            try:
                text = raw.decode("utf-8").strip()
                if not text:
                    continue
                row = json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: line {i} is not valid UTF-8 JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {i} is not a JSON object: {text[:80]!r}")
            lines.append(row)
    return lines


def append_line(folder: str | Path, line: Mapping[str, Any]) -> None:
    """Append one manifest line (one ``write`` of one line: atomic among appending processes)."""
    data = (json.dumps(dict(line), sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(Path(folder) / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _rewrite(folder: Path, lines: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(ln, sort_keys=True) + "\n" for ln in lines)
    atomic_write_text(folder / MANIFEST, text)


def sort_manifest(folder: str | Path) -> None:
    """Rewrite the manifest sorted by file name, without duplicates (atomic replace)."""
    lines = {ln["file_name"]: ln for ln in read_manifest(folder)}
    _rewrite(Path(folder), [lines[name] for name in sorted(lines)])


def update_fields(folder: str | Path, fields: Mapping[str, Mapping[str, Any]]) -> int:
    """Set per-image fields in ``folder/metadata.jsonl`` (atomic rewrite, other fields kept).

    Args:
        folder: An imagefolder with a manifest.
        fields: ``file_name`` -> fields to set on that line.

    Returns:
        Number of lines updated.
    """
    lines, updated = read_manifest(folder), 0
    for row in lines:
        extra = fields.get(str(row.get("file_name")))
        if extra is not None:
            row.update(extra)
            updated += 1
    _rewrite(Path(folder), lines)
    return updated
