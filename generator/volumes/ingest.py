"""Load a folder of volumes for training: an imagefolder whose ``metadata.jsonl`` (or ``.csv``)
``file_name`` names a NIfTI file (``.nii``/``.nii.gz``) or a DICOM series folder.

Each volume is read in the standard layout (:mod:`generator.volumes.records`), resampled to a target
spacing and centre-cropped or padded to the training shape; unusable rows are reported with their
reason and skipped, never fatal alone.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from generator.data.metadata import METADATA_NAMES, read_metadata_rows, resolve_member, split_row
from generator.data.records import SkippedFile
from generator.volumes.geometry import crop_or_pad, parse_shape, parse_spacing, resample
from generator.volumes.readers import NIFTI_SUFFIXES, SeriesError, read_dicom_series, read_nifti
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
) -> VolumeIngestResult:
    """Read every volume listed in ``root``'s metadata file.

    Args:
        root: Folder with ``metadata.jsonl`` or ``metadata.csv`` (columns ``file_name``, ``text``;
            optional ``patient_id``, ``modality``, ``sex``, ``age``, ``findings``, ``label``).
        spacing: Target ``(slice, row, column)`` mm, one number for isotropic, or ``None`` to keep.
        shape: Training shape ``(D, H, W)`` or one side; ``None`` keeps each volume's own.
        modality: ``"CT"`` or ``"MR"`` for every row; ``None`` reads the row's ``modality`` column
            (NIfTI rows without one are CT; DICOM series use their header).
        ct_window: HU range mapped to the model range for CT.
        mr_percentiles: Percentiles of non-zero voxels mapped to the model range for MR.

    Returns:
        Volumes sorted by ``file_name`` and the skipped rows with reasons.

    Raises:
        ValueError: ``root`` has no metadata file, a malformed one, or a bad argument.
    """
    root = Path(root)
    sp = parse_spacing(spacing)
    sh = parse_shape(shape)
    if modality is not None and modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT', 'MR' or None, got {modality!r}")
    metas = [root / n for n in METADATA_NAMES if (root / n).is_file()]
    if not metas:
        raise ValueError(f"{root}: no metadata.jsonl or metadata.csv (file_name, text) found")
    if len(metas) > 1:
        raise ValueError(f"{root} has both metadata.jsonl and metadata.csv; keep only one")
    meta = metas[0]
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
    records.sort(key=lambda v: v.file_name)
    reasons = Counter(s.reason.split(": ", 1)[-1].split(":")[0] for s in skipped)
    summary = f"read {len(records)} volumes from {len(rows)} rows, skipped {len(skipped)}"
    if reasons:
        summary += " (" + "; ".join(f"{r} x{n}" for r, n in reasons.most_common(5)) + ")"
    return VolumeIngestResult(records=records, skipped=skipped, spacing=sp, shape=sh,
                              intensity=mapping_description([r.intensity for r in records]), summary=summary)
