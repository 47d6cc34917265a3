"""Synthetic images and volumes as DICOM studies with honest, synthetic headers (DESIGN.md §5).

IODs: Digital X-Ray Image Storage - For Presentation for radiographs (``DX``; ``CR`` input is written
as DX too), CT Image Storage, MR Image Storage, and Secondary Capture (via :mod:`highdicom`) only for
8-bit pictures (``OT``). Every instance carries Synthetic Data = YES, a Contributing Equipment item
with purpose (109100, DCM, "Synthesizing Equipment") naming the software, its version and the model
hash, Image Type DERIVED\\SECONDARY, Burned In Annotation NO, an invented patient (Patient Identity
Removed YES with a De-identification Method saying the identity is invented), the prompt/seed/model in
Image Comments and Derivation Description, and the same provenance as JSON in a private block
(creator ``RadSynth provenance``, group 0011; the JSON as UT, so it is never cut), which is never the
only marker.

Text never exceeds its VR's maximum length (LO 64, SH 16, ST 1024, LT 10240, ...), counted in UTF-8
bytes so that it holds whether a reader counts characters or bytes: a longer value (a long prompt
or model name) is cut to the maximum, ending in ``...``, and counted in
:attr:`DicomExporter.truncated`; the first cut of each attribute is logged as a warning.

Layout under ``out_dir``: one folder per study, named after its first image, holding
``<image stem>.dcm`` per 2D image (each its own series) or ``<volume stem>/IM0001.dcm ...`` per volume
(one series, instance numbers in slice-position order).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, UID
from pydicom.valuerep import DS, MAX_VALUE_LEN

from exporters.files import atomic_write, check_target
from exporters.geometry import AXIAL, Geometry, image_slab, validate_pixel_spacing, volume_slab
from exporters.identity import SyntheticPatient
from exporters.intensity import PixelEncoding
from exporters.provenance import Provenance
from exporters.uids import derive_uid

__all__ = [
    "DicomExporter",
    "SOP_CLASSES",
    "MODALITIES",
    "PRIVATE_CREATOR",
    "TEXT_MAX_LENGTH",
    "write_dataset",
]

logger = logging.getLogger(__name__)

#: Exporter modality -> SOP Class UID of the IOD written.
SOP_CLASSES: dict[str, str] = {
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CR": "1.2.840.10008.5.1.4.1.1.1.1",  # radiographs from CR sources are written as DX too
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "OT": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage (8-bit pictures only)
}
MODALITIES = tuple(SOP_CLASSES)
#: Private creator of the provenance block (group 0011).
PRIVATE_CREATOR = "RadSynth provenance"
#: Body Part Examined -> SNOMED CT code of the Anatomic Region Sequence (CID 4031).
BODY_PARTS = {
    "CHEST": codes.SCT.Chest,
    "ABDOMEN": codes.SCT.Abdomen,
    "PELVIS": codes.SCT.Pelvis,
    "HEAD": codes.SCT.Head,
    "BRAIN": codes.SCT.Brain,
    "KNEE": codes.SCT.Knee,
    "HAND": codes.SCT.Hand,
}
#: Radiograph view -> (View Position, view code from CID 4010).
VIEWS = {
    "PA": ("PA", codes.SCT.PosteroAnterior),
    "AP": ("AP", codes.SCT.AnteroPosterior),
    "LL": ("LL", codes.SCT.LeftLateral),
    "LATERAL": ("LL", codes.SCT.LeftLateral),
    "LAT": ("LL", codes.SCT.LeftLateral),
    "RL": ("RL", codes.SCT.RightLateral),
}
_MANUFACTURER = "RadSynth (synthetic data)"
#: Maximum characters per value of the text VRs that :class:`DicomExporter` cuts (PS3.5 6.2);
#: pydicom's table plus the 2**32 - 2 of UT/UC. Other string VRs over their limit are a bug (ValueError).
TEXT_MAX_LENGTH: dict[str, int] = {
    "LO": MAX_VALUE_LEN["LO"], "SH": MAX_VALUE_LEN["SH"], "ST": MAX_VALUE_LEN["ST"], "LT": MAX_VALUE_LEN["LT"],
    "UT": 2**32 - 2, "UC": 2**32 - 2,
}


def _letters(vec: np.ndarray) -> str:
    """Patient Orientation letters of an LPS direction (dominant components first)."""
    out = ""
    for axis in np.argsort(-np.abs(vec)):
        if abs(vec[axis]) > 1e-3:
            out += ("RL", "AP", "FH")[axis][int(vec[axis] > 0)]
    return out[:3]


def _ds(value: float) -> DS:
    return DS(float(value), auto_format=True)


def _da(day: _dt.date) -> str:
    return day.strftime("%Y%m%d")


def _tm(t: _dt.time) -> str:
    return t.strftime("%H%M%S")


def _text(text: Any) -> str:
    """One line of text without backslashes (the DICOM value separator)."""
    return " ".join(str(text).replace("\\", "/").split())


def _size(text: Any) -> int:
    """Length as stored: UTF-8 bytes (Specific Character Set ISO_IR 192), at least the characters."""
    return len(str(text).encode("utf-8"))


def _cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes, ending in ``...`` (never inside a character)."""
    keep = limit - 3 if limit > 8 else limit
    head = text.encode("utf-8")[:keep].decode("utf-8", errors="ignore")
    return head + "..." if limit > 8 else head


def _code_item(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item


def write_dataset(ds: Dataset, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``ds`` as a DICOM Part 10 file, atomically.

    The file meta (``ds.file_meta``) must already name the SOP class/instance and transfer syntax.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    return atomic_write(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True), overwrite)


@dataclass
class _Study:
    """Study-level state shared by the images of one synthetic patient."""

    key: str | None
    patient: SyntheticPatient
    uid: UID
    folder: str
    items: int = 0


class DicomExporter:
    """Write synthetic 2D images and 3D volumes as DICOM, grouping images into studies.

    Images are added one at a time, as a generator produces them; every ``images_per_study``
    consecutive items (images or volumes) share one invented patient and one study, whose identity
    comes from the first item's seed. Each file is written atomically when its item is added.

    Example:
        >>> exp = DicomExporter("out/dicom", "DX", software_version="0.1.0")  # doctest: +SKIP
        >>> exp.add(image, {"file_name": "0001.png", "text": "PA chest, normal", "seed": 7,
        ...                 "model": "ab12", "attributes": {"sex": "F", "age": 54}})
        [PosixPath('out/dicom/0001/0001.dcm')]

    Args:
        out_dir: Output folder (created if missing).
        modality: ``"DX"``, ``"CR"`` (written as DX), ``"CT"``, ``"MR"`` or ``"OT"`` (Secondary
            Capture of 8-bit pictures).
        images_per_study: Consecutive items per study (>= 1).
        software_name: Name of the synthesizing software (Contributing Equipment Manufacturer).
        software_version: Its version (Software Versions).
        overwrite: Replace existing files; otherwise an existing target raises FileExistsError.
        intensity: Default intensity mapping (dict or object with ``to_dict``) for images whose
            metadata has none; ``None``: :func:`exporters.intensity.default_mapping`.
        pixel_spacing: In-plane spacing of 2D images in mm, one number or ``(row, column)``;
            ``None``: a nominal field of view (430 mm for radiographs, 350 mm CT, 240 mm MR) across
            the image width. Volumes give their own spacing.
        body_part: Body Part Examined (a key of :data:`BODY_PARTS`) or ``None``; radiographs need
            one for the Anatomic Region Sequence, so DX defaults to ``"CHEST"``.

    Attributes:
        truncated: DICOM keyword (``"(gggg,eeee)"`` for private tags) -> number of text values cut
            to their VR's maximum length so far (the first cut of each is logged as a warning).

    Raises:
        ValueError: an argument has an unsupported value.
    """

    def __init__(
        self,
        out_dir: str | Path,
        modality: str = "DX",
        *,
        images_per_study: int = 1,
        software_name: str = "RadSynth",
        software_version: str = "0.0.0",
        overwrite: bool = False,
        intensity: Any = None,
        pixel_spacing: float | Sequence[float] | None = None,
        body_part: str | None = "CHEST",
    ) -> None:
        modality = str(modality).upper()
        if modality not in SOP_CLASSES:
            raise ValueError(f"modality={modality!r}: expected one of {', '.join(MODALITIES)}")
        if isinstance(images_per_study, bool) or not isinstance(images_per_study, int) or images_per_study < 1:
            raise ValueError(f"images_per_study={images_per_study!r}: expected an integer >= 1")
        if not software_name or not software_version:
            raise ValueError(
                f"software_name={software_name!r} and software_version={software_version!r} must be non-empty"
            )
        if body_part is not None and body_part.upper() not in BODY_PARTS:
            raise ValueError(f"body_part={body_part!r}: expected one of {', '.join(BODY_PARTS)} or None")
        pixel_spacing = validate_pixel_spacing(pixel_spacing)
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"out_dir={str(out_dir)!r} exists and is not a folder")
        self.modality = modality
        self.images_per_study = images_per_study
        self.software_name = software_name
        self.software_version = software_version
        self.overwrite = overwrite
        self.default_intensity = intensity
        if intensity is not None:
            PixelEncoding.create(intensity, modality, bits_allocated=8 if modality == "OT" else 16)
        self.pixel_spacing = pixel_spacing
        self.body_part = None if body_part is None else body_part.upper()
        self._study: _Study | None = None
        self._count = 0
        #: DICOM keyword (or private tag) -> number of values cut to their VR's maximum length.
        self.truncated: Counter[str] = Counter()

    # -- public API -----------------------------------------------------------------------------
    def add(self, image: np.ndarray, metadata: Mapping[str, Any]) -> list[Path]:
        """Write one 2D image as one single-instance series.

        Args:
            image: ``(H, W)`` float array in ``[0, 1]`` (0 = black, rows top to bottom), or a
                ``(1, H, W)``/``(H, W, 1)`` array.
            metadata: The image's metadata line (``file_name``, ``text``, ``seed``, ``model``, ...;
                see :class:`exporters.provenance.Provenance`). Its ``intensity`` dict, when present,
                maps pixels back to physical values.

        Returns:
            The written file (one path).

        Raises:
            ValueError: bad image or metadata.
            FileExistsError: the target exists and ``overwrite`` is false.
        """
        prov = Provenance.from_metadata(metadata)
        slab, geometry = image_slab(image, self.modality, prov.attributes.get("view"), self.pixel_spacing)
        return self._write_series(slab, geometry, prov, volume_mode=False)

    def add_volume(
        self,
        volume: np.ndarray,
        metadata: Mapping[str, Any],
        spacing: Sequence[float],
        *,
        orientation: Sequence[float] = AXIAL,
        origin: Sequence[float] | None = None,
    ) -> list[Path]:
        """Write a 3D volume as one CT or MR series with consistent geometry.

        Args:
            volume: ``(slices, rows, columns)`` float array in ``[0, 1]``; see
                :mod:`exporters.geometry` for the index convention.
            metadata: The volume's metadata line (as for :meth:`add`).
            spacing: ``(slice, row, column)`` spacing in mm (slice spacing = slice thickness).
            orientation: Image Orientation (Patient), LPS: row direction then column direction.
            origin: LPS position (mm) of voxel ``(0, 0, 0)``; ``None`` centres the volume at 0.

        Returns:
            The written files, in slice (= instance number) order.

        Raises:
            ValueError: the exporter's modality is not CT or MR, or bad arguments.
            FileExistsError: a target exists and ``overwrite`` is false.
        """
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"volumes need modality 'CT' or 'MR'; this exporter has modality={self.modality!r}")
        arr, geometry = volume_slab(volume, spacing, orientation, origin)
        prov = Provenance.from_metadata(metadata)
        return self._write_series(arr, geometry, prov, volume_mode=True)

    def patient_for(self, metadata: Mapping[str, Any]) -> SyntheticPatient:
        """The invented patient an item with ``metadata`` gets when it starts a study."""
        prov = Provenance.from_metadata(metadata)
        key = prov.identity_key(self.software_name)
        return SyntheticPatient.invent(key, prov.attributes.get("sex"), prov.attributes.get("age"))

    # -- internals ------------------------------------------------------------------------------
    def _fit(self, text: Any, vr: str, name: str) -> str:
        """``text`` as one line, cut to the maximum length of ``vr`` in UTF-8 bytes (counted and logged)."""
        value = _text(text)
        limit = TEXT_MAX_LENGTH[vr]
        if _size(value) <= limit:
            return value
        if not self.truncated[name]:
            logger.warning(
                "DICOM %s (%s) value of %d bytes cut to the VR maximum of %d; further cuts are counted "
                "in DicomExporter.truncated", name, vr, _size(value), limit,
            )
        self.truncated[name] += 1
        # one byte short of the limit: a trailing pad space (odd-length element) then still fits
        # for readers that count it (pydicom does for the last value of a multi-valued element)
        return _cut(value, limit - 1)

    def _fit_lengths(self, ds: Dataset) -> None:
        """Cut every text value of ``ds`` (sequences included) to its VR's maximum length.

        Raises:
            ValueError: a value of another string VR (CS, UI, DS, ...) exceeds its maximum (a bug).
        """
        for elem in ds.iterall():
            vr = elem.VR
            limit = TEXT_MAX_LENGTH.get(vr, MAX_VALUE_LEN.get(vr))
            if limit is None or elem.value is None:
                continue
            values = list(elem.value) if isinstance(elem.value, (MultiValue, list)) else [elem.value]
            if all(_size(v) <= limit for v in values):
                continue
            name = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
            if vr not in TEXT_MAX_LENGTH:
                raise ValueError(f"DICOM {name} ({vr}) value {elem.value!r} exceeds {limit} characters")
            fitted = [self._fit(v, vr, name) if _size(v) > limit else v for v in values]
            elem.value = fitted if len(fitted) > 1 else fitted[0]

    def _next_study(self, prov: Provenance) -> tuple[_Study, int]:
        if self._study is None or self._study.items >= self.images_per_study:
            key = prov.identity_key(self.software_name)
            patient = SyntheticPatient.invent(key, prov.attributes.get("sex"), prov.attributes.get("age"))
            self._study = _Study(key, patient, derive_uid(key, f"{self.modality}/study"), prov.stem)
        self._study.items += 1
        self._count += 1
        return self._study, self._study.items

    def _write_series(
        self, volume: np.ndarray, geometry: Geometry, prov: Provenance, *, volume_mode: bool
    ) -> list[Path]:
        """Validate everything, then write one series (one file per slice, in position order)."""
        encoding = PixelEncoding.create(
            prov.intensity if prov.intensity is not None else self.default_intensity,
            self.modality,
            bits_allocated=8 if self.modality == "OT" else 16,
        )
        stored = encoding.encode(volume)  # validates range and NaNs before any file is touched
        new_study = self._study is None or self._study.items >= self.images_per_study
        folder = self.out_dir / (prov.stem if new_study else self._study.folder)  # type: ignore[union-attr]
        if volume_mode:
            targets = [folder / prov.stem / f"IM{k + 1:04d}.dcm" for k in range(volume.shape[0])]
        else:
            targets = [folder / f"{prov.stem}.dcm"]
        for target in targets:
            check_target(target, self.overwrite)
        study, series_number = self._next_study(prov)
        key = prov.identity_key(self.software_name)
        series_uid = derive_uid(key, f"{self.modality}/series")
        frame_uid = derive_uid(key, f"{self.modality}/frame-of-reference")
        positions = geometry.slice_positions()
        written = []
        for k, target in enumerate(targets):
            ds = self._dataset(
                stored[k], encoding, geometry, positions[k], prov, study, series_uid, frame_uid,
                series_number, instance_number=k + 1, sop_uid=derive_uid(key, f"{self.modality}/instance/{k}"),
            )
            written.append(write_dataset(ds, target, self.overwrite))
        return written

    def _synthesizing_equipment(self, prov: Provenance, when: str) -> Dataset:
        model = f"{self.software_name} model {prov.model or 'unknown'}"
        versions = [self.software_version] + ([f"model {prov.model}"] if prov.model else [])
        return hd.ContributingEquipment(
            manufacturer=self._fit(self.software_name, "LO", "Manufacturer"),
            purpose_of_reference=codes.DCM.SynthesizingEquipment,
            manufacturer_model_name=self._fit(model, "LO", "ManufacturerModelName"),
            software_versions=[self._fit(v, "LO", "SoftwareVersions") for v in versions],
            contribution_datetime=when,
            contribution_description=self._fit(
                prov.summary(f"{self.software_name} {self.software_version}"), "ST", "ContributionDescription"
            ),
        )

    def _dataset(
        self,
        pixels: np.ndarray,
        enc: PixelEncoding,
        geometry: Geometry,
        position: np.ndarray,
        prov: Provenance,
        study: _Study,
        series_uid: UID,
        frame_uid: UID,
        series_number: int,
        *,
        instance_number: int,
        sop_uid: UID,
    ) -> Dataset:
        """One instance of the exporter's IOD (pixels already stored values, (rows, columns))."""
        modality = "DX" if self.modality == "CR" else self.modality
        patient = study.patient
        day, time = _da(patient.study_date), _tm(patient.study_time)
        software = f"{self.software_name} {self.software_version}"
        synth = self._synthesizing_equipment(prov, day + time)
        row_dir, col_dir = geometry.row_direction, geometry.column_direction
        orientation_letters = [_letters(row_dir), _letters(col_dir)]
        if modality == "OT":
            ds = hd.sc.SCImage(
                pixel_array=pixels,
                photometric_interpretation="MONOCHROME2",
                bits_allocated=8,
                coordinate_system="PATIENT",
                study_instance_uid=study.uid,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=sop_uid,
                instance_number=instance_number,
                manufacturer=_MANUFACTURER,
                patient_orientation=tuple(orientation_letters),
            )
            ds.ConversionType = "SYN"
            ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = day, time
            for item in ds.ContributingEquipmentSequence:  # highdicom's own item: make it deterministic
                item.ContributionDateTime = day + time
            ds.ContributingEquipmentSequence.append(synth)
        else:
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.SOPClassUID = SOP_CLASSES[modality]
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = study.uid
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = series_number
            ds.InstanceNumber = instance_number
            ds.Manufacturer = _MANUFACTURER
            ds.ContributingEquipmentSequence = DicomSequence([synth])
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
            ds.BitsAllocated = enc.bits_allocated
            ds.BitsStored = enc.bits_stored
            ds.HighBit = enc.bits_stored - 1
            ds.PixelRepresentation = 0
            ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.ImplementationVersionName = "RADSYNTH"
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["DERIVED", "SECONDARY"] + {"CT": ["AXIAL"], "MR": ["OTHER"]}.get(modality, [])
        ds.InstanceCreationDate, ds.InstanceCreationTime = day, time
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = day
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.AccessionNumber = patient.accession_number
        ds.StudyID = patient.accession_number
        ds.Modality = modality
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "SYNTHETIC study"
        view = prov.attributes.get("view")
        ds.SeriesDescription = self._fit(
            " ".join(str(s) for s in ("SYNTHETIC", modality, view or "") if s), "LO", "SeriesDescription"
        )
        ds.ManufacturerModelName = self._fit(self.software_name, "LO", "ManufacturerModelName")
        ds.SoftwareVersions = self._fit(software, "LO", "SoftwareVersions")
        ds.PatientName = patient.name
        ds.PatientID = patient.patient_id
        ds.PatientBirthDate = "" if patient.birth_date is None else _da(patient.birth_date)
        ds.PatientSex = patient.sex
        if patient.dicom_age:
            ds.PatientAge = patient.dicom_age
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "Synthetic image; invented patient identity"
        ds.PatientComments = f"Synthetic patient invented by {software}; not a real person."
        ds.SyntheticData = "YES"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.ImageComments = self._fit(prov.summary(software), "LT", "ImageComments")
        ds.DerivationDescription = self._fit(
            f"Synthesized by {software} from a text prompt; model {prov.model or 'unknown'}; "
            f"seed {prov.seed if prov.seed is not None else 'unknown'}; prompt: {prov.text}",
            "ST",
            "DerivationDescription",
        )
        ds.WindowCenter = _ds(enc.window_center)
        ds.WindowWidth = _ds(enc.window_width)
        ds.WindowCenterWidthExplanation = "SYNTHETIC model range"
        if self.body_part is not None:
            ds.BodyPartExamined = self.body_part
        if modality == "DX":
            self._dx(ds, enc, geometry, orientation_letters, view)
        elif modality in ("CT", "MR"):
            ds.PatientPosition = "HFS"
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.PixelSpacing = [_ds(geometry.spacing[1]), _ds(geometry.spacing[2])]
            ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceThickness = _ds(geometry.spacing[0])
            ds.SliceLocation = _ds(float(position @ geometry.normal))
            if modality == "CT":
                ds.RescaleIntercept = _ds(enc.intercept)
                ds.RescaleSlope = _ds(enc.slope)
                ds.RescaleType = "HU"
                ds.KVP = None
                ds.AcquisitionNumber = None
            else:
                ds.ScanningSequence = "RM"
                ds.SequenceVariant = "NONE"
                ds.ScanOptions = ""
                ds.MRAcquisitionType = ""
                ds.RepetitionTime = None
                ds.EchoTime = None
                ds.EchoTrainLength = None
        block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "UT", json.dumps(prov.to_json(), ensure_ascii=False, sort_keys=True))
        block.add_new(0x02, "LO", self._fit(prov.model or "unknown", "LO", "(0011,1002)"))
        block.add_new(0x03, "LO", "" if prov.seed is None else str(prov.seed))
        self._fit_lengths(ds)  # the safety net for any other text
        return ds

    def _dx(self, ds: Dataset, enc: PixelEncoding, geometry: Geometry, letters: list[str], view: Any) -> None:
        """Modules of Digital X-Ray Image Storage - For Presentation beyond the common ones."""
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = DicomSequence([_code_item(BODY_PARTS[self.body_part or "CHEST"])])
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1
        ds.RescaleIntercept = _ds(0)
        ds.RescaleSlope = _ds(1)
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.DetectorType = ""
        ds.ImagerPixelSpacing = [_ds(geometry.spacing[1]), _ds(geometry.spacing[2])]
        ds.PatientOrientation = letters
        known = VIEWS.get(str(view or "").strip().upper())
        if known is not None:
            ds.ViewPosition = known[0]
            ds.ViewCodeSequence = DicomSequence([_code_item(known[1])])
            ds.PositionerType = ""
        ds.AcquisitionContextSequence = DicomSequence([])
