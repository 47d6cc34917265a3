"""Prompt files for ``radsynth generate --prompts FILE`` (CSV or JSONL).

Each row asks for ``num_images`` images (default 1) of either a ``text`` or, without ``text``,
structured attribute columns (``modality``, ``view``, ``sex``, ``age``, ``findings``) that
:func:`conditioning.prompts.build_prompt` turns into text. ``findings`` may be a JSON list, a JSON
object, or a comma-separated string.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from conditioning.prompts import build_prompt

_ATTRIBUTE_COLUMNS = ("modality", "view", "sex", "age", "findings")
#: Most images one row may ask for (a larger count is a typo, not a request).
MAX_IMAGES_PER_ROW = 100_000

#: One prompt request: (text, attributes or None, number of images)
PromptRow = tuple[str, dict[str, Any] | None, int]


def read_prompt_file(path: str | Path) -> list[PromptRow]:
    """Read a ``.csv`` or ``.jsonl`` prompt file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, bad JSON, a row with neither ``text`` nor attributes, or a
            ``num_images`` that is not a positive integer (naming the file and the row number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh, strict=True)
                try:
                    rows = [dict(r) for r in reader]
                except csv.Error as exc:
                    raise ValueError(f"{path}: malformed CSV near line {reader.line_num} ({exc}; an "
                                     "unterminated quote swallows the rows after it)") from None
            for n, r in enumerate(rows, 1):
                if None in r:
                    raise ValueError(f"{path}: row {n} has more cells than the header has columns")
        elif path.suffix.lower() in (".jsonl", ".json"):
            rows = []
            for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if raw.strip():
                    try:
                        row = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}: line {n} is not a JSON object: {raw.strip()[:60]!r}")
                    rows.append(row)
        else:
            raise ValueError(f"prompt file must end in .csv or .jsonl, got {path.name!r}")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not rows:
        raise ValueError(f"prompt file {str(path)!r} has no rows")
    return [_parse_row(path, n, row) for n, row in enumerate(rows, 1)]


def _parse_row(path: Path, n: int, row: dict[str, Any]) -> PromptRow:
    raw_n = row.get("num_images", 1)
    try:
        if isinstance(raw_n, (bool, float)):
            raise TypeError
        num = int(raw_n if raw_n not in ("", None) else 1)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: row {n}: num_images must be an integer, got {raw_n!r}") from None
    if not 1 <= num <= MAX_IMAGES_PER_ROW:
        raise ValueError(f"{path}: row {n}: num_images must be in [1, {MAX_IMAGES_PER_ROW}], got {num}")
    attrs = {k: row[k] for k in _ATTRIBUTE_COLUMNS if row.get(k) not in (None, "")}
    if isinstance(attrs.get("findings"), str) and attrs["findings"].strip()[:1] in ("[", "{"):
        try:
            attrs["findings"] = json.loads(attrs["findings"])
        except json.JSONDecodeError:
            raise ValueError(f"{path}: row {n}: findings is not valid JSON: {attrs['findings']!r}") from None
    if row.get("text") is not None and not isinstance(row.get("text"), str):
        raise ValueError(f"{path}: row {n}: text must be a string, got {row.get('text')!r}")
    text = str(row.get("text") or "").strip()
    if not text:
        if not attrs:
            raise ValueError(f"{path}: row {n} has neither 'text' nor attribute columns {_ATTRIBUTE_COLUMNS}")
        try:
            text = build_prompt(attrs)
        except ValueError as exc:
            raise ValueError(f"{path}: row {n}: {exc}") from None
    return text, (attrs or None), num
