"""Phantom datasets: the imagefolder that ``radsynth phantoms`` writes, and the same set in memory.

Image ``i`` of a set depends only on ``(seed, i, size)``: its render seed is :func:`phantom_seed`,
its attributes are drawn from that seed, its file name is ``phantom_{i:06d}.png`` and its invented
patient id ``PHANTOM-{seed}-{i:06d}``. :func:`iter_phantoms` is the one loop that makes them;
:func:`write_phantom_folder` saves it as a Hugging Face ``imagefolder``, :func:`phantom_reference_set`
keeps it in memory (the demo's privacy index of the bundled model's training data).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from conditioning.prompts import build_prompt
from generator.manifest import MANIFEST, atomic_write_text, read_manifest, save_png
from generator.phantoms.render import _MIN_SIZE, primary_label, render_phantom, sample_attributes

__all__ = [
    "PhantomSet", "phantom_seed", "iter_phantoms", "write_phantom_folder", "read_phantom_metadata",
    "phantom_reference_set",
]

_FILE_PATTERN = "phantom_{:06d}.png"
#: Base seeds are unsigned 32-bit integers (a larger one would silently wrap).
MAX_SEED = 2**32 - 1


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return int(seed)


def phantom_seed(seed: int, index: int) -> int:
    """Per-image render seed of image ``index`` in the set of base ``seed`` (the ``seed`` column).

    Raises:
        ValueError: ``seed`` is not in ``[0, 2**32 - 1]``.
    """
    return int(np.random.SeedSequence([_check_seed(seed), int(index)]).generate_state(1)[0])


def iter_phantoms(num_images: int, size: int = 64, seed: int = 0
                  ) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Render the set image by image.

    Yields:
        ``(image, row)``: the ``(size, size)`` float32 image in ``[0, 1]`` quantised to 8 bits (as
        saved), and its manifest row (``file_name``, ``text``, ``patient_id``, ``modality``,
        ``view``, ``sex``, ``age``, ``findings``, ``label``, ``seed``, ``pixel_spacing_mm``).

    Raises:
        ValueError: ``num_images`` < 1, ``size`` < 32, or ``seed`` out of range.
    """
    if isinstance(num_images, bool) or int(num_images) != num_images or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if isinstance(size, bool) or int(size) != size or size < _MIN_SIZE:
        raise ValueError(f"size must be an integer >= {_MIN_SIZE}, got {size!r}")
    seed = _check_seed(seed)
    for i in range(int(num_images)):
        yield _phantom(seed, i, int(size))


def _phantom(seed: int, i: int, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Image ``i`` of the set of base ``seed`` and its manifest row (see :func:`iter_phantoms`)."""
    img_seed = phantom_seed(seed, i)
    attrs = sample_attributes(np.random.default_rng(img_seed))
    ph = render_phantom(attrs, size=size, seed=img_seed)
    image = (np.round(np.clip(ph.image, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)
    row = {
        "file_name": _FILE_PATTERN.format(i),
        "text": build_prompt(attrs),
        "patient_id": f"PHANTOM-{seed}-{i:06d}",
        "modality": attrs["modality"],
        "view": attrs["view"],
        "sex": attrs["sex"],
        "age": attrs["age"],
        "findings": ph.attributes["findings"],
        "label": primary_label(attrs),
        "seed": img_seed,
        "pixel_spacing_mm": round(ph.pixel_spacing_mm, 4),
    }
    return image, row


def _phantom_range(job: tuple[int, int, int, int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Images ``start..stop-1`` of a set as one ``(n, size, size)`` array and their rows (a worker's job)."""
    seed, start, stop, size = job
    pairs = [_phantom(seed, i, size) for i in range(start, stop)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def write_phantom_folder(
    output: str | os.PathLike[str],
    num_images: int,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``num_images`` phantoms as a Hugging Face ``imagefolder`` (DESIGN.md §3.1).

    Files: ``phantom_000000.png`` ... (8-bit grayscale PNG, grey level ``round(255 * pixel)``, so the
    intensity mapping is ``png8``) and ``metadata.jsonl`` with the rows of :func:`iter_phantoms`.
    Every file is written to a temporary name and renamed into place; ``metadata.jsonl`` comes last,
    so a folder with a manifest is complete.

    Args:
        output: Folder to write; created if missing.
        num_images: Number of phantoms, ``>= 1``.
        size: Image height and width in pixels, ``>= 32``.
        seed: Base seed, in ``[0, 2**32 - 1]``.
        overwrite: Allow writing into a non-empty folder; earlier ``phantom_*.png`` files and the
            manifest there are replaced (other files are left alone).
        progress: Called with 1 after each image (e.g. ``tqdm.update``).

    Returns:
        The output folder.

    Raises:
        ValueError: ``num_images`` < 1, ``size`` < 32, ``seed`` out of range.
        FileExistsError: ``output`` is a non-empty folder and ``overwrite`` is false, or is a file.
    """
    images = iter_phantoms(num_images, size, seed)  # validates the arguments before touching disk
    first = next(images)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output folder {str(out)!r} is not empty; pass overwrite=True (--overwrite) to replace"
            )
        for old in out.glob("phantom_*.png"):
            old.unlink()
        (out / MANIFEST).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for image, row in _chain(first, images):
        save_png(image, out / row["file_name"])
        lines.append(json.dumps(row))
        if progress is not None:
            progress(1)
    atomic_write_text(out / MANIFEST, "\n".join(lines) + "\n")
    return out


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def read_phantom_metadata(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a phantom folder's ``metadata.jsonl`` as dicts.

    Raises:
        FileNotFoundError: no ``metadata.jsonl`` in ``folder``.
    """
    if not (Path(folder) / MANIFEST).is_file():
        raise FileNotFoundError(f"no metadata.jsonl in {str(folder)!r}")
    return read_manifest(folder)


@dataclass(frozen=True)
class PhantomSet:
    """Phantom images as a model saw them in training (the images of :func:`write_phantom_folder`).

    Attributes:
        images: ``(N, size, size)`` float32 in ``[0, 1]``, quantised to 8 bits like the training PNGs.
        ids: File names the images have in the training folder.
        patient_ids: Their invented patient ids.
        attributes: Their manifest rows.
    """

    images: np.ndarray
    ids: list[str]
    patient_ids: list[str]
    attributes: list[dict[str, Any]]


def phantom_reference_set(num_images: int, size: int, seed: int, workers: int = 1) -> PhantomSet:
    """The set that ``write_phantom_folder(..., num_images, size, seed)`` writes, in memory.

    Args:
        num_images: Number of phantoms.
        size: Side in pixels.
        seed: Base seed.
        workers: Processes rendering in parallel (1: in this process). The images do not depend on it.

    Raises:
        ValueError: as :func:`iter_phantoms`, or ``workers`` < 1.
    """
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if int(workers) == 1 or num_images < 64:
        images, rows = [], []
        for image, row in iter_phantoms(num_images, size, seed):
            images.append(image)
            rows.append(row)
        stack = np.stack(images)
    else:
        next(iter_phantoms(1, size, seed))  # validates the arguments here, not in a worker
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        step = -(-int(num_images) // (4 * int(workers)))  # a few jobs per worker: even finish times
        jobs = [(int(seed), a, min(a + step, int(num_images)), int(size)) for a in range(0, int(num_images), step)]
        # forkserver: a fresh interpreter per worker, safe in a process that already runs torch threads
        with ProcessPoolExecutor(int(workers), mp_context=multiprocessing.get_context("forkserver")) as pool:
            parts = list(pool.map(_phantom_range, jobs))
        stack = np.concatenate([p[0] for p in parts])
        rows = [r for p in parts for r in p[1]]
    return PhantomSet(images=stack, ids=[r["file_name"] for r in rows],
                      patient_ids=[r["patient_id"] for r in rows], attributes=rows)
