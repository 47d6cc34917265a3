"""Metadata files of the imagefolder convention (``metadata.jsonl`` / ``metadata.csv``).

Reads rows, converts CSV cells to attribute values, and resolves ``file_name`` inside the data
folder (:func:`resolve_member`, the one resolver every reader uses).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator, Mapping

from generator.data.records import ATTRIBUTE_KEYS

__all__ = [
    "METADATA_NAMES", "walk_files", "find_metadata", "iter_metadata_rows", "read_metadata_rows", "convert_csv_cell",
    "split_row", "split_fragment", "parse_age", "resolve_member",
]

#: Metadata file names of the imagefolder convention, in order of preference.
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


def walk_files(root: Path) -> list[Path]:
    """All files under ``root`` (recursively, hidden entries skipped), sorted."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def find_metadata(root: Path) -> list[Path]:
    """Metadata files under ``root`` (one per folder; ``.jsonl`` and ``.csv`` together is an error)."""
    found: list[Path] = []
    for p in walk_files(root):
        if p.name in METADATA_NAMES:
            found.append(p)
    by_dir: dict[Path, list[Path]] = {}
    for p in found:
        by_dir.setdefault(p.parent, []).append(p)
    for d, ps in by_dir.items():
        if len(ps) > 1:
            raise ValueError(f"{d} has both {' and '.join(p.name for p in ps)}; keep only one metadata file")
    return found


def iter_metadata_rows(meta: Path) -> Iterator[dict[str, Any]]:
    """Rows of a metadata file, streamed (memory flat in the number of rows); see :func:`read_metadata_rows`.

    The CSV header is checked before the first row; JSON Lines columns after the last.
    """
    if meta.suffix == ".jsonl":
        columns: dict[str, None] = {}
        with open(meta, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    row = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise ValueError(f"{meta}: line {i} is not valid UTF-8 JSON ({exc})") from exc
                if not isinstance(row, dict):
                    raise ValueError(f"{meta}: line {i} is not a JSON object: {line.strip()[:80]!r}")
                if len(columns) < 1000:
                    columns.update(dict.fromkeys(row))
                yield row
        missing = [c for c in ("file_name", "text") if c not in columns]
        if columns and missing:
            raise ValueError(f"{meta}: metadata needs the columns 'file_name' and 'text' (missing "
                             f"{missing}); columns found: {list(columns)}")
        return
    with open(meta, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, strict=True)
        try:
            cols = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in ("file_name", "text") if c not in cols]
            if missing:
                raise ValueError(f"{meta}: metadata needs the columns 'file_name' and 'text' (missing "
                                 f"{missing}); columns found: {cols}")
            for row in reader:
                if None in row:
                    raise ValueError(f"{meta}: line {reader.line_num} has more cells than the "
                                     f"{len(cols)} columns of the header")
                yield {(k or "").strip(): v for k, v in row.items()}
        except csv.Error as exc:
            raise ValueError(f"{meta}: malformed CSV near line {reader.line_num} ({exc}; an "
                             "unterminated quote swallows the rows after it)") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"{meta}: not UTF-8 text ({exc})") from exc


def read_metadata_rows(meta: Path) -> list[dict[str, Any]]:
    """Rows of a metadata file (``file_name`` and ``text`` columns required).

    Raises:
        ValueError: malformed file, or a missing ``file_name``/``text`` column (naming the file and
            the columns found).
    """
    return list(iter_metadata_rows(meta))


def convert_csv_cell(key: str, value: Any) -> Any:
    """CSV cell -> attribute value (``None`` for an empty cell)."""
    if value is None:
        return None
    v = str(value).strip()
    if v == "":
        return None
    if key in ("age", "label"):
        try:
            f = float(v)
            if f.is_integer():
                return int(f)
            return f
        except ValueError:
            if key == "age":
                years = parse_age(v)
                return v if years is None else years
            return v
    if key == "findings" and v[:1] in ("[", "{"):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def split_row(row: Mapping[str, Any], from_csv: bool,
               skip_keys: Iterable[str] = ("file_name", "text")) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a metadata row into (attributes, extra)."""
    attributes: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    skip = set(skip_keys)
    for k, v in row.items():
        if k in skip:
            continue
        if k in ATTRIBUTE_KEYS:
            v = convert_csv_cell(k, v) if from_csv else v
            if v is not None:
                attributes[k] = v
        else:
            extra[k] = v
    return attributes, extra


def split_fragment(file_name: str) -> tuple[str, str | None]:
    """``"vol.nii.gz#z=12"`` -> (``"vol.nii.gz"``, ``"z=12"``); no fragment -> (name, None)."""
    if "#" in file_name:
        base, frag = file_name.rsplit("#", 1)
        if "=" in frag:
            return base, frag
    return file_name, None


def parse_age(value: str | None) -> int | None:
    """Age text -> whole years: DICOM Age String (``"047Y"``, ``"006M"``, ``"010D"``) or a number."""
    if not value:
        return None
    v = value.strip().upper()
    try:
        if v[-1:] in ("Y", "M", "W", "D"):
            n = int(v[:-1])
            return {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}[v[-1]]
        return int(float(v))
    except ValueError:
        return None


# Copied verbatim to exporters/folder.py:resolve_member (exporters import no RadSynth package);
# tests/test_layering.py checks that the two stay identical.
def resolve_member(root: Path, file_name: str, *, source: Path | None = None, row: int | None = None) -> Path:
    """Resolve a metadata ``file_name`` inside the folder ``root``; refuse anything that leaves it.

    Refused: non-strings, empty or blank names, NUL characters, backslashes (``..\\x``,
    ``\\\\server\\share``), absolute POSIX paths (``/etc/x``, ``//server/x``), Windows drive forms
    (``C:\\x``, ``C:x``, ``C:/x``), and names whose resolved path (``..`` and symlinks followed) is
    not strictly inside ``root.resolve()``.

    Args:
        root: The folder that the metadata file describes.
        file_name: The row's ``file_name`` (POSIX separators, relative to ``root``).
        source: The metadata file, named in the error message.
        row: The row's 1-based line number in ``source``, named in the error message.

    Returns:
        The resolved absolute path (it may not exist).

    Raises:
        ValueError: the name is refused; the message names ``source``, ``row`` and the value.
    """
    where = str(source if source is not None else root) + ("" if row is None else f" row {row}")
    if not isinstance(file_name, str) or not file_name.strip():
        raise ValueError(f"{where}: file_name={file_name!r} must be a non-empty relative path")
    if "\x00" in file_name or "\\" in file_name:
        raise ValueError(f"{where}: file_name={file_name!r} must be a POSIX path without backslashes or NUL")
    if PurePosixPath(file_name).is_absolute() or PureWindowsPath(file_name).drive:
        raise ValueError(f"{where}: file_name={file_name!r} must be relative to {root}, not absolute")
    try:
        base = Path(root).resolve()
        target = (base / file_name).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise ValueError(f"{where}: file_name={file_name!r} cannot be resolved ({exc})") from None
    if base not in target.parents:
        raise ValueError(f"{where}: file_name={file_name!r} points outside {root} (to {target})")
    return target
