"""Argument types for the verbs: every number finite and in range, every path checked up front.

Each factory returns an ``argparse`` ``type=`` callable; a bad value becomes one usage error line
naming the flag (argparse adds ``argument --flag:``) and exit status 2. Seeds are unsigned 32-bit
integers everywhere (larger ones would silently wrap in numpy's seeding).
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from typing import Callable

__all__ = ["int_in", "float_in", "seed", "existing_dir", "existing_file", "existing_path", "new_file", "parse_label_text", "oversample_term", "MAX_SEED"]

#: Largest accepted seed (numpy ``SeedSequence`` words and ``torch.Generator`` both take it).
MAX_SEED = 2**32 - 1


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in ``[lo, hi]`` (``hi=None``: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be an integer {rng}, got {text}")
        return value

    return parse


def float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval from ``lo`` to ``hi`` (open at either end if asked)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        too_low = value <= lo if lo_open else value < lo
        too_high = value >= hi if hi_open else value > hi
        if not math.isfinite(value) or too_low or too_high:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}{lo:g}, {hi:g}{right}, got {text}")
        return value

    return parse


seed = int_in(0, MAX_SEED)


def existing_dir(text: str) -> Path:
    """A folder that exists."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"folder not found: {text}")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def existing_file(text: str) -> Path:
    """A file that exists (not a folder)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    return path


def new_file(text: str) -> Path:
    """A file path to write: not an existing folder, and its parent folder is not a file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} is a file, not a folder")
    return path


def existing_path(text: str) -> Path:
    """A file or folder that exists (a data folder, or an ``.npz`` file)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"not found: {text}")
    return path


def parse_label_text(items: list[str]) -> dict[int, str] | None:
    """``["0=normal", "1=pneumonia"]`` -> ``{0: "normal", 1: "pneumonia"}``.

    Raises:
        ValueError: an item without ``=`` or with a non-integer label.
    """
    if not items:
        return None
    out: dict[int, str] = {}
    for item in items:
        label, sep, text = item.partition("=")
        if not sep or not text.strip():
            raise ValueError(f"--label-text must look like LABEL=TEXT, got {item!r}")
        try:
            out[int(label)] = text.strip()
        except ValueError:
            raise ValueError(f"--label-text label must be an integer, got {label!r}") from None
    return out


def oversample_term(text: str) -> tuple[str, float]:
    """``--oversample TERM=WEIGHT``: ``"nodule=2"`` -> ``("nodule", 2.0)`` (the last ``=`` separates; the
    weight a finite number > 0, at most 1000)."""
    term, sep, weight = text.rpartition("=")
    if not sep or not term.strip():
        raise argparse.ArgumentTypeError(f"expected TERM=WEIGHT (e.g. nodule=2), got {text!r}")
    try:
        value = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the weight of {term.strip()!r} must be a number, got {weight!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1000):
        raise argparse.ArgumentTypeError(f"the weight of {term.strip()!r} must be in (0, 1000], got {weight!r}")
    return term.strip(), value


def check_number(flag: str, value: float | int | None, *, low: float, high: float = math.inf,
                 low_open: bool = False) -> None:
    """``value`` (when given) must be finite and in ``[low, high]`` (``(low, high]`` if ``low_open``).

    For values that reach a verb other than through an argparse type (defaults, manifest lines).

    Raises:
        ValueError: one line naming ``flag`` and the value.
    """
    if value is None:
        return
    if isinstance(value, bool):
        raise ValueError(f"{flag} must be a number, got {value!r}")
    if isinstance(value, int):  # any size: no conversion to float
        if not low <= value <= high:
            raise ValueError(f"{flag} must be an integer in [{int(low)}, {int(high)}], got {value}")
        return
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        lo = "(" if low_open else "["
        hi = f"{high:g}]" if math.isfinite(high) else "inf)"
        raise ValueError(f"{flag} must be a finite number in {lo}{low:g}, {hi}, got {value!r}")


def prepare_model_output(output: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing model folder unless asked to (``radsynth train``, 2D and 3D; main
    process only).

    Raises:
        FileExistsError: ``output`` is a file, or a non-empty folder and neither flag is given.
        ValueError: both flags are given.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {str(output)!r} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if overwrite:
            shutil.rmtree(output)
        elif not resume:
            raise FileExistsError(
                f"--output {str(output)!r} is not empty: pass --resume to continue its training or "
                "--overwrite to replace it"
            )
