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
their reason and skipped, never fatal alone. :func:`load_volumes` holds them all in memory;
:func:`iter_volumes` yields the same volumes, in the same order, one at a time.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from conditioning.prompts import normalize_sex
from generator.data.dataset import _read_reports  # the 2D DICOM folder mode's reports CSV reader
from generator.data.metadata import METADATA_NAMES, read_metadata_rows, resolve_member, split_row, walk_files
from generator.data.readers import DicomHeader, read_dicom_header
from generator.data.records import IntensityMapping, SkippedFile
from generator.volumes.geometry import crop_or_pad, parse_shape, parse_spacing, resample
from generator.volumes.readers import NIFTI_SUFFIXES, SeriesError, read_dicom_files, read_dicom_series, read_nifti
from generator.volumes.records import (
    DEFAULT_CT_WINDOW,
    DEFAULT_MR_PERCENTILES,
    Volume,
    VolumeIngestResult,
    mapping_description,
)

__all__ = ["load_volumes", "iter_volumes", "prepare_volume", "VolumeStream"]


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

    All volumes are held in memory; :func:`iter_volumes` reads the same volumes one at a time.

    Args:
        root: Folder with ``metadata.jsonl`` or ``metadata.csv`` (columns ``file_name``, ``text``;
            optional ``patient_id``, ``modality``, ``sex``, ``age``, ``findings``, ``label``), or a
            DICOM archive without one (read recursively, one volume per series, see
            :func:`_archive_stream`).
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
    stream = iter_volumes(root, spacing=spacing, shape=shape, modality=modality, ct_window=ct_window,
                          mr_percentiles=mr_percentiles, reports_csv=reports_csv)
    return stream.result(list(stream))


class VolumeStream:
    """The prepared volumes of a source, read one at a time (made by :func:`iter_volumes`).

    ``items(stream)`` makes the iterator of volumes; it calls ``stream.skip`` for what it skips and counts
    ``stream.done``.

    Iterate it once: it yields each usable :class:`Volume` (``(D, H, W)`` float32, physical units,
    resampled to ``spacing`` and cropped/padded to ``shape``) in ``file_name`` order, reading the pixels
    of one row or series per step, so that only the volume being yielded is in memory. What it skips
    and the summary are filled in as it goes and final once it is exhausted.

    Attributes:
        spacing: The target ``(slice, row, column)`` mm (parsed), or ``None``.
        shape: The target ``(D, H, W)`` (parsed), or ``None``.
        total: Rows of the metadata file, or series of the DICOM archive: the most volumes it can yield.
        done: Rows or series handled so far (yielded or skipped).
        count: Volumes yielded so far.
        finished: The iterator is exhausted (``skipped``, ``summary`` and ``intensity`` are final).
    """

    def __init__(self, items: Callable[["VolumeStream"], Iterator[Volume]], *, total: int, source: str,
                 spacing: tuple[float, float, float] | None, shape: tuple[int, int, int] | None,
                 skipped: Sequence[SkippedFile] = (), note: str = "") -> None:
        self.spacing, self.shape, self.total = spacing, shape, int(total)
        self.done = self.count = 0
        self.finished = False
        self._source, self._note = source, note
        self._skips: list[tuple[int, SkippedFile]] = []
        self._mappings: dict[str, IntensityMapping] = {}  # the first mapping of each kind, the first one first
        for s in skipped:
            self.skip(s)
        self._items = items(self)
        self._started = False

    def __iter__(self) -> Iterator[Volume]:
        if self._started:
            raise ValueError("a VolumeStream is read once; call iter_volumes again to read the source again")
        self._started = True
        for vol in self._items:
            self.count += 1
            self._mappings.setdefault(vol.intensity.kind, vol.intensity)
            yield vol
            del vol  # not held while the next one is read
        self.finished = True

    def skip(self, entry: SkippedFile, key: int | None = None) -> None:
        """Record a skipped row, file or series; ``key`` is its place in the source order (``None``: the
        number recorded so far, for sources whose skips come in order)."""
        self._skips.append((len(self._skips) if key is None else int(key), entry))

    @property
    def skipped(self) -> list[SkippedFile]:
        """Skipped rows, files or series with reasons, in the source's order (metadata row order; for a DICOM
        archive: unreadable files first, then series by name), as :func:`load_volumes` lists them."""
        return [s for _, s in sorted(self._skips, key=lambda t: t[0])]

    @property
    def intensity(self) -> dict[str, Any]:
        """The dataset-level description of the yielded volumes' mappings (:func:`mapping_description`, which
        reads only the first mapping and the set of kinds: the first of each kind is kept, not one per volume)."""
        return mapping_description(list(self._mappings.values()))

    @property
    def summary(self) -> str:
        """"read N volumes from <source>, skipped K (reason xn; ...)<note>": :func:`load_volumes`'s line once
        the stream is exhausted (so far, before)."""
        return _summary(self.count, self.skipped, self._source, self._note)

    def result(self, records: list[Volume]) -> VolumeIngestResult:
        """The :class:`VolumeIngestResult` of ``records`` (the volumes this stream yielded, kept by the caller)."""
        return _result(records, self.skipped, self._source, self.spacing, self.shape, self._note)


def iter_volumes(
    root: str | Path,
    *,
    spacing: Sequence[float] | float | str | None = None,
    shape: Sequence[int] | int | None = None,
    modality: str | None = None,
    ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
    mr_percentiles: Sequence[float] = DEFAULT_MR_PERCENTILES,
    reports_csv: str | Path | None = None,
) -> VolumeStream:
    """The volumes of ``root`` as :func:`load_volumes` reads them, one at a time (memory flat in their number).

    The arguments are checked, the metadata file read (or the DICOM archive's headers scanned and grouped
    into series) before this returns; the pixels of a row or series are read when the stream reaches it.
    Rows are taken in ``file_name`` order (a stable sort: equal names keep their row order) and series in
    name order, so the stream yields exactly :func:`load_volumes`'s ``records``, in their order, and ends
    with the same ``skipped`` list and ``summary``.

    Args:
        root, spacing, shape, modality, ct_window, mr_percentiles, reports_csv: As :func:`load_volumes`.

    Returns:
        A :class:`VolumeStream` (iterate it once).

    Raises:
        ValueError, FileNotFoundError: as :func:`load_volumes`, before any pixel is read.
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
        return _archive_stream(root, sp, sh, modality=modality, ct_window=ct_window,
                               mr_percentiles=mr_percentiles, reports_csv=reports_csv)
    if len(metas) > 1:
        raise ValueError(f"{root} has both metadata.jsonl and metadata.csv; keep only one")
    meta = metas[0]
    if reports_csv is not None:
        raise ValueError(f"reports_csv={str(reports_csv)!r} is for a DICOM folder without a metadata file, but {root} "
                         f"has {meta.name}: put the texts in its 'text' column, or leave reports_csv out")
    rows = read_metadata_rows(meta)
    # file_name order before any pixel is read (stable: what sorting the records afterwards would give)
    order = sorted(range(len(rows)), key=lambda k: str(rows[k].get("file_name")))

    def items(stream: VolumeStream) -> Iterator[Volume]:
        for k in order:
            vol = _read_row(stream, root, meta, rows[k], k, sp, sh, modality=modality, ct_window=ct_window,
                            mr_percentiles=mr_percentiles)
            stream.done += 1
            if vol is not None:
                yield vol
            del vol  # not held while the next one is read

    return VolumeStream(items, total=len(rows), source=f"{len(rows)} rows", spacing=sp, shape=sh)


def _read_row(stream: VolumeStream, root: Path, meta: Path, row: dict[str, Any], k: int,
              sp: tuple[float, float, float] | None, sh: tuple[int, int, int] | None, *, modality: str | None,
              ct_window: Sequence[float], mr_percentiles: Sequence[float]) -> Volume | None:
    """The prepared volume of metadata row ``k`` (0-based), or ``None`` after recording why it is skipped."""
    name = row.get("file_name")
    try:
        path = resolve_member(root, name, source=meta, row=k + 1)
    except ValueError as exc:
        stream.skip(SkippedFile(str(name), str(exc)), k)
        return None
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
        return prepare_volume(vol, sp, sh)
    except SeriesError as exc:
        stream.skip(SkippedFile(str(name), str(exc)), k)
        return None


def _summary(n: int, skipped: list[SkippedFile], source: str, note: str = "") -> str:
    """"read N volumes from <source>, skipped K (reason xn; ...)<note>"."""
    reasons = Counter(s.reason.split(": ", 1)[-1].split(":")[0] for s in skipped)
    summary = f"read {n} volumes from {source}, skipped {len(skipped)}"
    if reasons:
        summary += " (" + "; ".join(f"{r} x{n}" for r, n in reasons.most_common(5)) + ")"
    return summary + note


def _result(records: list[Volume], skipped: list[SkippedFile], source: str, sp: tuple[float, float, float] | None,
            sh: tuple[int, int, int] | None, note: str = "") -> VolumeIngestResult:
    """The :class:`VolumeIngestResult` of ``records`` (sorted here) with the one-line summary
    "read N volumes from <source>, skipped K (reason xn; ...)<note>"."""
    records.sort(key=lambda v: v.file_name)
    return VolumeIngestResult(records=records, skipped=skipped, spacing=sp, shape=sh,
                              intensity=mapping_description([r.intensity for r in records]),
                              summary=_summary(len(records), skipped, source, note))


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


def _archive_stream(
    root: Path,
    sp: tuple[float, float, float] | None,
    sh: tuple[int, int, int] | None,
    *,
    modality: str | None,
    ct_window: Sequence[float],
    mr_percentiles: Sequence[float],
    reports_csv: str | Path | None,
) -> VolumeStream:
    """Read a DICOM archive without a metadata file: one volume per CT/MR series found under ``root``.

    Every file under ``root`` is looked at (recursively; hidden files and folders skipped) before this
    returns. Files that are not DICOM, and DICOM objects without Pixel Data or Image Position/Orientation
    (Patient) (DICOMDIR, structured reports, ...), are ignored and counted in the summary. Image slices are
    grouped by SeriesInstanceUID, wherever they lie; the stream then reads each series, in name order, with
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
        A stream of the volumes sorted by ``file_name``; it skips series that fail validation (missing
        slices, uneven spacing, mixed orientation...), have a modality other than CT/MR or no report, and
        lists unreadable DICOM files; its summary is "read N volumes from M series, skipped K (...)".

    Raises:
        ValueError: ``root`` holds no DICOM image series, or a reports CSV without the needed columns.
        FileNotFoundError: ``reports_csv`` does not exist.
    """
    key: str | None = None
    reports: dict[str, dict[str, Any]] | None = None
    if reports_csv is not None:
        key, reports = _read_reports(reports_csv)
    csv_path = Path(reports_csv).resolve() if reports_csv is not None else None
    series, scan_skipped, files, ignored = _scan_archive(root, csv_path)
    if not series:
        raise ValueError(f"{root}: no metadata.jsonl or metadata.csv and no DICOM image series found ({files} files "
                         f"looked at, {ignored} not DICOM image slices); expected a metadata file (file_name, text) "
                         "or DICOM series (files with Pixel Data and Image Position/Orientation (Patient))")
    names = _series_names(root, series)
    uids = sorted(series, key=lambda u: names[u])  # name order before any pixel is read

    def items(stream: VolumeStream) -> Iterator[Volume]:
        for uid in uids:
            vol = _read_series(stream, series[uid], names[uid], sp, sh, modality=modality, ct_window=ct_window,
                               mr_percentiles=mr_percentiles, key=key, reports=reports, reports_csv=reports_csv)
            stream.done += 1
            if vol is not None:
                yield vol
            del vol  # not held while the next one is read

    note = f"; ignored {ignored} files that are not DICOM image slices" if ignored else ""
    return VolumeStream(items, total=len(series), source=f"{len(series)} series", spacing=sp, shape=sh,
                        skipped=scan_skipped, note=note)


def _read_series(stream: VolumeStream, s: _Series, name: str, sp: tuple[float, float, float] | None,
                 sh: tuple[int, int, int] | None, *, modality: str | None, ct_window: Sequence[float],
                 mr_percentiles: Sequence[float], key: str | None, reports: dict[str, dict[str, Any]] | None,
                 reports_csv: str | Path | None) -> Volume | None:
    """The prepared volume of series ``s`` (named ``name``), or ``None`` after recording why it is skipped."""

    def skip(reason: str) -> None:
        stream.skip(SkippedFile(name, reason))

    header = s.header
    if header.modality not in ("CT", "MR"):
        skip(f"{name}: Modality {header.modality!r} is not CT or MR")
        return None
    if modality is not None and header.modality != modality:
        skip(f"{name}: the series is {header.modality} but modality={modality!r} was asked")
        return None
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
            skip(f"{name}: no report: {key} {value!r} is not in {Path(reports_csv).name}")  # type: ignore[arg-type]
            return None
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
        skip(str(exc))
        return None
    except Exception as exc:  # noqa: BLE001 - e.g. compressed pixel data without a decoder: report, go on
        skip(f"{name}: unreadable DICOM series: {type(exc).__name__}: {exc}")
        return None
    try:
        return prepare_volume(vol, sp, sh)
    except SeriesError as exc:
        skip(str(exc))
        return None
