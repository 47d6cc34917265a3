"""Load a folder of volumes for training, in one of two layouts:

- an imagefolder whose ``metadata.jsonl`` (or ``.csv``) ``file_name`` names a NIfTI file
  (``.nii``/``.nii.gz``) or a DICOM series folder, with the ``text`` column;
- a DICOM archive without a metadata file (any tree, e.g. ``patient/study/series/*.dcm``, or every file
  in one folder): files are grouped by SeriesInstanceUID, one volume per CT/MR series; the text comes
  from a reports CSV (``text`` keyed by ``StudyInstanceUID`` or ``AccessionNumber``, the reader of the
  2D DICOM folder mode) or, without one, the header's caption (:meth:`DicomHeader.text`, as in the 2D
  DICOM folder mode: modality, body part, study/series descriptions, sex, age; no finding is claimed).

Each volume is read in the standard layout (:mod:`generator.volumes.records`), resampled to a target
spacing and centre-cropped or padded to the training shape; unusable rows or series are reported with
their reason and skipped, never fatal alone.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from conditioning.prompts import normalize_sex
from generator.data.dataset import _read_reports  # the 2D DICOM folder mode's reports CSV reader
from generator.data.metadata import METADATA_NAMES, read_metadata_rows, resolve_member, split_row, walk_files
from generator.data.readers import DicomHeader, read_dicom_header
from generator.data.records import SkippedFile
from generator.volumes.geometry import crop_or_pad, parse_shape, parse_spacing, resample
from generator.volumes.readers import NIFTI_SUFFIXES, SeriesError, read_dicom_files, read_dicom_series, read_nifti
from generator.volumes.records import (
    DEFAULT_CT_WINDOW,
    DEFAULT_MR_PERCENTILES,
    Volume,
    VolumeIngestResult,
    mapping_description,
)

__all__ = ["load_volumes", "prepare_volume"]


def prepare_volume(volume: Volume, spacing: Sequence[float] | float | None = None,
                   shape: Sequence[int] | int | None = None) -> Volume:
    """Resample ``volume`` to ``spacing`` (mm) then centre-crop/pad it to ``shape`` ``(D, H, W)``.

    Either may be ``None`` (left as is).
    """
    sp = parse_spacing(spacing)
    sh = parse_shape(shape)
    if sp is not None:
        volume = resample(volume, sp)
    if sh is not None:
        volume = crop_or_pad(volume, sh)
    return volume


def load_volumes(
    root: str | Path,
    *,
    spacing: Sequence[float] | float | str | None = None,
    shape: Sequence[int] | int | None = None,
    modality: str | None = None,
    ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
    mr_percentiles: Sequence[float] = DEFAULT_MR_PERCENTILES,
    reports_csv: str | Path | None = None,
) -> VolumeIngestResult:
    """Read every volume of ``root``: the rows of its metadata file, or else every DICOM series under it.

    Args:
        root: Folder with ``metadata.jsonl`` or ``metadata.csv`` (columns ``file_name``, ``text``;
            optional ``patient_id``, ``modality``, ``sex``, ``age``, ``findings``, ``label``), or a
            DICOM archive without one (read recursively, one volume per series, see
            :func:`_load_dicom_archive`).
        spacing: Target ``(slice, row, column)`` mm, one number for isotropic, or ``None`` to keep.
        shape: Training shape ``(D, H, W)`` or one side; ``None`` keeps each volume's own.
        modality: ``"CT"`` or ``"MR"`` for every row; ``None`` reads the row's ``modality`` column
            (NIfTI rows without one are CT; DICOM series use their header). In a DICOM archive, series
            of the other modality are skipped.
        ct_window: HU range mapped to the model range for CT.
        mr_percentiles: Percentiles of non-zero voxels mapped to the model range for MR.
        reports_csv: DICOM archive only: CSV with a ``text`` column keyed by ``StudyInstanceUID`` or
            ``AccessionNumber``; series without a report are skipped. ``None``: texts built from the
            headers.

    Returns:
        Volumes sorted by ``file_name`` and the skipped rows or series with reasons.

    Raises:
        ValueError: ``root`` is not a folder, has a malformed metadata file, has neither a metadata file
            nor a DICOM image series, ``reports_csv`` is given with a metadata file (or lacks the
            columns), or a bad argument.
        FileNotFoundError: ``reports_csv`` does not exist.
    """
    root = Path(root)
    sp = parse_spacing(spacing)
    sh = parse_shape(shape)
    if modality is not None and modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT', 'MR' or None, got {modality!r}")
    if not root.is_dir():
        raise ValueError(f"root={str(root)!r} is not a folder (expected a folder with metadata.jsonl/metadata.csv "
                         "or with DICOM series)")
    metas = [root / n for n in METADATA_NAMES if (root / n).is_file()]
    if not metas:
        return _load_dicom_archive(root, sp, sh, modality=modality, ct_window=ct_window,
                                   mr_percentiles=mr_percentiles, reports_csv=reports_csv)
    if len(metas) > 1:
        raise ValueError(f"{root} has both metadata.jsonl and metadata.csv; keep only one")
    meta = metas[0]
    if reports_csv is not None:
        raise ValueError(f"reports_csv={str(reports_csv)!r} is for a DICOM folder without a metadata file, but {root} "
                         f"has {meta.name}: put the texts in its 'text' column, or leave reports_csv out")
    rows = read_metadata_rows(meta)
    records: list[Volume] = []
    skipped: list[SkippedFile] = []
    for i, row in enumerate(rows, 1):
        name = row.get("file_name")
        try:
            path = resolve_member(root, name, source=meta, row=i)
        except ValueError as exc:
            skipped.append(SkippedFile(str(name), str(exc)))
            continue
        attributes, extra = split_row(row, from_csv=meta.suffix == ".csv")
        pid = attributes.get("patient_id")
        fields = dict(file_name=str(name), text=str(row.get("text") or ""), attributes=attributes,
                      patient_id=None if pid is None else str(pid), extra=extra)
        row_modality = modality or (str(attributes["modality"]).upper() if attributes.get("modality") else None)
        try:
            if not path.exists():
                raise SeriesError(f"{name}: no such file or folder")
            if path.is_dir():
                vol = read_dicom_series(path, ct_window=ct_window, mr_percentiles=mr_percentiles, **fields)
                if row_modality is not None and vol.modality != row_modality:
                    raise SeriesError(f"{name}: the series is {vol.modality} but the row says {row_modality}")
            elif path.name.lower().endswith(NIFTI_SUFFIXES):
                vol = read_nifti(path, modality=row_modality or "CT", ct_window=ct_window,
                                 mr_percentiles=mr_percentiles, **fields)
            else:
                raise SeriesError(f"{name}: not a NIfTI file (.nii, .nii.gz) or a DICOM series folder")
            vol = prepare_volume(vol, sp, sh)
        except SeriesError as exc:
            skipped.append(SkippedFile(str(name), str(exc)))
            continue
        records.append(vol)
    return _result(records, skipped, f"{len(rows)} rows", sp, sh)


def _result(records: list[Volume], skipped: list[SkippedFile], source: str, sp: tuple[float, float, float] | None,
            sh: tuple[int, int, int] | None, note: str = "") -> VolumeIngestResult:
    """The :class:`VolumeIngestResult` of ``records`` (sorted here) with the one-line summary
    "read N volumes from <source>, skipped K (reason xn; ...)<note>"."""
    records.sort(key=lambda v: v.file_name)
    reasons = Counter(s.reason.split(": ", 1)[-1].split(":")[0] for s in skipped)
    summary = f"read {len(records)} volumes from {source}, skipped {len(skipped)}"
    if reasons:
        summary += " (" + "; ".join(f"{r} x{n}" for r, n in reasons.most_common(5)) + ")"
    return VolumeIngestResult(records=records, skipped=skipped, spacing=sp, shape=sh,
                              intensity=mapping_description([r.intensity for r in records]), summary=summary + note)


@dataclass
class _Series:
    """The files of one series found in a DICOM archive, and the header of its first file."""

    uid: str
    header: DicomHeader
    paths: list[Path] = field(default_factory=list)


#: Values of at least this many bytes are not read by the header pass (Pixel Data is seen, not loaded).
_DEFER_BYTES = 1024


def _scan_archive(root: Path, skip: Path | None) -> tuple[dict[str, _Series], list[SkippedFile], int, int]:
    """Read the header of every file under ``root`` (hidden entries skipped) and group the image slices.

    Args:
        root: The archive folder.
        skip: A file not to look at (the reports CSV when it lies inside ``root``), or ``None``.

    Returns:
        (series by SeriesInstanceUID, unreadable files and image slices without a SeriesInstanceUID as
        skipped entries, the number of files looked at, the number ignored: not DICOM, or DICOM objects
        without Pixel Data or Image Position/Orientation (Patient)).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, _Series] = {}
    skipped: list[SkippedFile] = []
    no_uid: Counter[str] = Counter()
    files = ignored = 0
    for path in walk_files(root):
        if skip is not None and path.resolve() == skip:
            continue
        files += 1
        rel = path.relative_to(root).as_posix()
        try:
            # defer_size rather than stop_before_pixels: the header pass must see whether Pixel Data is there
            ds = pydicom.dcmread(str(path), defer_size=_DEFER_BYTES)
        except InvalidDicomError:
            ignored += 1
            continue
        except Exception as exc:  # noqa: BLE001 - a DICOM file that pydicom cannot parse: report, go on
            skipped.append(SkippedFile(rel, f"{rel}: unreadable DICOM file: {type(exc).__name__}: {exc}"))
            continue
        if "PixelData" not in ds or "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            ignored += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        if not uid:
            no_uid[path.parent.relative_to(root).as_posix()] += 1
            continue
        if uid not in series:
            series[uid] = _Series(uid, read_dicom_header(ds))
        series[uid].paths.append(path)
    for folder, n in sorted(no_uid.items()):
        skipped.append(SkippedFile(folder, f"{folder}: no SeriesInstanceUID: {n} DICOM image file(s) cannot be "
                                           "grouped into a series"))
    return series, skipped, files, ignored


def _series_names(root: Path, series: dict[str, _Series]) -> dict[str, str]:
    """SeriesInstanceUID -> ``file_name``: the POSIX path, relative to ``root`` (``"."`` for ``root``
    itself), of the folder holding the series' files (their deepest common folder), plus
    ``#<SeriesInstanceUID>`` when several series share that folder."""
    folders = {uid: Path(os.path.commonpath([str(p.parent) for p in s.paths])).relative_to(root).as_posix()
               for uid, s in series.items()}
    shared = Counter(folders.values())
    return {uid: f"{f}#{uid}" if shared[f] > 1 else f for uid, f in folders.items()}


def _load_dicom_archive(
    root: Path,
    sp: tuple[float, float, float] | None,
    sh: tuple[int, int, int] | None,
    *,
    modality: str | None,
    ct_window: Sequence[float],
    mr_percentiles: Sequence[float],
    reports_csv: str | Path | None,
) -> VolumeIngestResult:
    """Read a DICOM archive without a metadata file: one volume per CT/MR series found under ``root``.

    Every file under ``root`` is looked at (recursively; hidden files and folders skipped). Files that
    are not DICOM, and DICOM objects without Pixel Data or Image Position/Orientation (Patient)
    (DICOMDIR, structured reports, ...), are ignored and counted in the summary. Image slices are
    grouped by SeriesInstanceUID, wherever they lie, and each series is read with
    :func:`generator.volumes.readers.read_dicom_files` (the rules of a series folder).

    A volume's ``file_name`` is the POSIX path, relative to ``root`` (``"."`` for ``root`` itself), of the
    folder holding its files, plus ``#<SeriesInstanceUID>`` when that folder holds several series;
    ``patient_id`` is PatientID; ``attributes`` are the header's (``patient_id``, ``modality``, ``sex``
    from PatientSex, ``age`` in years from PatientAge such as ``"070Y"``), updated by the report's
    attribute columns when there is a report.

    Args:
        root: The archive folder (e.g. ``patient/study/series/*.dcm``, or every file in one folder).
        sp: Target ``(slice, row, column)`` mm (parsed), or ``None`` to keep each volume's own.
        sh: Training shape ``(D, H, W)`` (parsed), or ``None`` to keep each volume's own.
        modality: ``"CT"`` or ``"MR"`` to keep only that modality (others skipped), or ``None``.
        ct_window: HU range mapped to the model range for CT.
        mr_percentiles: Percentiles of non-zero voxels mapped to the model range for MR.
        reports_csv: CSV with a ``text`` column keyed by ``StudyInstanceUID`` or else ``AccessionNumber``
            (read by the 2D DICOM folder mode's reader); a series whose study has no report is skipped.
            ``None``: the text is the header's caption (:meth:`DicomHeader.text`).

    Returns:
        Volumes sorted by ``file_name``; skipped series (failed validation: missing slices, uneven
        spacing, mixed orientation...; a modality other than CT/MR; no report) and unreadable DICOM
        files, each with its reason; the summary "read N volumes from M series, skipped K (...)".

    Raises:
        ValueError: ``root`` holds no DICOM image series, or a reports CSV without the needed columns.
        FileNotFoundError: ``reports_csv`` does not exist.
    """
    key: str | None = None
    reports: dict[str, dict[str, Any]] | None = None
    if reports_csv is not None:
        key, reports = _read_reports(reports_csv)
    csv_path = Path(reports_csv).resolve() if reports_csv is not None else None
    series, skipped, files, ignored = _scan_archive(root, csv_path)
    if not series:
        raise ValueError(f"{root}: no metadata.jsonl or metadata.csv and no DICOM image series found ({files} files "
                         f"looked at, {ignored} not DICOM image slices); expected a metadata file (file_name, text) "
                         "or DICOM series (files with Pixel Data and Image Position/Orientation (Patient))")
    names = _series_names(root, series)
    records: list[Volume] = []
    for uid in sorted(series, key=lambda u: names[u]):
        s, name = series[uid], names[uid]
        header = s.header
        if header.modality not in ("CT", "MR"):
            skipped.append(SkippedFile(name, f"{name}: Modality {header.modality!r} is not CT or MR"))
            continue
        if modality is not None and header.modality != modality:
            skipped.append(SkippedFile(name, f"{name}: the series is {header.modality} but modality={modality!r} "
                                             "was asked"))
            continue
        attributes = header.attributes()
        try:
            normalize_sex(attributes.get("sex"))
        except ValueError:  # a PatientSex other than M, F, O: not a value the prompts know
            attributes.pop("sex")
        extra: dict[str, Any] = {}
        if reports is not None:
            value = header.study_uid if key == "StudyInstanceUID" else header.accession
            row = reports.get(value or "")
            if row is None:
                skipped.append(SkippedFile(name, f"{name}: no report: {key} {value!r} is not in "
                                                 f"{Path(reports_csv).name}"))
                continue
            text = str(row.get("text") or "")
            more, extra = split_row(row, from_csv=True)
            attributes.update(more)
        else:
            text = header.text()  # what the header says, never a finding it does not state
        pid = attributes.get("patient_id")
        fields = dict(file_name=name, text=text, attributes=attributes, patient_id=None if pid is None else str(pid),
                      extra=extra)
        try:
            vol = read_dicom_files(s.paths, name=name, ct_window=ct_window, mr_percentiles=mr_percentiles, **fields)
        except SeriesError as exc:
            skipped.append(SkippedFile(name, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - e.g. compressed pixel data without a decoder: report, go on
            skipped.append(SkippedFile(name, f"{name}: unreadable DICOM series: {type(exc).__name__}: {exc}"))
            continue
        try:
            vol = prepare_volume(vol, sp, sh)
        except SeriesError as exc:
            skipped.append(SkippedFile(name, str(exc)))
            continue
        records.append(vol)
    note = f"; ignored {ignored} files that are not DICOM image slices" if ignored else ""
    return _result(records, skipped, f"{len(series)} series", sp, sh, note)
