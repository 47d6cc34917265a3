"""Read a folder of real radiology images with their report text (DESIGN.md §3.1).

Three kinds of input are accepted (see :func:`load_dataset`): a Hugging Face ``imagefolder``
(images plus ``metadata.jsonl``/``metadata.csv``), a DICOM folder without metadata (text from a
reports CSV or from header fields), and a MedMNIST-style ``.npz``. The per-format pixel readers and
their intensity conventions live in :mod:`generator.data.readers`, the records in
:mod:`generator.data.records`, the metadata rows in :mod:`generator.data.metadata`.
"""

from __future__ import annotations

import csv
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from generator.data import readers
from generator.data.metadata import (
    find_metadata,
    resolve_member,
    read_metadata_rows,
    split_fragment,
    split_row,
    walk_files,
)
from generator.data.records import ImageRecord, IngestResult, IntensityMapping, SkippedFile

__all__ = ["load_dataset"]

logger = logging.getLogger(__name__)

#: Smallest image side accepted (a smaller image cannot be a radiograph; upsampling it invents data).
MIN_SIDE = 4

#: DICOM modalities that carry pixel data but are not images to learn from (DICOM folder mode).
_NON_IMAGE_MODALITIES = frozenset({"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "REG", "SR", "PR", "KO"})
#: File name endings counted as images when reporting files not listed in metadata.
_IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".ima", ".nii", ".nii.gz")


def check_read_options(nifti_axis: int, ct_window: tuple[float, float]) -> tuple[float, float]:
    """Validate the reading options shared by :func:`load_dataset` and ``prepare``.

    Returns:
        ``ct_window`` as ``(centre, width)`` floats.

    Raises:
        ValueError: ``nifti_axis`` not 0, 1 or 2, or ``ct_window`` not (centre, width > 0).
    """
    if nifti_axis not in (0, 1, 2):
        raise ValueError(f"nifti_axis must be 0, 1 or 2, got {nifti_axis!r}")
    if len(ct_window) != 2 or not float(ct_window[1]) > 0:
        raise ValueError(f"ct_window must be (centre, width) with width > 0, got {ct_window!r}")
    return float(ct_window[0]), float(ct_window[1])


def load_dataset(
    path: str | Path,
    *,
    resolution: int | None = None,
    label_text: Mapping[int, str] | None = None,
    npz_split: str = "train",
    reports_csv: str | Path | None = None,
    ct_window: tuple[float, float] = (40.0, 400.0),
    nifti_axis: int = 2,
    progress: bool = True,
) -> IngestResult:
    """Read a training folder (imagefolder, DICOM folder or MedMNIST ``.npz``).

    Input kinds, tried in this order:

    - ``path`` is an ``.npz`` file: MedMNIST layout, ``{split}_images`` ``(N, H, W)`` (or
      ``(N, H, W, 3)``, converted to luma) and ``{split}_labels`` ``(N,)``/``(N, 1)``; records are
      named ``"name.npz#train/17"``, their text is ``label_text[label]`` and attribute ``label``.
    - ``path`` holds ``metadata.jsonl``/``metadata.csv`` (at the root or in subfolders, each
      covering ``file_name`` paths relative to its own folder): the Hugging Face ``imagefolder``
      convention. Columns in ``ATTRIBUTE_KEYS`` go to ``record.attributes`` (JSON values as-is;
      CSV strings converted: ``age``/``label`` to int when numeric, ``findings`` parsed when it is a
      JSON list/object, empty cells dropped); other columns go to ``record.extra`` verbatim. A
      ``file_name`` naming a 3D NIfTI or multi-frame DICOM yields one record per slice/frame (all
      with the row's text); ``"vol.nii.gz#z=12"`` or ``"cine.dcm#frame=3"`` selects one.
      Image files present but not listed are ignored and counted in the summary.
    - Otherwise a folder of DICOM files (``*.dcm`` or files with the DICM marker): text from
      ``reports_csv`` (keyed by ``StudyInstanceUID`` or else ``AccessionNumber``; a file whose
      study has no report is skipped), else a short caption from header fields; attributes
      ``patient_id`` (PatientID), ``modality``, ``view`` (ViewPosition), ``sex``, ``age`` (years)
      from the header, overridden by report columns of the same name.

    Pixels become ``float32`` in ``[0, 1]`` with an :class:`IntensityMapping` per record (see
    :mod:`generator.data.readers` for each format's convention: bit depth for PNG/JPEG, modality LUT then
    VOI window or ``ct_window`` for DICOM, MONOCHROME1 inverted; canonical RAS+ reorientation and
    radiological display for NIfTI). The dataset-level mapping is the most common one. Records are
    sorted by ``file_name`` with digit runs compared as numbers (``#z=2`` before ``#z=10``).

    An unreadable file is logged with its path and reason, skipped and counted; a summary line
    ("read N images from F files, skipped K (...)") is logged and, with ``progress``, printed to
    stderr.

    Args:
        path: Folder with ``metadata.jsonl``/``metadata.csv``, a DICOM folder without metadata, or
            an ``.npz`` file with ``{split}_images`` and ``{split}_labels``.
        resolution: If given, every image is centre-cropped to a square and resized (area
            averaging) to ``(resolution, resolution)``.
        label_text: For ``.npz`` input: label value -> prompt text (required there).
        npz_split: Which split of an ``.npz`` to read (``"train"``, ``"val"``, ``"test"``).
        reports_csv: For a DICOM folder without metadata: CSV with ``text`` and a
            ``StudyInstanceUID`` or ``AccessionNumber`` column.
        ct_window: (centre, width) in HU used for CT without a VOI window.
        nifti_axis: Axis along which 3D NIfTI volumes are sliced into 2D images (after
            reorientation to RAS+: 0 sagittal, 1 coronal, 2 axial).
        progress: Show a progress bar and print the summary line.

    Raises:
        FileNotFoundError: ``path`` (or ``reports_csv``) does not exist.
        ValueError: metadata without a ``text`` column (naming the file), no usable image left
            (with the skip summary), bad arguments.
    """
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or resolution < 1):
        raise ValueError(f"resolution must be a positive int or None, got {resolution!r}")
    ct = check_read_options(nifti_axis, ct_window)

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data path not found: {root}")
    state = _State(resolution=resolution)

    if root.is_file():
        if not root.name.lower().endswith(".npz"):
            raise ValueError(f"path must be a data folder or an .npz file, got the file {root}")
        if reports_csv is not None:
            raise ValueError(f"reports_csv is only used for a DICOM folder, got {reports_csv!r} with {root}")
        source = "npz"
        _load_npz(root, label_text, npz_split, state)
    else:
        if label_text is not None:
            raise ValueError(f"label_text is only used for .npz input, but {root} is a folder")
        metas = find_metadata(root)
        if metas:
            if reports_csv is not None:
                raise ValueError(
                    f"reports_csv={str(reports_csv)!r} is only used for a DICOM folder without "
                    f"metadata, but {root} has {metas[0].relative_to(root).as_posix()}"
                )
            source = "imagefolder"
            _load_imagefolder(root, metas, ct, nifti_axis, progress, state)
        else:
            dicoms = [p for p in walk_files(root) if readers.is_dicom_file(p)]
            if not dicoms:
                n_img = sum(1 for p in walk_files(root) if p.name.lower().endswith(_IMAGE_ENDINGS))
                if n_img:
                    raise ValueError(
                        f"no metadata.jsonl or metadata.csv in {root} ({n_img} image files found): "
                        "write one with 'file_name' and 'text' columns (Hugging Face imagefolder)"
                    )
                raise ValueError(f"empty dataset: no images and no metadata found in {root}")
            source = "dicom_folder"
            _load_dicom_folder(root, dicoms, reports_csv, ct, progress, state)

    records = sorted(state.records, key=lambda r: readers.natural_key(r.file_name))
    summary = state.summary(source)
    logger.info("ingest %s: %s", root, summary)
    if progress:
        print(f"radsynth ingest: {summary}", file=sys.stderr)
    if not records:
        first = "; ".join(f"{k.path}: {k.reason}" for k in state.skipped[:3])
        raise ValueError(f"no usable image in {root}: {summary}" + (f". First: {first}" if first else ""))
    counts = Counter(r.intensity for r in records)
    intensity = counts.most_common(1)[0][0]
    if len(counts) > 1:
        logger.info("%d different intensity mappings; dataset-level mapping %s is used by %d of %d "
                    "records", len(counts), intensity.to_dict(), counts[intensity], len(records))
    return IngestResult(root=root, records=records, skipped=state.skipped, intensity=intensity,
                        source=source, ignored=state.ignored, summary=summary)


# ------------------------------------------------------------------------------------------ helpers
@dataclass
class _State:
    """Records, skips and counters collected while reading."""

    resolution: int | None
    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    files_read: int = 0
    ignored: int = 0

    def skip(self, path: str, reason: str) -> None:
        logger.warning("skipped %s: %s", path, reason)
        self.skipped.append(SkippedFile(path=path, reason=reason))

    def make(self, file_name: str, text: str, image: np.ndarray, attributes: dict[str, Any],
             intensity: IntensityMapping, extra: dict[str, Any]) -> ImageRecord | None:
        """The record (resized when ``resolution`` is set), or ``None`` after reporting a skip."""
        if image.ndim != 2 or min(image.shape) < MIN_SIDE:
            self.skip(file_name, f"too small: {'x'.join(map(str, image.shape))} pixels "
                                 f"(an image needs at least {MIN_SIDE}x{MIN_SIDE})")
            return None
        if self.resolution is not None:
            image = readers.area_resize(image, self.resolution)
        return ImageRecord(file_name=file_name, text=text, image=np.asarray(image, dtype=np.float32),
                           attributes=attributes, intensity=intensity, extra=extra)

    def add(self, file_name: str, text: str, image: np.ndarray, attributes: dict[str, Any],
            intensity: IntensityMapping, extra: dict[str, Any]) -> None:
        record = self.make(file_name, text, image, attributes, intensity, extra)
        if record is not None:
            self.records.append(record)

    def summary(self, source: str) -> str:
        n, k = len(self.records), len(self.skipped)
        unit = "file" if self.files_read == 1 else "files"
        line = f"read {n} image{'s' if n != 1 else ''} from {self.files_read} {unit} ({source}), skipped {k}"
        if k:
            cats = Counter(s.reason.split(":", 1)[0] for s in self.skipped)
            line += " (" + ", ".join(f"{c} {cat}" for cat, c in cats.most_common()) + ")"
        if self.ignored:
            plural = "s" if self.ignored != 1 else ""
            line += f"; ignored {self.ignored} image file{plural} not listed in metadata"
        return line


def _read_any(path: Path, modality: str, ct: tuple[float, float], axis: int
              ) -> tuple[list[readers.Frame], readers.DicomHeader | None]:
    """Dispatch on format; returns (frames, DICOM header or None). Raises ``UnreadableFile``."""
    fmt = readers.sniff(path)
    if fmt in ("png", "jpeg"):
        return readers.read_raster(path, fmt, modality), None
    if fmt == "dicom":
        return readers.read_dicom(path, ct, default_modality=modality)
    if fmt == "nifti":
        return readers.read_nifti(path, axis, modality, ct), None
    raise readers.UnreadableFile("unsupported file type (expected PNG, JPEG, DICOM or NIfTI)")


def _load_imagefolder(root: Path, metas: list[Path], ct: tuple[float, float], nifti_axis: int,
                      progress: bool, state: _State) -> None:
    """Read an imagefolder: rows of every metadata file, grouped by image file."""
    from tqdm.auto import tqdm

    root_abs = root.resolve()
    # image file (relative POSIX path) -> list of (fragment, row, from_csv, metadata name)
    groups: dict[str, list[tuple[str | None, dict[str, Any], bool, str]]] = {}
    seen: dict[tuple[str, str | None], str] = {}
    for meta in metas:
        from_csv = meta.suffix == ".csv"
        meta_rel = meta.relative_to(root).as_posix()
        for i, row in enumerate(read_metadata_rows(meta), 1):
            name = row.get("file_name")
            base, frag = split_fragment(name.strip()) if isinstance(name, str) else (name, None)
            try:
                target = resolve_member(meta.parent, base, source=meta, row=i)
            except ValueError as exc:
                state.skip(meta_rel, f"bad metadata row: {exc}")
                continue
            rel = target.relative_to(root_abs).as_posix()
            if (rel, frag) in seen:
                state.skip(f"{rel}{'#' + frag if frag else ''}",
                           f"duplicate row: {meta_rel} row {i} names the same image as {seen[(rel, frag)]} "
                           "(the first row is used)")
                continue
            seen[(rel, frag)] = f"{meta_rel} row {i}"
            groups.setdefault(rel, []).append((frag, row, from_csv, meta_rel))

    listed = set(groups)
    state.ignored = sum(
        1 for p in walk_files(root)
        if p.name.lower().endswith(_IMAGE_ENDINGS) and p.relative_to(root).as_posix() not in listed
    )

    for rel in tqdm(sorted(groups, key=readers.natural_key), desc="reading images", unit="file",
                    disable=not progress):
        state.records.extend(file_records(root, rel, groups[rel], ct, nifti_axis, state))


#: One metadata row naming an image file: (fragment or None, row, from CSV, metadata file name).
RowRef = tuple[str | None, dict[str, Any], bool, str]


def file_records(root: Path, rel: str, rows: list[RowRef], ct: tuple[float, float], nifti_axis: int,
                 state: _State) -> Iterator[ImageRecord]:
    """Records of one imagefolder file (all its metadata rows), in frame order.

    Shared by :func:`load_dataset` and the streaming preparation in :mod:`generator.data.preparing`.
    Skips go to ``state.skip``; ``state.files_read`` counts the file once it could be read.
    """
    file_path = root / rel
    if not file_path.is_file():
        state.skip(rel, f"missing file: listed in {rows[0][3]} but not found")
        return
    cache: dict[int, list[Any]] = {}
    failed = False
    state.files_read += 1
    for frag, row, from_csv, meta_rel in rows:
        text = row.get("text")
        if text is None:
            state.skip(rel, f"no text: the {meta_rel} row for {rel} has no 'text'")
            continue
        attributes, extra = split_row(row, from_csv)
        hint = str(attributes.get("modality") or "OT").upper()
        axis = nifti_axis
        if frag is not None and frag[:2] in ("x=", "y=", "z="):
            axis = readers.AXIS_LETTERS.index(frag[0])
        if axis not in cache:
            try:
                cache[axis], _ = _read_any(file_path, hint, ct, axis)
            except readers.UnreadableFile as exc:
                state.skip(rel, f"unreadable {readers.sniff(file_path)} file: {exc}")
                failed = True
                break
            except Exception as exc:  # noqa: BLE001 - report, skip, go on
                state.skip(rel, f"unreadable {readers.sniff(file_path)} file: "
                                f"{type(exc).__name__}: {exc}")
                failed = True
                break
        frames = cache[axis]
        if frag is not None:
            frames = [f for f in frames if f.suffix == "#" + frag]
            if not frames:
                state.skip(f"{rel}#{frag}", f"no such slice/frame: {rel} has no #{frag}")
                continue
        for fr in frames:
            intensity = fr.intensity
            if intensity.modality == "OT" and hint != "OT":
                intensity = replace(intensity, modality=hint)
            record = state.make(rel + fr.suffix, str(text), fr.image, dict(attributes), intensity,
                                dict(extra))
            if record is not None:
                yield record
    if failed:
        state.files_read -= 1


def _read_reports(reports_csv: str | Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """Reports CSV -> (key column, {key: row}).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no ``text`` column or no ``StudyInstanceUID``/``AccessionNumber`` column.
    """
    p = Path(reports_csv)
    if not p.is_file():
        raise FileNotFoundError(f"reports_csv not found: {p}")
    with open(p, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): v for k, v in r.items() if k is not None} for r in reader]
    key = next((c for c in ("StudyInstanceUID", "AccessionNumber") if c in columns), None)
    if "text" not in columns or key is None:
        raise ValueError(
            f"{p}: a reports CSV needs a 'text' column and a 'StudyInstanceUID' or 'AccessionNumber' "
            f"column; columns found: {columns}"
        )
    table: dict[str, dict[str, Any]] = {}
    for r in rows:
        k = (r.get(key) or "").strip()
        if k:
            if k in table:
                logger.warning("%s: several reports for %s %s; using the first", p, key, k)
                continue
            table[k] = r
    return key, table


def _load_dicom_folder(root: Path, files: list[Path], reports_csv: str | Path | None,
                       ct: tuple[float, float], progress: bool, state: _State) -> None:
    """Read a folder of DICOM files without metadata."""
    from tqdm.auto import tqdm

    key, reports = _read_reports(reports_csv) if reports_csv is not None else (None, None)
    dicom_set = set(files)
    state.ignored = sum(1 for p in walk_files(root) if p.name.lower().endswith(_IMAGE_ENDINGS)
                        and p not in dicom_set)
    for path in tqdm(files, desc="reading DICOM", unit="file", disable=not progress):
        state.records.extend(dicom_file_records(
            root, path, key, None if reports is None else reports.get,
            None if reports_csv is None else Path(reports_csv).name, ct, state))


def dicom_file_records(root: Path, path: Path, key: str | None,
                       report_of: Callable[[str], dict[str, Any] | None] | None, reports_name: str | None,
                       ct: tuple[float, float], state: _State) -> Iterator[ImageRecord]:
    """Records of one file of a DICOM folder without metadata (one per frame).

    Args:
        root: The DICOM folder.
        path: The file, under ``root``.
        key: ``"StudyInstanceUID"`` or ``"AccessionNumber"`` (the reports' key column), or ``None``.
        report_of: Key value -> report row (``None``: no report), or ``None`` without a reports CSV.
        reports_name: The reports CSV's file name, used in skip reasons.
        ct: CT window ``(centre, width)`` in HU.
        state: Collects skips and the count of files read.
    """
    rel = path.relative_to(root).as_posix()
    try:
        frames, header = readers.read_dicom(path, ct)
    except readers.UnreadableFile as exc:
        state.skip(rel, f"unreadable dicom file: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - report, skip, go on
        state.skip(rel, f"unreadable dicom file: {type(exc).__name__}: {exc}")
        return
    if header.modality in _NON_IMAGE_MODALITIES:
        state.skip(rel, f"not an image: DICOM modality {header.modality} "
                        "(list it in a metadata file to use it anyway)")
        return
    attributes = header.attributes()
    extra: dict[str, Any] = {}
    if report_of is not None:
        value = header.study_uid if key == "StudyInstanceUID" else header.accession
        row = report_of(value or "")
        if row is None:
            state.skip(rel, f"no report: {key} {value!r} is not in {reports_name}")
            return
        text = str(row.get("text") or "")
        more, extra = split_row(row, from_csv=True)
        attributes.update(more)
    else:
        text = header.text()
    state.files_read += 1
    for fr in frames:
        record = state.make(rel + fr.suffix, text, fr.image, dict(attributes), fr.intensity, dict(extra))
        if record is not None:
            yield record


def _load_npz(path: Path, label_text: Mapping[int, str] | None, split: str, state: _State) -> None:
    """Read a MedMNIST-style ``.npz`` split."""
    try:
        z = np.load(path, allow_pickle=False)
        names = list(z.files)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    ik, lk = npz_keys(path, names, split)
    images, labels = np.asarray(z[ik]), np.asarray(z[lk])
    images = npz_gray(images)
    labels = npz_labels(path, split, labels, images.shape)
    texts, mapping, scale = npz_plan(path, split, labels, label_text, images.shape, z[ik].dtype,
                                     lambda: (float(images.min()), float(images.max())))
    state.files_read = 1
    for i in range(images.shape[0]):
        state.add(*npz_record_parts(path, split, i, images[i], int(labels[i]), texts, mapping, scale))


def npz_keys(path: Path, names: list[str], split: str) -> tuple[str, str]:
    """The image and label array names of ``split``.

    Raises:
        ValueError: the arrays are missing (naming the file, the split and the arrays found).
    """
    ik, lk = f"{split}_images", f"{split}_labels"
    splits = sorted({n.rsplit("_", 1)[0] for n in names if n.endswith(("_images", "_labels"))})
    if ik not in names or lk not in names:
        raise ValueError(
            f"{path}: npz_split={split!r} needs arrays {ik!r} and {lk!r}; arrays found: {names} "
            f"(splits: {splits})"
        )
    return ik, lk


def npz_gray(images: np.ndarray) -> np.ndarray:
    """``(N, H, W, 1|3)`` -> ``(N, H, W)`` (colour to luma, ITU-R 601); other shapes unchanged."""
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images[..., 0] if images.shape[-1] == 1 else (
            images[..., 0] * 0.299 + images[..., 1] * 0.587 + images[..., 2] * 0.114
        ).astype(images.dtype if images.dtype.kind == "f" else np.float64)
    return images


def npz_labels(path: Path, split: str, labels: np.ndarray, images_shape: tuple[int, ...]) -> np.ndarray:
    """``(N,)`` labels of ``split``, checked against the (grey) images' shape ``(N, H, W)``.

    Raises:
        ValueError: wrong label or image shape (naming the file and the shapes).
    """
    ik, lk = f"{split}_images", f"{split}_labels"
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != images_shape[0]:
        raise ValueError(
            f"{path}: {lk} must have shape (N,) or (N, 1) matching {ik} {tuple(images_shape)}, got "
            f"{labels.shape} (multi-label arrays are not supported)"
        )
    if len(images_shape) != 3:
        raise ValueError(f"{path}: {ik} must have shape (N, H, W) or (N, H, W, 3), got {tuple(images_shape)}")
    return labels


def npz_plan(path: Path, split: str, labels: np.ndarray, label_text: Mapping[int, str] | None,
             images_shape: tuple[int, ...], dtype: np.dtype,
             value_range: Callable[[], tuple[float, float]]
             ) -> tuple[dict[int, str], IntensityMapping, float]:
    """Texts per label, the intensity mapping and the pixel scale of an ``.npz`` split.

    Args:
        path: The ``.npz`` file (named in errors).
        split: The split read.
        labels: ``(N,)`` labels.
        label_text: Label -> prompt text.
        images_shape: Shape of the (grey) images, ``(N, H, W)``.
        dtype: The stored image dtype.
        value_range: Returns (min, max) over all images; called only for a floating-point dtype.

    Raises:
        ValueError: missing ``label_text`` or texts, or an unsupported dtype / value range.
    """
    ik, lk = f"{split}_images", f"{split}_labels"
    uniq = sorted(int(v) for v in np.unique(labels))
    if label_text is None:
        raise ValueError(
            f"label_text is required for .npz input {path}: map each label {uniq} to a prompt text"
        )
    texts: dict[int, str] = {}
    for k, v in label_text.items():
        try:
            texts[int(k)] = str(v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"label_text keys must be integer labels, got {k!r}") from exc
    missing = [u for u in uniq if u not in texts]
    if missing:
        raise ValueError(
            f"label_text has no text for labels {missing} found in {path} ({lk}); given: {sorted(texts)}"
        )
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return texts, IntensityMapping("npz_uint8", 0.0, 255.0, "", 8, "OT"), 255.0
    if dtype == np.uint16:
        return texts, IntensityMapping("npz_uint16", 0.0, 65535.0, "", 16, "OT"), 65535.0
    if dtype.kind == "f" and images_shape[0] * int(np.prod(images_shape[1:])):
        lo, hi = value_range()
        if 0.0 <= lo and hi <= 1.0:
            return texts, IntensityMapping("npz_float", 0.0, 1.0, "", 16, "OT"), 1.0
    raise ValueError(f"{path}: {ik} must be uint8, uint16 or float in [0, 1], got {dtype}")


def npz_record_parts(path: Path, split: str, i: int, image: np.ndarray, label: int, texts: Mapping[int, str],
                     mapping: IntensityMapping, scale: float
                     ) -> tuple[str, str, np.ndarray, dict[str, Any], IntensityMapping, dict[str, Any]]:
    """Arguments of ``_State.make``/``add`` for image ``i`` (``(H, W)``, stored dtype) of an ``.npz``."""
    return (f"{path.name}#{split}/{i}", texts[label], (image.astype(np.float64) / scale).astype(np.float32),
            {"label": label}, mapping, {})
