"""Export an existing imagefolder (images + ``metadata.jsonl``) to DICOM studies and/or NIfTI.

Reads the Hugging Face ``imagefolder`` convention directly (PIL + json, no dependency on the
generator): ``metadata.jsonl`` (or ``metadata.csv``) rows with ``file_name`` and ``text`` plus the
optional generation fields. A row's ``file_name`` names either a 2D image (PNG 8/16-bit, any format
PIL reads; pixels become ``[0, 1]`` floats: 8-bit / 255, 16-bit / 65535, colour converted to grey)
or a volume (``.nii``/``.nii.gz``, float or integer voxels with an affine), which becomes one DICOM
series (CT or MR) and one NIfTI volume.

Steps of :func:`export_imagefolder`:

1. check the arguments;
2. read every metadata row and check it before anything is written: the name stays inside the
   input folder (:func:`resolve_member`), the file exists and opens, the provenance, intensity
   mapping and patient attributes are usable, and no two rows export to the same name;
3. prepare the output folder: a new export, the continuation of the same export (same input,
   metadata and settings: resume), or a refusal (another export, without ``overwrite``);
4. export row after row, recording each finished row in ``OUT/.radsynth-export.jsonl``;
5. write ``OUT/export_manifest.jsonl``, which maps each ``file_name`` to its ``dicom_file`` (and,
   for volumes, ``dicom_files``), ``nifti_file`` and ``nifti_sidecar`` (paths relative to ``OUT``).

The input folder is never modified. UIDs and invented patients derive from each row's seed, so an
interrupted export continued later gives the same files as an uninterrupted one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from exporters.dicom import DicomExporter
from exporters.files import atomic_write_bytes, clean_stale_temps
from exporters.geometry import LPS_TO_RAS, validate_pixel_spacing
from exporters.identity import SyntheticPatient
from exporters.intensity import PixelEncoding
from exporters.nifti import NiftiExporter
from exporters.provenance import Provenance

__all__ = [
    "FORMATS",
    "MANIFEST",
    "RECORD",
    "ExportSummary",
    "resolve_member",
    "read_metadata",
    "read_imagefolder",
    "resolve_modality",
    "export_imagefolder",
]

FORMATS = ("dicom", "nifti")
MANIFEST = "export_manifest.jsonl"
#: The export's record: a header line (settings and their fingerprint), then one manifest line
#: per finished row. It lets the same command continue an interrupted export.
RECORD = ".radsynth-export.jsonl"
_EXPORT_MODALITIES = ("DX", "CR", "CT", "MR")
_VOLUME_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class ExportSummary:
    """What :func:`export_imagefolder` wrote.

    Attributes:
        images: Number of rows (images and volumes) in the manifest.
        modality: Modality used for every row.
        files: Format name -> number of files listed in the manifest (sidecars included).
        manifest: Path of ``export_manifest.jsonl``.
        resumed: Rows already exported by an earlier, interrupted run of the same export.
        truncated: DICOM attribute keyword -> number of values cut to their VR's maximum length.
    """

    images: int
    modality: str
    files: dict[str, int] = field(default_factory=dict)
    manifest: Path | None = None
    resumed: int = 0
    truncated: dict[str, int] = field(default_factory=dict)


# Copied verbatim to generator/data/metadata.py:resolve_member; keep the two identical
# (exporters import no other RadSynth package, so they cannot share one definition).
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


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_metadata(root: str | Path) -> tuple[Path, list[tuple[int, dict[str, Any]]]]:
    """Read an imagefolder's ``metadata.jsonl`` (or ``metadata.csv``) strictly.

    Every non-blank JSONL line must be a JSON object; a last line without its newline that is not
    valid JSON is reported as torn (an interrupted write), never silently dropped.

    Args:
        root: The imagefolder.

    Returns:
        ``(metadata file, [(line number, row), ...])`` in file order (line numbers 1-based, as an
        editor shows them; CSV rows count the header line).

    Raises:
        FileNotFoundError: the folder or its metadata file is missing.
        ValueError: ``root`` is not a folder, the file is not UTF-8, a line is not a JSON object,
            the last line is torn, or the file lists no rows.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"input folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"input {root} is not a folder (expected an imagefolder with metadata.jsonl)")
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    source = jsonl if jsonl.is_file() else csv_path if csv_path.is_file() else None
    if source is None:
        raise FileNotFoundError(f"{root} has no metadata.jsonl or metadata.csv (imagefolder layout expected)")
    try:
        text = source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ValueError(f"{source} line {line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x})") from None
    text = text.removeprefix("\ufeff")
    rows: list[tuple[int, dict[str, Any]]] = []
    if source is jsonl:
        lines = text.split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if number == len(lines):
                    raise ValueError(
                        f"{source} line {number}: torn last line (no newline and not valid JSON: {exc.msg}); "
                        "was the file cut off while being written?"
                    ) from None
                raise ValueError(f"{source} line {number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{source} line {number}: expected a JSON object, got {_json_kind(row)}")
            rows.append((number, row))
    else:
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            for row in reader:
                if None in row:
                    raise ValueError(f"{source} line {reader.line_num}: more cells than header columns")
                rows.append((reader.line_num, dict(row)))
        except csv.Error as exc:
            raise ValueError(f"{source}: not valid CSV ({_one_line(exc)})") from None
    if not rows:
        raise ValueError(f"{source} lists no images")
    return source, rows


def _is_volume(path: Path) -> bool:
    return path.name.lower().endswith(_VOLUME_SUFFIXES)


def _load_png(path: Path) -> tuple[np.ndarray, int]:
    """``(H, W)`` float32 in ``[0, 1]`` and the source bit depth (8 or 16)."""
    with Image.open(path) as im:
        bits = _bits(im)
        if bits == 8 and im.mode != "L":
            im = im.convert("L")
        arr = np.asarray(im, dtype=np.float64)
    top = 255.0 if bits == 8 else 65535.0
    return np.clip(arr / top, 0.0, 1.0).astype(np.float32), bits


def _bits(im: Image.Image) -> int:
    return 16 if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I") else 8


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data (i, j, k) float64, RAS affine 4x4)`` of a NIfTI volume (a trailing length-1 axis dropped)."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float64)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"shape {data.shape}: expected a 3D volume")
    if not np.isfinite(data).all():
        raise ValueError("voxels hold NaN or infinite values")
    return data, np.asarray(img.affine, dtype=np.float64)


def _check_nifti(path: Path) -> np.ndarray:
    """Header-only check of a NIfTI volume; returns its RAS affine."""
    import nibabel as nib

    img = nib.load(str(path))
    shape = img.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape) < 1:
        raise ValueError(f"shape {shape}: expected a 3D volume")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("affine is not finite and invertible")
    if not path.name.lower().endswith(".gz"):
        need = int(img.header.get_data_offset()) + int(np.prod(shape)) * img.get_data_dtype().itemsize
        if path.stat().st_size < need:
            raise ValueError(f"file is truncated ({path.stat().st_size} bytes, the header needs {need})")
    return affine


def volume_geometry(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """A NIfTI volume as the exporters' ``(slices, rows, columns)`` array and its LPS geometry.

    NIfTI voxel ``(i, j, k)`` maps to RAS mm by ``affine``; its LPS form ``diag(-1, -1, 1, 1) @
    affine`` gives the row direction (``i``, columns), the column direction (``j``, rows) and the
    slice direction (``k``). When ``k`` runs against ``row x column`` the slices are reversed, so
    slice positions increase along the DICOM normal.

    Args:
        data: ``(i, j, k)`` voxels.
        affine: 4x4 RAS affine.

    Returns:
        ``(volume (k, j, i), {"spacing": (slice, row, column) mm, "orientation": 6 LPS numbers,
        "origin": LPS mm of voxel (0, 0, 0) of the returned volume})``.

    Raises:
        ValueError: the affine has shear (its axes are not orthogonal).
    """
    lps = LPS_TO_RAS @ affine
    axes = lps[:3, :3]
    steps = np.linalg.norm(axes, axis=0)
    units = axes / steps
    if abs(units[:, 0] @ units[:, 1]) > 1e-4 or abs(units[:, 0] @ units[:, 2]) > 1e-4 or abs(units[:, 1] @ units[:, 2]) > 1e-4:
        raise ValueError("affine has shear (voxel axes are not orthogonal); resample the volume first")
    volume = np.ascontiguousarray(data.transpose(2, 1, 0))
    origin = lps[:3, 3].copy()
    if np.cross(units[:, 0], units[:, 1]) @ units[:, 2] < 0:
        volume = volume[::-1].copy()
        origin = origin + (data.shape[2] - 1) * axes[:, 2]
    geometry = {
        "spacing": (float(steps[2]), float(steps[1]), float(steps[0])),
        "orientation": tuple(float(v) for v in np.concatenate([units[:, 0], units[:, 1]])),
        "origin": tuple(float(v) for v in origin),
    }
    return volume, geometry


def _volume_mapping(values: np.ndarray, modality: str) -> dict[str, Any]:
    """Intensity mapping that stores a volume's own values: HU for CT, grey levels otherwise."""
    low, high = float(values.min()), float(values.max())
    integral = bool(np.all(values == np.rint(values)))
    if modality == "CT":
        floor = float(np.floor(low))
        return {"kind": "nifti_hu", "low": floor, "high": max(float(np.ceil(high)), floor + 1), "unit": "HU",
                "bits_stored": 12, "modality": "CT"}
    if integral and low >= 0 and high <= 65535:
        bits = max(8, int(high).bit_length())
        return {"kind": "nifti_grey", "low": 0.0, "high": max(high, 1.0), "unit": "", "bits_stored": bits,
                "modality": modality}
    # non-integer or negative values: spread over 12 bits (the range is kept in the mapping)
    return {"kind": f"nifti_rescaled[{low:g},{high:g}]", "low": 0.0, "high": 4095.0, "unit": "",
            "bits_stored": 12, "modality": modality}


def _volume_unit(values: np.ndarray, mapping: Mapping[str, Any]) -> np.ndarray:
    """Voxel values as ``[0, 1]`` floats under ``mapping`` (see :func:`_volume_mapping`)."""
    if str(mapping["kind"]).startswith("nifti_rescaled"):
        low, high = float(values.min()), float(values.max())
        return (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.clip((values - mapping["low"]) / (mapping["high"] - mapping["low"]), 0.0, 1.0)


@dataclass
class _Item:
    """One checked metadata row, ready to export."""

    row: int
    file_name: str
    path: Path
    volume: bool
    meta: dict[str, Any]


def _check_rows(
    root: Path, source: Path, rows: list[tuple[int, dict[str, Any]]], modality: str | None
) -> tuple[str, list[_Item]]:
    """Step 2 of :func:`export_imagefolder`: check every row; nothing is written."""
    mod = resolve_modality(rows[0][1], modality)
    items: list[_Item] = []
    stems: dict[str, int] = {}
    for number, line in rows:
        where = f"{source} row {number}"
        path = resolve_member(root, line.get("file_name"), source=source, row=number)  # type: ignore[arg-type]
        name = line["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{root / name} ({where}) does not exist")
        meta = dict(line)
        volume = _is_volume(path)
        try:
            if volume:
                if mod not in ("CT", "MR"):
                    raise ValueError(f"volumes are exported as CT or MR, not {mod}; pass --modality CT or MR")
                _check_nifti(path)
                meta.pop("intensity", None)  # a volume's own values define its mapping
            else:
                with Image.open(path) as im:
                    bits = _bits(im)
                    im.verify()  # reads every chunk: catches truncated and corrupt files
                if meta.get("intensity") is None and mod != "CT":
                    top = 255.0 if bits == 8 else 65535.0
                    meta["intensity"] = {
                        "kind": f"png{bits}", "low": 0.0, "high": top, "unit": "", "bits_stored": bits, "modality": mod
                    }
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            kind = "volume" if volume else "image"
            raise ValueError(f"{root / name} ({where}): unusable {kind}: {_one_line(exc)}") from None
        try:
            if not volume:
                PixelEncoding.create(meta.get("intensity"), mod)
            prov = Provenance.from_metadata(meta)
            SyntheticPatient.invent(None, prov.attributes.get("sex"), prov.attributes.get("age"))
        except ValueError as exc:
            raise ValueError(f"{where}: {_one_line(exc)}") from None
        if prov.stem in stems:
            raise ValueError(
                f"{where}: file_name={name!r} exports to the same name {prov.stem!r} as row {stems[prov.stem]}"
            )
        stems[prov.stem] = number
        items.append(_Item(number, name, path, volume, meta))
    return mod, items


def read_imagefolder(path: str | Path) -> Iterator[tuple[np.ndarray, dict[str, Any], int]]:
    """Yield ``(image, metadata row, bit depth)`` for each 2D image row of an imagefolder, in order.

    Rows naming volumes (``.nii``/``.nii.gz``) are skipped. Every ``file_name`` is checked with
    :func:`resolve_member`.

    Args:
        path: Folder with images and ``metadata.jsonl`` (or ``metadata.csv``).

    Raises:
        FileNotFoundError: the folder, its metadata or a listed image is missing.
        ValueError: bad metadata (see :func:`read_metadata`), a refused ``file_name``, or an
            unreadable image.
    """
    root = Path(path)
    source, rows = read_metadata(root)
    for number, line in rows:
        image_path = resolve_member(root, line.get("file_name"), source=source, row=number)  # type: ignore[arg-type]
        if _is_volume(image_path):
            continue
        if not image_path.is_file():
            raise FileNotFoundError(f"{root / line['file_name']} ({source} row {number}) does not exist")
        try:
            image, bits = _load_png(image_path)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{image_path} ({source} row {number}): cannot read image ({_one_line(exc)})") from None
        yield image, line, bits


def resolve_modality(line: Mapping[str, Any], override: str | None) -> str:
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


def _read_record(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Header and complete entries of an export record (a torn last line is dropped)."""
    try:
        raw = path.read_bytes().decode("utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None, []
    lines = raw.split("\n")[:-1]  # the part after the last newline is torn or empty
    try:
        parsed = [json.loads(line) for line in lines]
    except json.JSONDecodeError:
        return None, []
    if not parsed or not isinstance(parsed[0], dict) or "fingerprint" not in parsed[0]:
        return None, []
    return parsed[0], [e for e in parsed[1:] if isinstance(e, dict)]


def _entry_line(entry: Mapping[str, Any]) -> bytes:
    return (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")


def _entry_files(entry: Mapping[str, Any]) -> list[str]:
    files = [entry[k] for k in ("dicom_file", "nifti_file", "nifti_sidecar") if isinstance(entry.get(k), str)]
    return files + [f for f in entry.get("dicom_files", []) if isinstance(f, str)]


def _prepare_output(out: Path, header: dict[str, Any], overwrite: bool) -> tuple[bool, list[dict[str, Any]]]:
    """Step 3 of :func:`export_imagefolder`: ``(continuing, entries)``, whether ``out`` holds an
    earlier run of the same export and the entries that run recorded. Removes stale temporary files
    in any case, and a previous export's files when ``overwrite`` is true."""
    ours = [out / "dicom", out / "nifti", out / MANIFEST, out / RECORD]
    # only where the export writes: out itself (not its other sub-folders), dicom/ and nifti/
    clean_stale_temps(out, recursive=False)
    for folder in ours[:2]:
        clean_stale_temps(folder)
    previous, entries = _read_record(out / RECORD)
    if any(p.exists() for p in ours):
        if previous is not None and previous.get("fingerprint") == header["fingerprint"] and not overwrite:
            return True, entries
        if not overwrite:
            if previous is None:
                what = "files of another export (no export record)"
            else:
                old = previous.get("settings", {})
                changed = sorted(k for k in set(old) | set(header["settings"]) if old.get(k) != header["settings"].get(k))
                what = f"an export of another command (differs in: {', '.join(changed) or 'settings'})"
            raise FileExistsError(
                f"--output {out} holds {what}; pass --overwrite to replace it, or choose another --output "
                "(the same command again continues an interrupted export)"
            )
        for path in ours:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return False, []


def _fingerprint(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:16]


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
    """Convert every image and volume of an imagefolder to DICOM and/or NIfTI.

    Every row is checked before anything is written, so a bad row (a ``file_name`` outside the
    folder, a missing or truncated image, bad metadata) stops the export with nothing written.
    Running the same export again (same input folder and metadata, formats and settings) continues
    where an interrupted run stopped: rows recorded as finished whose files exist are skipped (from
    the start of their study when ``images_per_study > 1``), and as UIDs and patients derive from
    each row's seed the result equals an uninterrupted run. A completed export run again changes
    nothing.

    Images without an ``intensity`` mapping in their metadata get one from their PNG bit depth
    (grey levels ``0..255`` or ``0..65535``), except for CT, which then uses the default 40/400 HU
    window (see :func:`exporters.intensity.default_mapping`). Volumes keep their own values: HU for
    CT, integer grey levels (or, for non-integer or negative values, the range spread over 12 bits)
    for MR; their geometry comes from the NIfTI affine (RAS, converted to DICOM LPS).

    Args:
        input_dir: The imagefolder (left untouched).
        output_dir: Where ``dicom/``, ``nifti/`` and ``export_manifest.jsonl`` go; must not lie
            inside ``input_dir``.
        formats: Any of ``"dicom"``, ``"nifti"`` (duplicates ignored).
        modality: ``DX``, ``CR``, ``CT`` or ``MR`` for all rows; ``None``: from the first row
            (:func:`resolve_modality`). Volumes need CT or MR.
        images_per_study: Consecutive rows grouped into one DICOM study of one invented patient.
        overwrite: Replace a previous export in ``output_dir`` (its ``dicom/``, ``nifti/``,
            manifest and record are removed first; other files there are left alone).
        software_name: Generator name written into the headers.
        software_version: Its version.
        pixel_spacing: In-plane pixel spacing of 2D images in mm, or ``None`` for the nominal field
            of view.
        on_image: Called with the number of rows done (resumed ones included) after each row.

    Returns:
        An :class:`ExportSummary`.

    Raises:
        ValueError: bad arguments, metadata, file names or images.
        FileNotFoundError: missing input folder, metadata or listed file.
        FileExistsError: ``output_dir`` is a file, or holds another export and ``overwrite`` is false.
        PermissionError: ``output_dir`` cannot be written.
    """
    # 1. Check the arguments.
    wanted = list(dict.fromkeys(str(f).lower() for f in formats)) if not isinstance(formats, str) else [formats]
    unknown = [f for f in wanted if f not in FORMATS]
    if not wanted or unknown:
        raise ValueError(f"formats={list(formats)!r}: expected one or more of {', '.join(FORMATS)}")
    if isinstance(images_per_study, bool) or not isinstance(images_per_study, int) or images_per_study < 1:
        raise ValueError(f"images_per_study={images_per_study!r}: expected an integer >= 1")
    spacing = validate_pixel_spacing(pixel_spacing)
    root, out = Path(input_dir), Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is a file; expected a folder")

    # 2. Read and check every row before anything is written.
    source, rows = read_metadata(root)
    mod, items = _check_rows(root, source, rows, modality)
    root_abs, out_abs = root.resolve(), out.resolve()
    if out_abs == root_abs or root_abs in out_abs.parents:
        raise ValueError(f"output {out} lies inside the input folder {root}, which must stay untouched")
    if any(p == root_abs or p in root_abs.parents for p in (out_abs / "dicom", out_abs / "nifti")):
        raise ValueError(f"input {root} lies inside the output's dicom/ or nifti/ folder")

    # 3. Prepare the output folder: new, continued, or refused.
    settings = {
        "input": str(root_abs),
        "metadata_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "formats": sorted(wanted),
        "modality": mod,
        "images_per_study": images_per_study,
        "pixel_spacing": None if spacing is None else list(spacing),
        "software": [software_name, software_version],
    }
    header = {"radsynth_export": 1, "fingerprint": _fingerprint(settings), "settings": settings}
    record = out / RECORD
    try:
        continuing, entries = _prepare_output(out, header, overwrite)
        done = 0
        for item, entry in zip(items, entries):
            if entry.get("file_name") != item.file_name or not all(
                (out / f).is_file() and (out / f).stat().st_size > 0 for f in _entry_files(entry)
            ):
                break
            done += 1
        # a study cut short is redone from its first image (its UIDs and patient come from that one)
        start = done if done == len(items) or "dicom" not in wanted else done - done % images_per_study
        entries = entries[:start]
        atomic_write_bytes(record, b"".join(_entry_line(e) for e in [header, *entries]), overwrite=True)
    except PermissionError as exc:
        raise PermissionError(f"cannot write to output {out}: permission denied ({exc.filename or out})") from None

    # 4. Export row after row, recording each finished one.
    common: dict[str, Any] = dict(
        software_name=software_name, software_version=software_version, overwrite=continuing
    )
    dicom = nifti = None
    if "dicom" in wanted:
        dicom = DicomExporter(out / "dicom", mod, images_per_study=images_per_study, pixel_spacing=spacing, **common)
    if "nifti" in wanted:
        nifti = NiftiExporter(out / "nifti", mod, pixel_spacing=spacing, **common)
    summary = ExportSummary(images=0, modality=mod, files={f: 0 for f in wanted}, manifest=out / MANIFEST,
                            resumed=start)
    for number, item in enumerate(items[start:], start + 1):
        entry = _export_item(item, source, out, dicom, nifti)
        fd = os.open(record, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, _entry_line(entry))  # one write per line
        finally:
            os.close(fd)
        entries.append(entry)
        if on_image is not None:
            on_image(number)

    # 5. The manifest.
    atomic_write_bytes(out / MANIFEST, b"".join(_entry_line(e) for e in entries), overwrite=True)
    summary.images = len(entries)
    for entry in entries:
        if "dicom" in wanted:
            summary.files["dicom"] += len(entry.get("dicom_files", [entry.get("dicom_file")]))
        if "nifti" in wanted:
            summary.files["nifti"] += 2
    summary.truncated = dict(dicom.truncated) if dicom is not None else {}
    return summary


def _export_item(
    item: _Item, source: Path, out: Path, dicom: DicomExporter | None, nifti: NiftiExporter | None
) -> dict[str, Any]:
    """Write one checked row; returns its manifest entry."""
    entry: dict[str, Any] = {"file_name": item.file_name}
    try:
        if item.volume:
            data, affine = _load_nifti(item.path)
            volume, geometry = volume_geometry(data, affine)
            modality = (dicom or nifti).modality  # type: ignore[union-attr]
            mapping = _volume_mapping(volume, modality)
            unit = _volume_unit(volume, mapping)
            meta = {**item.meta, "intensity": mapping}
        else:
            image, _bits_ = _load_png(item.path)
            meta = item.meta
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ValueError(f"{item.path} ({source} row {item.row}): cannot read ({_one_line(exc)})") from None
    if dicom is not None:
        if item.volume:
            paths = dicom.add_volume(unit, meta, geometry["spacing"], orientation=geometry["orientation"],
                                     origin=geometry["origin"])
            entry["dicom_files"] = [p.relative_to(out).as_posix() for p in paths]
        else:
            paths = dicom.add(image, meta)
        entry["dicom_file"] = paths[0].relative_to(out).as_posix()
    if nifti is not None:
        if item.volume:
            paths = nifti.add_volume(unit, meta, geometry["spacing"], orientation=geometry["orientation"],
                                     origin=geometry["origin"])
        else:
            paths = nifti.add(image, meta)
        entry["nifti_file"] = paths[0].relative_to(out).as_posix()
        entry["nifti_sidecar"] = paths[1].relative_to(out).as_posix()
    return entry
