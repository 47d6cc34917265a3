"""Pixel readers behind :func:`generator.data.records.load_dataset` (DESIGN.md §3.1).

Each reader turns one file into one or more 2D frames: ``(H, W)`` ``float32`` arrays in ``[0, 1]``
(0 black, MONOCHROME2 sense, rows top to bottom as displayed) with the :class:`IntensityMapping` that
maps them back to stored or physical values. A reader raises :class:`UnreadableFile` (or lets any
other exception through) when the file cannot be used; the caller reports and skips the file.

Intensity conventions, per source:

- PNG 8 bit / JPEG: ``x = v / 255`` (``low=0, high=255``). PNG 16 bit: ``x = v / 65535``.
  Colour images are converted to luma (ITU-R 601-2, Pillow's ``"L"``). EXIF orientation is applied.
- DICOM: the modality LUT (Rescale Slope/Intercept or Modality LUT Sequence) is applied first, then
  the first VOI window (Window Center/Width) as the plain linear map
  ``x = clip((v - (c - w/2)) / w, 0, 1)`` so that ``low = c - w/2`` and ``high = c + w/2`` are exact
  (this differs from DICOM's "LINEAR" function by at most half a stored unit; SIGMOID windows are
  treated as linear). CT without a window uses the stated ``ct_window`` (HU). A non-linear VOI LUT
  Sequence is applied as given and recorded approximately (``"dicom_voi_lut"``). Without any window,
  the image's own min/max is used (``"dicom_minmax"``). MONOCHROME1 is inverted to MONOCHROME2; its
  mapping keeps ``low < high`` and gets the kind suffix ``"_inverted"`` (the source's value is
  ``low + high - to_physical(x)``). Colour DICOM is converted to luma.
- NIfTI: scaled data (``scl_slope``/``scl_inter`` applied); a volume's own min/max (one mapping for
  all its slices, ``"nifti"``), or the CT window when the metadata says the modality is CT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from generator.data.metadata import parse_age
from generator.data.records import IntensityMapping

#: Bytes at the start of PNG and JPEG files.
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
#: DICOM Basic Directory (DICOMDIR) SOP class: an index, not an image.
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: NIfTI canonical (RAS+) axis index -> fragment letter used in record names.
AXIS_LETTERS = ("x", "y", "z")


class UnreadableFile(Exception):
    """A file that cannot be used; the message is the reason shown to the user."""


@dataclass
class Frame:
    """One 2D image read from a file.

    Attributes:
        suffix: Fragment appended to the file name (``""``, ``"#z=12"``, ``"#frame=3"``).
        image: ``(H, W)`` float32 in ``[0, 1]``.
        intensity: Mapping of ``image`` back to stored/physical values.
    """

    suffix: str
    image: np.ndarray
    intensity: IntensityMapping


@dataclass
class DicomHeader:
    """Header fields of a DICOM file used for text, attributes and report lookup."""

    modality: str = "OT"
    patient_id: str | None = None
    study_uid: str | None = None
    accession: str | None = None
    sex: str | None = None
    age: int | None = None
    view: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def attributes(self) -> dict[str, Any]:
        """Attribute columns (``ATTRIBUTE_KEYS`` subset) that the header provides."""
        out: dict[str, Any] = {}
        if self.patient_id:
            out["patient_id"] = self.patient_id
        out["modality"] = self.modality
        if self.view:
            out["view"] = self.view
        if self.sex:
            out["sex"] = self.sex
        if self.age is not None:
            out["age"] = self.age
        return out

    def text(self) -> str:
        """A short caption built from the header, e.g. ``"CR CSPINE LAT. XR C Spine. Female, 47 years."``."""
        head = " ".join(p for p in (self.modality, self.body_part, self.view) if p)
        parts = [head]
        descs: list[str] = []
        for d in (self.study_description, self.series_description):
            if d and d.lower() not in (x.lower() for x in descs):
                descs.append(d)
        if descs:
            parts.append("; ".join(descs))
        who = []
        if self.sex:
            who.append({"F": "female", "M": "male", "O": "other sex"}.get(self.sex.upper(), self.sex))
        if self.age is not None:
            who.append(f"{self.age} years")
        if who:
            parts.append(", ".join(who))
        text = ". ".join(p for p in parts if p)
        return text[:1].upper() + text[1:] + "." if text else f"{self.modality} image."


def sniff(path: Path) -> str:
    """Guess the format of ``path`` from its name and first bytes.

    Returns:
        One of ``"png"``, ``"jpeg"``, ``"dicom"``, ``"nifti"``, ``"unknown"``.
    """
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".dcm", ".dicom", ".ima")):
        return "dicom"
    if name.endswith(".png"):
        return "png"
    if name.endswith((".jpg", ".jpeg")):
        return "jpeg"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return "unknown"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    return "unknown"


def is_dicom_file(path: Path) -> bool:
    """True for files named ``*.dcm``/``*.dicom``/``*.ima`` or with the ``DICM`` preamble marker."""
    return path.name != "DICOMDIR" and sniff(path) == "dicom"


# ----------------------------------------------------------------------------------------- PNG/JPEG
def read_raster(path: Path, fmt: str, modality: str = "OT") -> list[Frame]:
    """Read a PNG (8/16 bit) or JPEG file.

    Args:
        path: The file.
        fmt: ``"png"`` or ``"jpeg"`` (from :func:`sniff`); the file's bytes must agree.
        modality: Modality recorded in the mapping.

    Returns:
        One frame, ``(H, W)`` float32 in ``[0, 1]``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    with open(path, "rb") as f:
        head = f.read(8)
    if fmt == "png" and not head.startswith(_PNG_MAGIC):
        raise UnreadableFile("not a PNG file (bad signature)")
    if fmt == "jpeg" and not head.startswith(_JPEG_MAGIC):
        raise UnreadableFile("not a JPEG file (bad signature)")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode.startswith("I;16") or mode in ("I", "I;32"):
                arr = np.asarray(im).astype(np.float64)
                if arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise UnreadableFile(f"integer image values outside 0..65535 (mode {mode})")
                bits, high = 16, 65535.0
            elif mode == "F":
                raise UnreadableFile("floating-point raster images are not supported")
            else:
                if mode != "L":
                    im = im.convert("L")
                arr = np.asarray(im).astype(np.float64)
                bits, high = 8, 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableFile(f"cannot decode image: {exc}") from exc
    if arr.ndim != 2 or arr.size == 0:
        raise UnreadableFile(f"unexpected image shape {arr.shape}")
    kind = "jpeg" if fmt == "jpeg" else f"png{bits}"
    mapping = IntensityMapping(kind=kind, low=0.0, high=high, unit="", bits_stored=bits, modality=modality)
    return [Frame("", (arr / high).astype(np.float32), mapping)]


# -------------------------------------------------------------------------------------------- DICOM
def _first(value: Any) -> float | None:
    """First value of a possibly multi-valued DICOM number, or ``None``."""
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0] if len(value) else None
        return None if value is None else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _str(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def read_dicom_header(ds: Any, default_modality: str = "OT") -> DicomHeader:
    """Collect the header fields RadSynth uses from a pydicom ``Dataset``."""
    sex = _str(ds, "PatientSex")
    return DicomHeader(
        modality=(_str(ds, "Modality") or default_modality).upper(),
        patient_id=_str(ds, "PatientID"),
        study_uid=_str(ds, "StudyInstanceUID"),
        accession=_str(ds, "AccessionNumber"),
        sex=sex.upper() if sex else None,
        age=parse_age(_str(ds, "PatientAge")),
        view=_str(ds, "ViewPosition"),
        body_part=_str(ds, "BodyPartExamined"),
        study_description=_str(ds, "StudyDescription"),
        series_description=_str(ds, "SeriesDescription"),
    )


def _lut_item(ds: Any, keyword: str, group: str) -> Any:
    """``ds`` if it has ``keyword`` at top level, else the Shared Functional Groups item holding it."""
    if keyword in ds:
        return ds
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(group)
        if seq and keyword in seq[0]:
            return seq[0]
    return None


def _window_frame(values: np.ndarray, ds: Any, modality: str, ct_window: tuple[float, float],
                  bits: int, unit: str) -> tuple[np.ndarray, IntensityMapping]:
    """Apply the VOI step to modality-LUT output ``values`` (any shape); returns ``[0, 1]`` and mapping."""
    win_src = _lut_item(ds, "WindowCenter", "FrameVOILUTSequence")
    centre = width = None
    if win_src is not None:
        centre, width = _first(win_src.get("WindowCenter")), _first(win_src.get("WindowWidth"))
    if centre is not None and width is not None and width > 0:
        low, high = centre - width / 2.0, centre + width / 2.0
        kind = "dicom_voi"
    elif modality == "CT":
        centre, width = ct_window
        low, high = centre - width / 2.0, centre + width / 2.0
        kind, unit = "ct_window", "HU"
    elif ds.get("VOILUTSequence"):
        from pydicom.pixels import apply_voi

        item = ds.VOILUTSequence[0]
        n_entries, first_map, depth = (int(v) for v in item.LUTDescriptor)
        n_entries = n_entries or 65536
        out = apply_voi(values, ds).astype(np.float64) / float(2**depth - 1)
        mapping = IntensityMapping("dicom_voi_lut", float(first_map), float(first_map + n_entries - 1),
                                   unit, bits, modality)
        return np.clip(out, 0.0, 1.0), mapping
    else:
        low, high = float(np.min(values)), float(np.max(values))
        if high <= low:
            high = low + 1.0
        kind = "dicom_minmax"
    x = np.clip((values - low) / (high - low), 0.0, 1.0)
    return x, IntensityMapping(kind, float(low), float(high), unit, bits, modality)


def read_dicom(
    path: Path,
    ct_window: tuple[float, float] = (40.0, 400.0),
    default_modality: str = "OT",
) -> tuple[list[Frame], DicomHeader]:
    """Read a DICOM image (single or multi-frame) into display-ready frames.

    Args:
        path: The DICOM file (Part 10, or a bare data set).
        ct_window: ``(centre, width)`` HU used for CT without a VOI window.
        default_modality: Modality used when the header has none (e.g. from a metadata column).

    Returns:
        Frames (one per DICOM frame; multi-frame suffixes ``"#frame=1"``... counting from 1 like
        DICOM frame numbers) and the header fields.

    Raises:
        UnreadableFile: not DICOM, no pixel data, or pixel data that cannot be decoded here.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise UnreadableFile(f"not a readable DICOM file: {exc}") from exc
    if str(ds.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
        raise UnreadableFile("DICOMDIR index, not an image")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UnreadableFile("DICOM file without pixel data (not an image or not DICOM)")
    header = read_dicom_header(ds, default_modality)
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    pd_logger = logging.getLogger("pydicom")
    level = pd_logger.level
    pd_logger.setLevel(logging.CRITICAL)  # pydicom logs a traceback per failed plugin; we report once
    try:
        raw = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a reason to skip
        detail = " ".join(str(exc).split()) or type(exc).__name__
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        ts = f"transfer syntax {tsyntax.name} ({tsyntax})" if tsyntax is not None else "pixel data"
        hint = " (a decoder plugin such as pylibjpeg or python-gdcm may help)" if (
            tsyntax is not None and tsyntax.is_compressed) else ""
        raise UnreadableFile(f"cannot decode {ts}{hint}: {detail}") from exc
    finally:
        pd_logger.setLevel(level)

    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames_n = int(ds.get("NumberOfFrames", 1) or 1)
    arr = np.asarray(raw)
    if spp == 1:
        arr = arr.reshape((frames_n,) + arr.shape[-2:]) if arr.ndim in (2, 3) else arr
    elif arr.ndim in (3, 4) and arr.shape[-1] == spp:
        arr = arr.reshape((frames_n,) + arr.shape[-3:])
    else:
        raise UnreadableFile(f"unexpected pixel array shape {arr.shape} for {spp} samples per pixel")

    bits = int(ds.get("BitsStored", 8) or 8)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR" and "RedPaletteColorLookupTableData" not in ds:
        raise UnreadableFile("PALETTE COLOR image without a palette colour lookup table")
    if spp == 1 and photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"):
        raise UnreadableFile(f"{spp} sample per pixel but PhotometricInterpretation {photometric!r}")
    rescale_type = _str(ds, "RescaleType")
    if header.modality == "CT":
        unit = "HU"
    else:
        unit = rescale_type if rescale_type and rescale_type != "US" else ""

    out: list[Frame] = []
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = np.asarray(apply_color_lut(arr, ds))  # (frames, H, W, 3) on the table's scale
        except Exception as exc:  # noqa: BLE001 - a malformed table is a reason to skip
            raise UnreadableFile(f"PALETTE COLOR lookup table cannot be applied: {exc}") from exc
        bits = int(np.iinfo(arr.dtype).bits) if arr.dtype.kind in "ui" else bits
        spp = 3
    if spp != 1:
        # Colour: pydicom already returns RGB for YBR; convert to luma on the stored scale.
        full = float(2**bits - 1)
        luma = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        mapping = IntensityMapping("dicom_rgb", 0.0, full, "", bits, header.modality)
        for i in range(frames_n):
            suffix = f"#frame={i + 1}" if frames_n > 1 else ""
            out.append(Frame(suffix, np.clip(luma[i] / full, 0, 1).astype(np.float32), mapping))
        return out, header

    src = _lut_item(ds, "RescaleSlope", "PixelValueTransformationSequence")
    if src is not None and "RescaleSlope" in src:
        slope = _first(src.get("RescaleSlope"))
        if slope is None or not np.isfinite(slope) or slope == 0:
            raise UnreadableFile(f"RescaleSlope {src.get('RescaleSlope')!r} would map every pixel to one "
                                 "value (it must be a non-zero number)")
    for i in range(frames_n):
        frame = arr[i]
        if src is ds or src is None:
            values = np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)
        else:
            slope = float(src.get("RescaleSlope", 1) or 1)
            intercept = float(src.get("RescaleIntercept", 0) or 0)
            values = frame.astype(np.float64) * slope + intercept
        x, mapping = _window_frame(values, ds, header.modality, ct_window, bits, unit)
        if photometric == "MONOCHROME1":
            # Shown as MONOCHROME2 from here on. The mapping keeps low < high (what exporters,
            # which write MONOCHROME2, need to display the same picture); the kind says that the
            # source's stored values ran the other way: source value = low + high - to_physical(x).
            x = 1.0 - x
            mapping = replace(mapping, kind=mapping.kind + "_inverted")
        suffix = f"#frame={i + 1}" if frames_n > 1 else ""
        out.append(Frame(suffix, x.astype(np.float32), mapping))
    return out, header


# -------------------------------------------------------------------------------------------- NIfTI
def nifti_display(slice2d: np.ndarray) -> np.ndarray:
    """Orient a slice of an RAS+ volume for display (radiological convention).

    ``slice2d`` keeps the two remaining canonical axes in order ((x, y) for axial, (x, z) for
    coronal, (y, z) for sagittal). Both axes are reversed and the result transposed, so that the
    image's left is patient right (axial, coronal) or anterior (sagittal), and its top is anterior
    (axial) or superior (coronal, sagittal).

    Returns:
        ``(H, W)`` array, the same dtype.
    """
    return np.ascontiguousarray(slice2d[::-1, ::-1].T)


def read_nifti(
    path: Path,
    axis: int = 2,
    modality: str = "OT",
    ct_window: tuple[float, float] = (40.0, 400.0),
) -> list[Frame]:
    """Read a 2D NIfTI image or slice a 3D volume.

    The image is first reoriented to the closest canonical RAS+ orientation
    (``nibabel.as_closest_canonical``), so ``axis`` 0, 1, 2 means sagittal, coronal, axial slices
    whatever the stored voxel order; slices are named ``#x=i``, ``#y=i``, ``#z=i`` by canonical
    index (RAS+ indices increase towards patient Right, Anterior, Superior, so ``#z=0`` is the
    most inferior axial slice). A volume with exactly one singleton axis is a 2D
    image (no suffix), whatever ``axis`` says. Every slice is displayed with :func:`nifti_display`.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        axis: Canonical axis to slice along (0, 1 or 2).
        modality: ``"CT"`` applies ``ct_window`` (HU); otherwise the volume's min/max is used.
        ct_window: ``(centre, width)`` in HU.

    Returns:
        Frames, ``(H, W)`` float32 in ``[0, 1]``, one mapping shared by all slices.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if len(img.shape) == 2:
            img = nib.Nifti1Image(np.asarray(img.dataobj)[:, :, None], img.affine, img.header)
        while len(img.shape) > 3 and img.shape[-1] == 1:
            img = img.slicer[..., 0]
        if len(img.shape) != 3:
            raise UnreadableFile(f"NIfTI with shape {img.shape} is not supported (2D or 3D only)")
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float64)
    except UnreadableFile:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise UnreadableFile(f"not a readable NIfTI file: {exc}") from exc
    if not np.all(np.isfinite(data)):
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)

    if modality == "CT":
        c, w = ct_window
        low, high, kind, unit = c - w / 2.0, c + w / 2.0, "ct_window", "HU"
    else:
        low, high, kind, unit = float(data.min()), float(data.max()), "nifti", ""
        if high <= low:
            high = low + 1.0
    mapping = IntensityMapping(kind, float(low), float(high), unit, _nifti_bits(img), modality)
    scaled = np.clip((data - low) / (high - low), 0.0, 1.0).astype(np.float32)

    singleton = [a for a, n in enumerate(scaled.shape) if n == 1]
    if len(singleton) == 1:
        return [Frame("", nifti_display(np.take(scaled, 0, axis=singleton[0])), mapping)]
    if singleton:
        raise UnreadableFile(f"NIfTI with shape {scaled.shape} has no 2D image plane")
    if axis not in (0, 1, 2):
        raise ValueError(f"nifti_axis must be 0, 1 or 2, got {axis!r}")
    letter = AXIS_LETTERS[axis]
    return [
        Frame(f"#{letter}={k}", nifti_display(np.take(scaled, k, axis=axis)), mapping)
        for k in range(scaled.shape[axis])
    ]


def _nifti_bits(img: Any) -> int:
    """Bit depth for the mapping: 8 for 8-bit integer NIfTI, else 16 (the most exporters store)."""
    try:
        return 8 if np.dtype(img.get_data_dtype()).itemsize == 1 else 16
    except Exception:  # noqa: BLE001
        return 16


def area_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``(resolution, resolution)``.

    The square is the largest centred one (odd leftovers drop the extra row/column at the bottom or
    right). Shrinking averages over each output pixel's footprint (Pillow ``BOX``, exact area
    averaging); enlarging interpolates bilinearly. Computed in float32 (Pillow mode ``"F"``), so no
    precision is lost to 8-bit rounding.

    Args:
        image: ``(H, W)`` float32 in ``[0, 1]``.
        resolution: Output side length, >= 1.

    Returns:
        ``(resolution, resolution)`` float32 in ``[0, 1]``.
    """
    from PIL import Image

    h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = np.ascontiguousarray(image[top:top + side, left:left + side], dtype=np.float32)
    if side == resolution:
        return crop
    method = Image.Resampling.BOX if side > resolution else Image.Resampling.BILINEAR
    out = Image.fromarray(crop).resize((resolution, resolution), resample=method)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers (``#z=2`` before ``#z=10``), then the raw name."""
    import re

    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts), name
