"""The on-disk store of prepared training volumes (``radsynth train --dims 3 --stream-from-disk``).

A volume store is a folder written once by :func:`write_volume_store` and memory-mapped by training
(:meth:`generator.volumes.training.VolumeTrainingData.from_store`), so that memory does not grow with
the number of volumes::

    volumes.npy      (N, D, H, W) float32 (little-endian, C order) in the model range [0, 1]: exactly
                     the array VolumeTrainingData.from_ingest(load_volumes(...)) holds in memory
    records.jsonl    N lines, in the same order: {"file_name", "text", "patient_id", "attributes",
                     "extra", "intensity"} (the volume's own IntensityMapping)
    store.json       format, version, count, shape, spacing, the training intensity mapping (the first
                     volume's, as from_ingest takes it) and the dataset-level description, the fingerprint,
                     the ingest summary line, the skipped rows/series with reasons, the settings it was
                     written with (source, grid, modality, windows, reports CSV, a signature of the source's
                     files) and the sizes (and the SHA-256 of records.jsonl)

The source is read one volume at a time (:func:`generator.volumes.ingest.iter_volumes`, in the order
``load_volumes`` returns), each volume mapped to ``[0, 1]`` and written into ``volumes.npy`` through a
memory-map window of its own bytes, so at most one volume is in memory. Everything is written into a
hidden temporary folder beside the target (``.NAME.tmp-XXXX``) and renamed into place when complete:
an interrupted write never leaves a partial store under the final name, and :meth:`VolumeStore.open`
refuses the temporary folder.

The fingerprint is :meth:`generator.volumes.records.VolumeIngestResult.fingerprint`'s (SHA-256 over
file names, texts, shapes and model-range voxels, in order), computed as the volumes are written: a model
trained from the store records the same ``data_fingerprint`` as one trained from memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from generator._utils import sha256_file, umask_file_mode
from generator.data.metadata import METADATA_NAMES
from generator.data.records import IntensityMapping, SkippedFile
from generator.volumes.geometry import parse_shape, parse_spacing
from generator.volumes.ingest import iter_volumes
from generator.volumes.records import DEFAULT_CT_WINDOW, DEFAULT_MR_PERCENTILES, Volume, VolumeFingerprint

__all__ = [
    "FORMAT", "FORMAT_VERSION", "STORE_JSON", "VOLUMES_NPY", "RECORDS_JSONL", "PREPARED_VOLUMES_DIR",
    "VolumeStore", "VolumeSetError", "write_volume_store", "store_settings", "source_signature", "is_volume_store",
]

#: ``format`` field of every ``store.json``.
FORMAT = "radsynth-volume-store"
#: Bumped on any change of the layout; :meth:`VolumeStore.open` refuses other versions.
FORMAT_VERSION = 1
STORE_JSON = "store.json"
VOLUMES_NPY = "volumes.npy"
RECORDS_JSONL = "records.jsonl"
#: The store's folder under ``OUTPUT/checkpoints`` for ``radsynth train --dims 3 --stream-from-disk``.
PREPARED_VOLUMES_DIR = "prepared_volumes"
#: Infix of the hidden temporary folder a store is written into (``.NAME.tmp-XXXX``).
_TMP_INFIX = ".tmp-"
#: Voxels per chunk when a whole store is scanned (:meth:`VolumeStore.verify`): 64 MB of float32.
_CHUNK_VOXELS = 1 << 24


class VolumeSetError(ValueError):
    """The source's volumes do not make one training set: none is usable (``kind == "empty"``), or they lie
    on different grids (``kind == "grid"``: spacings or shapes differ; the message is the one
    :meth:`~generator.volumes.training.VolumeTrainingData.from_ingest` gives)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def is_volume_store(path: str | Path) -> bool:
    """True when ``path`` is a folder with a ``store.json`` and is not a store's hidden temporary folder
    (cheap; :meth:`VolumeStore.open` checks the rest)."""
    p = Path(path)
    return p.is_dir() and not _is_temporary(p) and (p / STORE_JSON).is_file()


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and _TMP_INFIX in path.name


def source_signature(source: str | Path, reports_csv: str | Path | None = None) -> dict[str, Any]:
    """What identifies the source's current contents without reading its pixels: the relative path, size
    and modification time (ns) of every file under ``source`` (recursively, hidden ones included, symbolic
    links followed), hashed in sorted order, the SHA-256 of its metadata file's bytes, and the size,
    modification time and SHA-256 of ``reports_csv`` (``{"missing": True}`` when it is not a file).

    Args:
        source: The data folder.
        reports_csv: The reports CSV of a DICOM archive, or ``None``.

    Returns:
        ``{"files": n, "bytes": total, "listing_sha256": hex, "metadata_sha256": {name: hex},
        "reports_csv": {...} or None}`` (JSON-plain).
    """
    root = Path(source)
    h = hashlib.sha256(b"radsynth-volume-source-v1")
    files = total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:  # a broken link: its own entry
                st = path.lstat()
            rel = path.relative_to(root).as_posix()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            files += 1
            total += int(st.st_size)
    metas = {n: sha256_file(root / n) for n in METADATA_NAMES if (root / n).is_file()}
    reports = None
    if reports_csv is not None:
        rp = Path(reports_csv)
        if rp.is_file():
            st = rp.stat()
            reports = {"bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "sha256": sha256_file(rp)}
        else:  # the reader says so when it is needed
            reports = {"missing": True}
    return {"files": files, "bytes": total, "listing_sha256": h.hexdigest(), "metadata_sha256": metas,
            "reports_csv": reports}


def store_settings(
    source: str | Path,
    *,
    spacing: Sequence[float] | float | str | None = None,
    shape: Sequence[int] | int | None = None,
    modality: str | None = None,
    ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
    mr_percentiles: Sequence[float] = DEFAULT_MR_PERCENTILES,
    reports_csv: str | Path | None = None,
) -> dict[str, Any]:
    """The settings a store of ``source`` is written with (``store.json["settings"]``): a store is reused
    (``write_volume_store(..., reuse=True)``) only when they are equal, the source signature included.

    Returns:
        JSON-plain ``{"source", "spacing", "shape", "modality", "ct_window", "mr_percentiles", "reports_csv",
        "signature"}``; paths resolved, spacing and shape parsed.

    Raises:
        ValueError: a bad ``spacing``, ``shape``, ``ct_window`` or ``mr_percentiles`` (named).
    """
    sp = parse_spacing(spacing)
    sh = parse_shape(shape)
    windows = {}
    for name, pair in (("ct_window", ct_window), ("mr_percentiles", mr_percentiles)):
        try:
            windows[name] = [float(v) for v in pair]
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be two numbers (low, high), got {pair!r}") from None
        if len(windows[name]) != 2:
            raise ValueError(f"{name} must be two numbers (low, high), got {pair!r}")
    return _plain({
        "source": str(Path(source).resolve()), "spacing": None if sp is None else list(sp),
        "shape": None if sh is None else list(sh), "modality": modality, **windows,
        "reports_csv": None if reports_csv is None else str(Path(reports_csv).resolve()),
        "signature": source_signature(source, reports_csv),
    })


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples -> lists, numpy scalars -> numbers)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


@dataclass(eq=False)
class VolumeStore:
    """A finished volume store, opened read-only (use :meth:`open`).

    Attributes:
        path: The store folder.
        volumes: ``(N, D, H, W)`` float32 in ``[0, 1]``: a read-only memory map of ``volumes.npy``
            (nothing is read until indexed).
        records: N dicts, in order: ``file_name``, ``text``, ``patient_id``, ``attributes``, ``extra``,
            ``intensity`` (the volume's own mapping as a dict).
        info: ``store.json``.
    """

    path: Path
    volumes: np.ndarray
    records: list[dict[str, Any]]
    info: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> "VolumeStore":
        """Open a store written by :func:`write_volume_store`; ``volumes.npy`` is memory-mapped read-only
        (``np.load(..., mmap_mode="r")``).

        Checks, without reading the voxels: the folder is not a hidden temporary one; ``store.json`` is a
        store description of this format and version; ``records.jsonl`` has its recorded size, SHA-256
        and one line per volume; ``volumes.npy`` is a float32 C-order array of shape ``(count, D, H, W)``
        whose file has exactly the header plus ``count`` volumes of bytes (:meth:`verify` re-reads the
        voxels against the fingerprint).

        Raises:
            ValueError: a missing, damaged or unfinished store; the message names the folder or file and
                the problem.
        """
        root = Path(folder)
        if _is_temporary(root):
            raise ValueError(f"{root}: the hidden temporary folder of a volume store being written (or of an "
                             "interrupted write), never opened as a store; write the store again")
        if not root.is_dir():
            raise ValueError(f"{root}: no volume store here (not a folder)")
        info = _read_info(root / STORE_JSON)
        records = _read_records(root / RECORDS_JSONL, info)
        volumes = _map_volumes(root / VOLUMES_NPY, info, "r")
        return cls(path=root, volumes=volumes, records=records, info=info)

    def memmap(self, mode: str = "r") -> np.ndarray:
        """A fresh memory map of ``volumes.npy``: ``mode`` ``"r"`` (read-only) or ``"c"`` (copy-on-write:
        writable in memory, never written to the file; what training uses, as torch wants writable arrays).

        Raises:
            ValueError: another ``mode``, or the file no longer matches ``store.json``.
        """
        if mode not in ("r", "c"):
            raise ValueError(f"mode must be 'r' or 'c', got {mode!r}")
        return _map_volumes(self.path / VOLUMES_NPY, self.info, mode)

    def __len__(self) -> int:
        return int(self.info["count"])

    @property
    def count(self) -> int:
        """N, the number of volumes."""
        return int(self.info["count"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of every volume."""
        return tuple(int(s) for s in self.info["shape"])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """``(slice, row, column)`` mm of every volume (the first volume's, as ``from_ingest`` takes it)."""
        return tuple(float(s) for s in self.info["spacing"])  # type: ignore[return-value]

    @property
    def intensity(self) -> IntensityMapping:
        """The training mapping from ``[0, 1]`` to physical units (the first volume's, as ``from_ingest``)."""
        return IntensityMapping.from_dict(self.info["intensity"])

    @property
    def intensity_description(self) -> dict[str, Any]:
        """The dataset-level mapping description (``VolumeIngestResult.intensity``)."""
        return dict(self.info["intensity_description"])

    @property
    def texts(self) -> list[str]:
        """The N prompts, in order."""
        return [str(r["text"]) for r in self.records]

    @property
    def fingerprint(self) -> str:
        """``VolumeIngestResult.fingerprint()`` of the stored volumes."""
        return str(self.info["fingerprint"])

    @property
    def summary(self) -> str:
        """The ingest summary line (``VolumeIngestResult.summary``)."""
        return str(self.info["summary"])

    @property
    def skipped(self) -> list[SkippedFile]:
        """Rows, files or series of the source that were skipped, with reasons."""
        return [SkippedFile(str(s["path"]), str(s["reason"])) for s in self.info["skipped"]]

    @property
    def settings(self) -> dict[str, Any]:
        """What the store was written from (:func:`store_settings`)."""
        return dict(self.info["settings"])

    def verify(self) -> None:
        """Re-read every voxel (one volume at a time) and check the values are finite in ``[0, 1]`` and the
        fingerprint is the recorded one.

        Raises:
            ValueError: naming ``volumes.npy`` and what differs.
        """
        path = self.path / VOLUMES_NPY
        h = VolumeFingerprint()
        for rec, vol in zip(self.records, self.volumes):
            if not np.isfinite(vol).all() or vol.min() < 0 or vol.max() > 1:
                raise ValueError(f"{path}: volume {rec['file_name']!r} holds values outside [0, 1]")
            h.add(str(rec["file_name"]), str(rec["text"]), np.asarray(vol))
        if h.hexdigest() != self.fingerprint:
            raise ValueError(f"{path}: the voxels do not match the fingerprint in {STORE_JSON} (the file was changed "
                             "or damaged); write the store again")

    def __repr__(self) -> str:
        return f"VolumeStore({str(self.path)!r}, {self.count} volumes of {self.shape} at {self.spacing} mm)"


def _read_info(path: Path) -> dict[str, Any]:
    """``store.json``, checked; ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path}: missing: {path.parent} is not a complete volume store (an interrupted write "
                         "leaves none under its final name); write the store again")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable volume store description ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path}: not a volume store description (format {FORMAT!r} expected)")
    if info.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: volume store version {info.get('version')!r}, this RadSynth reads version "
                         f"{FORMAT_VERSION}; write the store again")
    need = ("count", "shape", "spacing", "intensity", "intensity_description", "fingerprint", "summary",
            "skipped", "settings", "files")
    missing = [k for k in need if k not in info]
    if missing:
        raise ValueError(f"{path}: damaged volume store description (no {', '.join(missing)})")
    try:
        ok = (int(info["count"]) >= 1 and len(info["shape"]) == 3 and min(int(s) for s in info["shape"]) >= 1
              and len(info["spacing"]) == 3)
        IntensityMapping.from_dict(info["intensity"])
    except (TypeError, ValueError, KeyError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: damaged volume store description (count {info.get('count')!r}, shape "
                         f"{info.get('shape')!r}, spacing {info.get('spacing')!r})")
    return info


def _read_records(path: Path, info: dict[str, Any]) -> list[dict[str, Any]]:
    """``records.jsonl``, checked against ``info``; ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path}: missing: the volume store is incomplete; write it again")
    entry = info["files"].get(RECORDS_JSONL, {}) if isinstance(info["files"], dict) else {}
    size = path.stat().st_size
    if size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
        raise ValueError(f"{path}: damaged ({size} bytes; {STORE_JSON} records {entry.get('bytes')!r} bytes and "
                         "another SHA-256); write the store again")
    records = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {i} is not JSON ({exc})") from None
            if not isinstance(rec, dict) or "file_name" not in rec or "text" not in rec:
                raise ValueError(f"{path}: line {i} is not a volume record (file_name, text)")
            records.append(rec)
    if len(records) != int(info["count"]):
        raise ValueError(f"{path}: {len(records)} records but {STORE_JSON} says {info['count']} volumes")
    return records


def _map_volumes(path: Path, info: dict[str, Any], mode: str) -> np.ndarray:
    """Memory-map ``volumes.npy`` after checking its header and size against ``info``; ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path}: missing: the volume store is incomplete; write it again")
    want = (int(info["count"]), *(int(s) for s in info["shape"]))
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            offset = fh.tell()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npy file ({exc}); write the store again") from None
    if dtype != np.dtype("<f4") or fortran or tuple(shape) != want:
        raise ValueError(f"{path}: holds {dtype} {'Fortran' if fortran else 'C'}-order {tuple(shape)}, but "
                         f"{STORE_JSON} says float32 C-order {want}; write the store again")
    size = path.stat().st_size
    expected = offset + int(np.prod(want)) * 4
    if size != expected:
        what = "truncated" if size < expected else "longer than its array"
        raise ValueError(f"{path}: {what} ({size} bytes, {expected} expected for {want} float32); write the store "
                         "again")
    try:
        arr = np.load(path, mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot be memory-mapped ({exc})") from None
    return arr


class _Writer:
    """Appends model-range volumes to ``volumes.npy`` (sized for ``capacity``, cut to the count at the end) and
    their records to ``records.jsonl`` in ``folder``; checks that all share the first one's grid."""

    def __init__(self, folder: Path, capacity: int) -> None:
        self.folder, self.capacity = folder, max(1, int(capacity))
        self.count = 0
        self.fingerprint = VolumeFingerprint()
        #: The first volume's grid and mapping (what from_ingest takes for the whole set); set by the first add.
        self.shape: tuple[int, int, int] = (0, 0, 0)
        self.spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.intensity: IntensityMapping | None = None
        self._first_name = ""
        self._spacing_key: tuple[float, ...] | None = None
        self._offset = 0
        self._records = open(folder / RECORDS_JSONL, "w", encoding="utf-8")

    def close(self) -> None:
        self._records.close()

    def add(self, vol: Volume) -> None:
        """Write one volume (mapped to ``[0, 1]`` here) as the next entry.

        Raises:
            VolumeSetError: its spacing or shape differs from the first volume's (``from_ingest``'s messages).
        """
        key = tuple(round(s, 4) for s in vol.spacing)
        if self.count == 0:
            self._start(vol)
        elif key != self._spacing_key:
            raise VolumeSetError(
                f"volumes have 2 spacings {sorted({key, self._spacing_key})[:4]} ({vol.file_name!r} differs from "
                f"{self._first_name!r}); load with spacing=", "grid")
        elif vol.shape != self.shape:
            raise VolumeSetError(
                f"records have 2 different shapes {sorted({vol.shape, self.shape})} ({vol.file_name!r} differs "
                f"from {self._first_name!r}); load with shape=(D, H, W)", "grid")
        model = vol.to_model()
        if self.count >= self.capacity:  # never: the stream yields at most its total
            raise ValueError(f"more volumes than the {self.capacity} the source listed")
        window = np.memmap(self.folder / VOLUMES_NPY, dtype="<f4", mode="r+",
                           offset=self._offset + self.count * model.nbytes, shape=self.shape)
        window[...] = model
        del window  # unmapped: the written pages are the page cache's, not this process's (fsync'd in finish)
        self.fingerprint.add(vol.file_name, vol.text, model)
        line = {"file_name": vol.file_name, "text": vol.text, "patient_id": vol.patient_id,
                "attributes": vol.attributes, "extra": vol.extra, "intensity": vol.intensity.to_dict()}
        self._records.write(json.dumps(line, default=_json_default, ensure_ascii=False, sort_keys=True) + "\n")
        self.count += 1

    def _start(self, vol: Volume) -> None:
        """Create ``volumes.npy`` (``capacity`` volumes of the first one's shape; sparse) and note the grid."""
        self.shape, self.spacing, self.intensity = vol.shape, vol.spacing, vol.intensity
        self._spacing_key = tuple(round(s, 4) for s in vol.spacing)
        self._first_name = vol.file_name
        mm = np.lib.format.open_memmap(self.folder / VOLUMES_NPY, mode="w+", dtype="<f4",
                                       shape=(self.capacity, *self.shape))
        self._offset = int(mm.offset)
        del mm

    def finish(self) -> None:
        """Rewrite the header of ``volumes.npy`` for ``count`` (>= 1) volumes and cut the unused tail."""
        self._records.close()
        path = self.folder / VOLUMES_NPY
        header = _npy_header((self.count, *self.shape))
        if len(header) != self._offset:  # numpy leaves room for axis 0 to grow to 21 digits: not expected
            self._rewrite(path)
            return
        with open(path, "r+b") as fh:
            fh.write(header)
            fh.truncate(self._offset + self.count * 4 * int(np.prod(self.shape)))
            fh.flush()
            os.fsync(fh.fileno())

    def _rewrite(self, path: Path) -> None:
        """Copy the ``count`` volumes into a new ``volumes.npy`` one volume at a time (header size changed)."""
        old = path.with_name(VOLUMES_NPY + ".old")
        os.replace(path, old)
        src = np.memmap(old, dtype="<f4", mode="r", offset=self._offset, shape=(self.count, *self.shape))
        dst = np.lib.format.open_memmap(path, mode="w+", dtype="<f4", shape=(self.count, *self.shape))
        for i in range(self.count):
            dst[i] = src[i]
        dst.flush()
        del src, dst
        old.unlink()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The bytes ``open_memmap`` writes before a C-order little-endian float32 array of ``shape``."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished ``tmp`` to ``folder``, replacing an earlier store there."""
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _clean_stale(folder: Path) -> None:
    """Remove hidden temporary folders of earlier, interrupted writes of ``folder`` (one writer per store)."""
    if folder.parent.is_dir():
        for entry in folder.parent.iterdir():
            if entry.name.startswith(f".{folder.name}{_TMP_INFIX}") or entry.name.startswith(f".{folder.name}.old-"):
                shutil.rmtree(entry, ignore_errors=True)


def _reusable(folder: Path, settings: dict[str, Any]) -> VolumeStore | None:
    """The complete store at ``folder`` when it was written with ``settings``, else ``None``."""
    if not is_volume_store(folder):
        return None
    try:
        store = VolumeStore.open(folder)
    except ValueError:
        return None
    return store if store.settings == settings else None


def write_volume_store(
    folder: str | Path,
    source: str | Path,
    *,
    spacing: Sequence[float] | float | str | None = None,
    shape: Sequence[int] | int | None = None,
    modality: str | None = None,
    ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
    mr_percentiles: Sequence[float] = DEFAULT_MR_PERCENTILES,
    reports_csv: str | Path | None = None,
    progress: bool = False,
    reuse: bool = False,
) -> VolumeStore:
    """Write the volumes of ``source`` (as :func:`~generator.volumes.ingest.load_volumes` reads them) into
    a volume store at ``folder``, one volume at a time, and open it.

    The volumes come from :func:`~generator.volumes.ingest.iter_volumes` in ``load_volumes``'s order; each
    is mapped to ``[0, 1]`` (:meth:`Volume.to_model`) and written at once, so memory holds one volume
    whatever their number. All must share one grid, as
    :meth:`~generator.volumes.training.VolumeTrainingData.from_ingest` requires: the first volume fixes the
    spacing and shape, and a later one on another grid raises :class:`VolumeSetError` (the error
    ``from_ingest`` raises for the whole set, here at the first volume that differs, naming both). Nothing
    is then left behind: the store is written into a hidden temporary folder beside ``folder`` and renamed
    into place only when complete (replacing an earlier store there).

    Args:
        folder: The store folder to write (its parent is created).
        source: The data folder: a metadata file with NIfTI files / DICOM series folders, or a DICOM archive.
        spacing, shape, modality, ct_window, mr_percentiles, reports_csv: As ``load_volumes``.
        progress: Show a progress bar (rows or series of the source) on stderr.
        reuse: Return the complete store already at ``folder`` when it was written with the same settings
            (:func:`store_settings`: source path, grid, modality, windows, reports CSV, and the source's file
            listing with sizes and modification times), without reading the source; otherwise write it anew.

    Returns:
        The opened :class:`VolumeStore`.

    Raises:
        VolumeSetError: no usable volume (``"no usable volumes (<summary>)"``), or volumes on different grids.
        ValueError, FileNotFoundError: what ``load_volumes`` raises for the source and arguments.
    """
    folder = Path(folder)
    settings = store_settings(source, spacing=spacing, shape=shape, modality=modality, ct_window=ct_window,
                              mr_percentiles=mr_percentiles, reports_csv=reports_csv)
    if reuse:
        existing = _reusable(folder, settings)
        if existing is not None:
            return existing
    stream = iter_volumes(source, spacing=spacing, shape=shape, modality=modality, ct_window=ct_window,
                          mr_percentiles=mr_percentiles, reports_csv=reports_csv)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_TMP_INFIX}", dir=folder.parent))
    writer: _Writer | None = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        writer = _Writer(tmp, stream.total)
        for vol in _with_progress(stream, progress):
            writer.add(vol)
            del vol  # one volume in memory: not held while the next is read
        if writer.count == 0:
            raise VolumeSetError(f"no usable volumes ({stream.summary})", "empty")
        writer.finish()
        mode = umask_file_mode()
        for name in (VOLUMES_NPY, RECORDS_JSONL):
            os.chmod(tmp / name, mode)
        info = {
            "format": FORMAT, "version": FORMAT_VERSION, "count": writer.count, "shape": list(writer.shape),
            "spacing": list(writer.spacing), "dtype": "float32", "value_range": [0.0, 1.0],
            "intensity": writer.intensity.to_dict(), "intensity_description": stream.intensity,
            "fingerprint": writer.fingerprint.hexdigest(), "summary": stream.summary,
            "skipped": [{"path": s.path, "reason": s.reason} for s in stream.skipped], "settings": settings,
            "files": {VOLUMES_NPY: {"bytes": (tmp / VOLUMES_NPY).stat().st_size},
                      RECORDS_JSONL: {"bytes": (tmp / RECORDS_JSONL).stat().st_size,
                                      "sha256": sha256_file(tmp / RECORDS_JSONL)}},
        }
        (tmp / STORE_JSON).write_text(json.dumps(_plain(info), indent=1, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
        os.chmod(tmp / STORE_JSON, mode)
        _publish(tmp, folder)
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return VolumeStore.open(folder)


def _with_progress(stream: Any, progress: bool) -> Iterator[Volume]:
    """``stream``'s volumes, with a tqdm bar over its rows or series when ``progress``."""
    if not progress:
        yield from stream
        return
    from tqdm.auto import tqdm

    with tqdm(total=stream.total, desc="prepare volumes", unit="vol") as bar:
        for vol in stream:
            bar.update(stream.done - bar.n)
            yield vol
            del vol
        bar.update(stream.done - bar.n)
