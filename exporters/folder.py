"""Export an existing imagefolder (PNG + ``metadata.jsonl``) to DICOM studies and/or NIfTI.

Reads the Hugging Face ``imagefolder`` convention directly (PIL + json, no dependency on the
generator): ``metadata.jsonl`` (or ``metadata.csv``) lines with ``file_name`` and ``text`` plus the
optional generation fields. Pixels become ``[0, 1]`` floats (8-bit / 255, 16-bit / 65535, colour
converted to grey). The input folder is never modified: exports go to ``OUT/dicom/`` and
``OUT/nifti/``, and ``OUT/export_manifest.jsonl`` maps each ``file_name`` to its ``dicom_file`` and
``nifti_file`` (paths relative to ``OUT``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from exporters.dicom import DicomExporter
from exporters.files import atomic_write_bytes, check_target
from exporters.nifti import NiftiExporter

__all__ = ["FORMATS", "ExportSummary", "read_imagefolder", "resolve_modality", "export_imagefolder"]

FORMATS = ("dicom", "nifti")
MANIFEST = "export_manifest.jsonl"
_EXPORT_MODALITIES = ("DX", "CR", "CT", "MR")


@dataclass
class ExportSummary:
    """What :func:`export_imagefolder` wrote.

    Attributes:
        images: Number of images exported.
        modality: Modality used for every image.
        files: Format name -> number of files written (sidecars included).
        manifest: Path of ``export_manifest.jsonl``.
    """

    images: int
    modality: str
    files: dict[str, int] = field(default_factory=dict)
    manifest: Path | None = None


def _read_metadata(root: Path) -> list[dict[str, Any]]:
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        lines = []
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{jsonl}:{number}: not valid JSON ({exc.msg})") from None
        return lines
    if csv_path.is_file():
        with csv_path.open(encoding="utf-8", newline="") as fh:
            return [dict(row) for row in csv.DictReader(fh)]
    raise FileNotFoundError(f"{root} has no metadata.jsonl or metadata.csv (imagefolder layout expected)")


def _load_png(path: Path) -> tuple[np.ndarray, int]:
    """``(H, W)`` float32 in ``[0, 1]`` and the source bit depth (8 or 16)."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(im, dtype=np.float64)
            bits = 16
        else:
            if im.mode != "L":
                im = im.convert("L")
            arr = np.asarray(im, dtype=np.float64)
            bits = 8
    top = 255.0 if bits == 8 else 65535.0
    return np.clip(arr / top, 0.0, 1.0).astype(np.float32), bits


def read_imagefolder(path: str | Path) -> Iterator[tuple[np.ndarray, dict[str, Any], int]]:
    """Yield ``(image, metadata line, bit depth)`` for each line of an imagefolder, in file order.

    Args:
        path: Folder with images and ``metadata.jsonl`` (or ``metadata.csv``).

    Raises:
        FileNotFoundError: the folder, its metadata or a listed image is missing.
        ValueError: a metadata line without ``file_name``, or an unreadable image.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    for number, line in enumerate(_read_metadata(root), 1):
        name = line.get("file_name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{root}/metadata line {number} has no file_name")
        image_path = root / name
        if not image_path.is_file():
            raise FileNotFoundError(f"{image_path} (metadata line {number}) does not exist")
        try:
            image, bits = _load_png(image_path)
        except OSError as exc:
            raise ValueError(f"{image_path}: cannot read image ({exc})") from None
        yield image, line, bits


def resolve_modality(line: dict[str, Any], override: str | None) -> str:
    """``override`` if given, else the line's ``attributes.modality``/``modality``/intensity modality
    when it is DX, CR, CT or MR, else ``"DX"``.

    Raises:
        ValueError: ``override`` is not DX, CR, CT or MR.
    """
    if override is not None:
        mod = str(override).upper()
        if mod not in _EXPORT_MODALITIES:
            raise ValueError(f"modality={override!r}: expected one of {', '.join(_EXPORT_MODALITIES)}")
        return mod
    attrs = line.get("attributes") if isinstance(line.get("attributes"), dict) else {}
    intensity = line.get("intensity") if isinstance(line.get("intensity"), dict) else {}
    for candidate in (attrs.get("modality"), line.get("modality"), intensity.get("modality")):
        if candidate and str(candidate).upper() in _EXPORT_MODALITIES:
            return str(candidate).upper()
    return "DX"


def export_imagefolder(
    input_dir: str | Path,
    output_dir: str | Path,
    formats: Sequence[str] = ("dicom",),
    *,
    modality: str | None = None,
    images_per_study: int = 1,
    overwrite: bool = False,
    software_name: str = "RadSynth",
    software_version: str = "0.0.0",
    pixel_spacing: float | Sequence[float] | None = None,
    on_image: Callable[[int], None] | None = None,
) -> ExportSummary:
    """Convert every image of an imagefolder to DICOM and/or NIfTI.

    Images without an ``intensity`` mapping in their metadata get one from their PNG bit depth
    (grey levels ``0..255`` or ``0..65535``), except for CT, which then uses the default 40/400 HU
    window (see :func:`exporters.intensity.default_mapping`).

    Args:
        input_dir: The imagefolder (left untouched).
        output_dir: Where ``dicom/``, ``nifti/`` and ``export_manifest.jsonl`` go.
        formats: Any of ``"dicom"``, ``"nifti"`` (duplicates ignored).
        modality: ``DX``, ``CR``, ``CT`` or ``MR`` for all images; ``None``: from the first line
            (:func:`resolve_modality`).
        images_per_study: Consecutive images grouped into one DICOM study of one invented patient.
        overwrite: Replace existing outputs.
        software_name: Generator name written into the headers.
        software_version: Its version.
        pixel_spacing: In-plane pixel spacing in mm, or ``None`` for the nominal field of view.
        on_image: Called with the number of images done after each image (progress).

    Returns:
        An :class:`ExportSummary`.

    Raises:
        ValueError: unknown format, bad arguments or metadata, empty folder.
        FileNotFoundError: missing input.
        FileExistsError: an output exists and ``overwrite`` is false.
    """
    wanted = list(dict.fromkeys(str(f).lower() for f in formats))
    unknown = [f for f in wanted if f not in FORMATS]
    if not wanted or unknown:
        raise ValueError(f"formats={list(formats)!r}: expected one or more of {', '.join(FORMATS)}")
    out = Path(output_dir)
    manifest_path = check_target(out / MANIFEST, overwrite)
    items = read_imagefolder(input_dir)
    first = next(items, None)
    if first is None:
        raise ValueError(f"input folder {input_dir} lists no images in its metadata")
    mod = resolve_modality(first[1], modality)
    common: dict[str, Any] = dict(
        software_name=software_name, software_version=software_version, overwrite=overwrite, pixel_spacing=pixel_spacing
    )
    dicom = None
    if "dicom" in wanted:
        dicom = DicomExporter(out / "dicom", mod, images_per_study=images_per_study, **common)
    nifti = NiftiExporter(out / "nifti", mod, **common) if "nifti" in wanted else None
    summary = ExportSummary(images=0, modality=mod, files={f: 0 for f in wanted}, manifest=manifest_path)
    manifest: list[str] = []

    def _items() -> Iterator[tuple[np.ndarray, dict[str, Any], int]]:
        yield first
        yield from items

    for image, line, bits in _items():
        meta = dict(line)
        if meta.get("intensity") is None and mod != "CT":
            top = 255.0 if bits == 8 else 65535.0
            meta["intensity"] = {
                "kind": f"png{bits}", "low": 0.0, "high": top, "unit": "", "bits_stored": bits, "modality": mod
            }
        entry: dict[str, Any] = {"file_name": line["file_name"]}
        if dicom is not None:
            paths = dicom.add(image, meta)
            entry["dicom_file"] = paths[0].relative_to(out).as_posix()
            summary.files["dicom"] += len(paths)
        if nifti is not None:
            paths = nifti.add(image, meta)
            entry["nifti_file"] = paths[0].relative_to(out).as_posix()
            entry["nifti_sidecar"] = paths[1].relative_to(out).as_posix()
            summary.files["nifti"] += len(paths)
        manifest.append(json.dumps(entry, ensure_ascii=False))
        summary.images += 1
        if on_image is not None:
            on_image(summary.images)
    atomic_write_bytes(manifest_path, ("\n".join(manifest) + "\n").encode("utf-8"), overwrite)
    return summary
