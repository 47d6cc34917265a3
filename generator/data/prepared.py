"""Prepared datasets on disk (issue 9, DESIGN.md §9): the format and its reader.

A prepared dataset is a folder written once by :func:`generator.data.preparing.prepare` (``radsynth
prepare``) and read many times by training::

    manifest.json          format, version, resolution, counts, intensity mapping, source fingerprint,
                           data fingerprint, one entry per shard (files, counts, dtype, SHA-256, bytes)
    report.jsonl           the ingest report: one {"path", "reason"} line per skipped file
    shard-00000.npy        (n, R, R) uint8 or uint16 (C order): the images of shard 0
    shard-00000.jsonl      n lines: {"file_name", "text", "attributes", "extra", "intensity"}
    shard-00000.json       the shard's own summary (written last; marks the shard finished)
    ...

Why ``.npy`` shards: a plain numpy array file is readable by anything (``np.load(f, mmap_mode="r")``),
needs no new dependency, keeps the source bit depth (uint8, or uint16 for >8-bit sources), and gives
O(1) random access to image ``i`` with one positional read (``R*R*itemsize`` bytes, no decoding), which
the trainer needs because its batch order comes from (seed, stage, step, rank) generators rather
than from a sequential stream (WebDataset tar shards are read in order; Arrow would add a column
codec for no gain here). The reader uses ``os.pread`` rather than a memory map so that a training
process's resident memory stays flat however many images it touches.

Use (the trainer's API)::

    from generator.data.preparing import prepare          # radsynth prepare
    from generator.data.prepared import PreparedDataset, is_prepared
    from generator.data.augment import Augment

    folder = data if is_prepared(data) else workspace / "prepared"
    if folder != data and not is_prepared(folder):
        prepare(data, folder, resolution=256, workers=4, resume=True)  # continues an interrupted run
    ds = PreparedDataset(folder, resolution=256, augment=Augment(), augment_seed=seed)
    image, text, attributes = ds[i]        # (256, 256) float32 in [0, 1], str, dict
    loader = DataLoader(ds, batch_size=32, sampler=..., num_workers=4, collate_fn=PreparedDataset.collate)
    ds.fingerprint()                       # for radsynth.json / run.json (IngestResult's scheme)
    ds.intensity                           # dataset-level IntensityMapping
    for meta in ds.iter_metadata(): ...    # texts, attributes, patient ids, streamed

Training reads images through one small interface, :class:`TrainingImages` (``len``, ``resolution``,
``fingerprint()``, ``iter_metadata()``, ``read_batch(indices)``, provenance), which
:class:`PreparedDataset` (from disk) and :class:`InMemoryImages` (an ``IngestResult`` already in memory)
both implement; :class:`BatchReader` wraps either as the dataset of a ``torch.utils.data.DataLoader``
whose sampler yields whole batches as ``(indices, augment_seed)`` keys, so the batch order is the
caller's (the trainer's step generators) and loader workers only fetch pixels.

Pixel convention: stored value ``v`` means ``v / 255`` (uint8) or ``v / 65535`` (uint16) in ``[0, 1]``;
the reader returns ``float32`` ``(R, R)`` images in ``[0, 1]`` (DESIGN.md §3.1 convention).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from generator._utils import sha256_file
from generator.data.records import IngestResult, IntensityMapping

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "PROGRESS_NAME", "REPORT_NAME", "HEADER_BYTES",
    "PreparedDataset", "is_prepared", "shard_names", "TrainingImages", "InMemoryImages", "BatchReader", "sha256_file", "npy_header",
    "quantize", "dequantize", "read_json",
]

#: ``format`` field of every manifest.
FORMAT = "radsynth-prepared"
#: Bumped on any change of the layout; a reader refuses other versions.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Written when a preparation starts; it holds the settings that ``--resume`` must match.
PROGRESS_NAME = "progress.json"
REPORT_NAME = "report.jsonl"
#: Every shard's ``.npy`` header takes exactly this many bytes (so the body can be written first).
HEADER_BYTES = 128
_SCALE = {"uint8": 255.0, "uint16": 65535.0}


# ------------------------------------------------------------------------------------------ helpers
def shard_names(index: int) -> tuple[str, str, str]:
    """File names of shard ``index``: (images ``.npy``, metadata ``.jsonl``, summary ``.json``)."""
    stem = f"shard-{index:05d}"
    return f"{stem}.npy", f"{stem}.jsonl", f"{stem}.json"


def npy_header(dtype: str, count: int, resolution: int) -> bytes:
    """An ``.npy`` version 1.0 header of exactly :data:`HEADER_BYTES` bytes for ``(count, R, R)``.

    Raises:
        ValueError: ``dtype`` is not ``"uint8"``/``"uint16"``.
    """
    descr = {"uint8": "|u1", "uint16": "<u2"}.get(dtype)
    if descr is None:
        raise ValueError(f"dtype must be 'uint8' or 'uint16', got {dtype!r}")
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({count}, {resolution}, {resolution}), }}"
    pad = HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f"shape ({count}, {resolution}, {resolution}) does not fit a {HEADER_BYTES}-byte header")
    body = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def _read_npy_header(path: Path) -> tuple[str, tuple[int, ...], int]:
    """(dtype name, shape, data offset) of an ``.npy`` file; ValueError naming the file if malformed."""
    try:
        with open(path, "rb") as f:
            major, _minor = np.lib.format.read_magic(f)
            if major == 1:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npy shard ({exc})") from exc
    if fortran:
        raise ValueError(f"{path}: Fortran-ordered shard, expected C order")
    return np.dtype(dtype).name, tuple(shape), offset


def is_prepared(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a finished prepared dataset (its ``manifest.json``).

    An unfinished preparation (only ``progress.json``) is not; continue it with
    ``prepare(..., resume=True)``.
    """
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_NAME).is_file()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object")
    return data


@dataclass(frozen=True)
class _Shard:
    """One shard as the reader sees it."""

    images: Path
    meta: Path
    count: int
    dtype: str
    offset: int  # byte offset of the pixel data in ``images``


# ------------------------------------------------------------------------------------------- reader
class PreparedDataset:
    """Read a prepared dataset: ``ds[i] -> (image, text, attributes)``, random access, bounded memory.

    Construction validates the manifest (format, version, resolution) and every shard's size and
    ``.npy`` header against it, so a truncated or foreign shard fails here with an error naming the
    file; :meth:`verify` also checks the SHA-256 of every file. The object is picklable and opens
    its files lazily in each process, so it can serve a ``torch.utils.data.DataLoader`` with workers.

    Args:
        path: The prepared folder (written by ``radsynth prepare``).
        resolution: If given, the resolution the caller expects; a folder prepared at another one is
            refused.
        augment: Optional random augmentation (:class:`generator.data.augment.Augment`) applied by
            ``__getitem__``; item ``i`` in epoch ``e`` uses the generator
            ``np.random.default_rng([augment_seed, e, i])``, so it does not depend on worker count.
        augment_seed: Seed of the augmentation draws (0 .. 2**32-1).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no manifest (an unfinished preparation says so), another format or version,
            another resolution, a missing, truncated or malformed shard (naming the file).
    """

    def __init__(self, path: str | Path, *, resolution: int | None = None, augment: Any = None,
                 augment_seed: int = 0) -> None:
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"prepared dataset not found: {root}")
        mpath = root / MANIFEST_NAME
        if not mpath.is_file():
            if (root / PROGRESS_NAME).is_file():
                raise ValueError(f"{root}: preparation did not finish (no {MANIFEST_NAME}); run "
                                 f"'radsynth prepare ... --output {root} --resume' to complete it")
            raise ValueError(f"{root}: not a prepared dataset (no {MANIFEST_NAME})")
        manifest = read_json(mpath, "manifest")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"{mpath}: prepared with format version {manifest.get('version')!r}, this "
                             f"reader reads version {FORMAT_VERSION}; prepare the source again")
        res = manifest.get("resolution")
        if not isinstance(res, int) or res < 1:
            raise ValueError(f"{mpath}: bad resolution {res!r}")
        if resolution is not None and resolution != res:
            raise ValueError(f"{root} was prepared at resolution {res}, but resolution {resolution} was "
                             f"asked for; prepare the source again with --resolution {resolution}")
        if augment is not None and not callable(augment):
            raise ValueError(f"augment must be callable (an Augment), got {type(augment).__name__}")
        if isinstance(augment_seed, bool) or not isinstance(augment_seed, int) or not 0 <= augment_seed < 2**32:
            raise ValueError(f"augment_seed must be an int in [0, 2**32 - 1], got {augment_seed!r}")
        shards: list[_Shard] = []
        for k, entry in enumerate(manifest.get("shards", [])):
            shards.append(self._check_shard(root, mpath, k, entry, res))
        total = sum(s.count for s in shards)
        if total != manifest.get("count"):
            raise ValueError(f"{mpath}: shards hold {total} images, the manifest says {manifest.get('count')!r}")
        self.root = root
        self.manifest = manifest
        self.resolution: int = res
        self.intensity = IntensityMapping.from_dict(manifest["intensity"])
        self.augment = augment
        self.augment_seed = augment_seed
        self.epoch = 0
        self._shards = shards
        self._starts = np.cumsum([0] + [s.count for s in shards]).astype(np.int64)
        self._fds: dict[int, int] = {}
        self._lines: dict[int, np.ndarray] = {}

    @staticmethod
    def _check_shard(root: Path, mpath: Path, k: int, entry: Any, res: int) -> _Shard:
        if not isinstance(entry, dict):
            raise ValueError(f"{mpath}: shard entry {k} is not an object")
        names = shard_names(k)
        if entry.get("images") != names[0] or entry.get("meta") != names[1]:
            raise ValueError(f"{mpath}: shard entry {k} names {entry.get('images')!r}, expected {names[0]!r}")
        count, dtype = entry.get("count"), entry.get("dtype")
        if not isinstance(count, int) or count < 0 or dtype not in _SCALE:
            raise ValueError(f"{mpath}: shard entry {k} has bad count/dtype {count!r}/{dtype!r}")
        for name, size in ((names[0], entry.get("images_bytes")), (names[1], entry.get("meta_bytes"))):
            p = root / name
            if not p.is_file():
                raise ValueError(f"{p}: shard file missing (listed in {mpath})")
            actual = p.stat().st_size
            if actual != size:
                state = "truncated" if isinstance(size, int) and actual < size else "wrong size"
                raise ValueError(f"{p}: {state} shard file: {actual} bytes, the manifest says {size} "
                                 "(prepare again, or run 'radsynth prepare --resume' to rebuild it)")
        images = root / names[0]
        got_dtype, shape, offset = _read_npy_header(images)
        if got_dtype != dtype or shape != (count, res, res):
            raise ValueError(f"{images}: holds {got_dtype} {shape}, the manifest says {dtype} "
                             f"{(count, res, res)}")
        if offset + count * res * res * np.dtype(dtype).itemsize != images.stat().st_size:
            raise ValueError(f"{images}: file size does not match its header {shape}")
        return _Shard(images=images, meta=root / names[1], count=count, dtype=dtype, offset=offset)

    # -------------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        state["_lines"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __del__(self) -> None:  # noqa: D105
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def close(self) -> None:
        """Close the open shard files (they reopen on the next access)."""
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            os.close(fd)

    # -------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: Any) -> tuple[int, int]:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} images")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, i - int(self._starts[k])

    def _fd(self, k: int, which: str) -> int:
        key = 2 * k + (which == "meta")
        fd = self._fds.get(key)
        if fd is None:
            s = self._shards[k]
            fd = os.open(s.meta if which == "meta" else s.images, os.O_RDONLY)
            self._fds[key] = fd
        return fd

    def raw(self, index: int) -> np.ndarray:
        """Stored pixels of image ``index``: ``(R, R)`` uint8 or uint16 (see :attr:`dtype_of`)."""
        k, j = self._locate(index)
        s = self._shards[k]
        itemsize = np.dtype(s.dtype).itemsize
        nbytes = self.resolution * self.resolution * itemsize
        data = os.pread(self._fd(k, "images"), nbytes, s.offset + j * nbytes)
        if len(data) != nbytes:
            raise ValueError(f"{s.images}: truncated while reading image {index}")
        return np.frombuffer(data, dtype=np.dtype(s.dtype).newbyteorder("<")).reshape(
            self.resolution, self.resolution).astype(s.dtype)

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` as ``(R, R)`` float32 in ``[0, 1]`` (no augmentation)."""
        k, _ = self._locate(index)
        return dequantize(self.raw(index), self._shards[k].dtype)

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images ``indices`` (any order, repeats allowed) as ``(B, R, R)`` float32 in ``[0, 1]`` (no
        augmentation): one positional read per image, nothing cached."""
        out = np.empty((len(indices), self.resolution, self.resolution), dtype=np.float32)
        for j, i in enumerate(indices):
            out[j] = self.image(int(i))
        return out

    def metadata(self, index: int) -> dict[str, Any]:
        """Metadata of image ``index``: ``file_name``, ``text``, ``attributes``, ``extra``, ``intensity``."""
        k, j = self._locate(index)
        lines = self._lines.get(k)
        if lines is None:
            lines = self._line_starts(k)
            self._lines[k] = lines
        start, end = int(lines[j]), int(lines[j + 1])
        data = os.pread(self._fd(k, "meta"), end - start, start)
        try:
            meta = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self._shards[k].meta}: line {j + 1} is not valid JSON ({exc})") from exc
        return meta

    def _line_starts(self, k: int) -> np.ndarray:
        s = self._shards[k]
        with open(s.meta, "rb") as f:
            buf = np.frombuffer(f.read(), dtype=np.uint8)
        ends = np.flatnonzero(buf == 10) + 1
        if len(ends) != s.count:
            raise ValueError(f"{s.meta}: {len(ends)} lines, the manifest says {s.count}")
        return np.concatenate([[0], ends]).astype(np.int64)

    def dtype_of(self, index: int) -> str:
        """Stored dtype of image ``index`` (``"uint8"`` or ``"uint16"``)."""
        return self._shards[self._locate(index)[0]].dtype

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch mixed into the augmentation seed (``[augment_seed, epoch, index]``).

        DataLoader workers hold copies of the dataset: call this before each epoch's iterator is
        created, with ``persistent_workers=False`` (the default), so that the workers see it.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    @staticmethod
    def collate(batch: list[tuple[np.ndarray, str, dict[str, Any]]]
                ) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
        """``collate_fn`` for a DataLoader: ``(B, R, R)`` float32 images, texts and attribute dicts as lists
        (attribute keys may differ between records, which the default collate refuses)."""
        images = np.stack([b[0] for b in batch]).astype(np.float32, copy=False)
        return images, [b[1] for b in batch], [b[2] for b in batch]

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, dict[str, Any]]:
        """``(image, text, attributes)``: ``(R, R)`` float32 in ``[0, 1]`` (augmented if asked), the prompt
        text and the attribute dict (``patient_id``, ``modality``, ... as ingested)."""
        image = self.image(index)
        meta = self.metadata(index)
        if self.augment is not None:
            i = int(index) % len(self)
            image = self.augment(image, np.random.default_rng([self.augment_seed, self.epoch, i]))
        return image, meta["text"], meta["attributes"]

    def __iter__(self) -> Iterator[tuple[np.ndarray, str, dict[str, Any]]]:
        for i in range(len(self)):
            yield self[i]

    # -------------------------------------------------------------------------------- provenance
    def fingerprint(self) -> str:
        """SHA-256 over file names, texts and pixels, computed the way ``IngestResult.fingerprint`` is,
        on the ``float32`` images this reader returns (without augmentation); stored at preparation."""
        return str(self.manifest["fingerprint"])

    @property
    def source_fingerprint(self) -> str:
        """Fingerprint of the source (metadata bytes, file names, sizes, mtimes, settings)."""
        return str(self.manifest["source"]["fingerprint"])

    @property
    def source(self) -> str:
        """Kind of the source that was prepared: ``"imagefolder"``, ``"dicom_folder"`` or ``"npz"``."""
        return str(self.manifest["source"]["kind"])

    @property
    def num_skipped(self) -> int:
        """Number of source files (or frames) that preparation skipped (lines of ``report.jsonl``)."""
        return int(self.manifest["report"]["skipped"])

    @property
    def summary(self) -> str:
        """The ingest summary line ("read N images from F files, skipped K (...)")."""
        return str(self.manifest["report"]["summary"])

    def skipped(self) -> Iterator[dict[str, str]]:
        """The skipped files with reasons (``{"path", "reason"}``), streamed from ``report.jsonl``."""
        with open(self.root / REPORT_NAME, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def iter_metadata(self) -> Iterator[dict[str, Any]]:
        """Metadata of every image in order, streamed shard by shard (bounded memory)."""
        for s in self._shards:
            with open(s.meta, "rb") as f:
                for line in f:
                    yield json.loads(line)

    def verify(self) -> None:
        """Check the SHA-256 of every shard file and of the report against the manifest.

        Raises:
            ValueError: a file whose contents changed, naming it.
        """
        files = [(e["images"], e["images_sha256"]) for e in self.manifest["shards"]]
        files += [(e["meta"], e["meta_sha256"]) for e in self.manifest["shards"]]
        files.append((REPORT_NAME, self.manifest["report"]["sha256"]))
        for name, digest in files:
            if sha256_file(self.root / name) != digest:
                raise ValueError(f"{self.root / name}: checksum mismatch (the file changed after "
                                 "preparation); prepare again or run 'radsynth prepare --resume'")

    def __repr__(self) -> str:
        return (f"PreparedDataset({str(self.root)!r}, images={len(self)}, resolution={self.resolution}, "
                f"shards={len(self._shards)})")


# ------------------------------------------------------------------------------ training images
@runtime_checkable
class TrainingImages(Protocol):
    """What the trainer reads: ``len(images)`` square images of side :attr:`resolution`, their texts
    and attributes streamed in index order, a content fingerprint and a batch reader.

    Implemented by :class:`PreparedDataset` (images on disk, flat memory) and :class:`InMemoryImages`.
    """

    resolution: int
    intensity: IntensityMapping

    def __len__(self) -> int: ...

    @property
    def source(self) -> str:
        """Source kind for ``radsynth.json`` (never a path)."""

    @property
    def num_skipped(self) -> int:
        """Source files that were skipped at ingest."""

    def fingerprint(self) -> str:
        """SHA-256 over file names, texts and pixels (``IngestResult.fingerprint``'s scheme)."""

    def iter_metadata(self) -> Iterator[dict[str, Any]]:
        """Per image, in index order: a dict with at least ``file_name``, ``text``, ``attributes``."""

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(B, R, R)`` float32 images in ``[0, 1]`` for ``indices``."""


class InMemoryImages:
    """:class:`TrainingImages` over an :class:`IngestResult` whose records are already in memory.

    Args:
        data: Records loaded with ``load_dataset(..., resolution=resolution)``.
        resolution: Side every image must have.

    Raises:
        ValueError: no records, or a record whose image is not ``(resolution, resolution)``.
    """

    def __init__(self, data: IngestResult, resolution: int) -> None:
        if not data.records:
            raise ValueError("data has no images to train on")
        bad = next((r for r in data.records if np.shape(r.image) != (resolution, resolution)), None)
        if bad is not None:
            raise ValueError(
                f"training images must be {resolution}x{resolution}, but {bad.file_name!r} is "
                f"{'x'.join(map(str, np.shape(bad.image)))}; load the data with resolution={resolution}"
            )
        self.data = data
        self.resolution = resolution
        self.intensity = data.intensity
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.data.records)

    @property
    def source(self) -> str:
        return self.data.source

    @property
    def num_skipped(self) -> int:
        return len(self.data.skipped)

    def fingerprint(self) -> str:
        """``IngestResult.fingerprint()`` (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = self.data.fingerprint()
        return self._fingerprint

    def iter_metadata(self) -> Iterator[dict[str, Any]]:
        for r in self.data.records:
            yield {"file_name": r.file_name, "text": r.text, "attributes": r.attributes}

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        recs = self.data.records
        return np.stack([recs[int(i)].image for i in indices]).astype(np.float32, copy=False)


class BatchReader:
    """Dataset of a ``DataLoader`` that reads whole batches: ``reader[(indices, augment_seed)]``.

    Use it with ``batch_size=None`` and a sampler that yields keys, so the caller decides the order
    and the loader's workers only read (and augment) pixels; results do not depend on the number of
    workers. Picklable whenever ``images`` is (a :class:`PreparedDataset` carries no open files).

    Args:
        images: Where the pixels come from.
        augment: Optional augmentation (an :class:`generator.data.augment.Augment`); image ``j`` of a
            batch with key seed ``s`` uses ``np.random.default_rng([s, j])``.

    Raises:
        ValueError: ``augment`` is not callable.
    """

    def __init__(self, images: TrainingImages, augment: Any = None) -> None:
        if augment is not None and not callable(augment):
            raise ValueError(f"augment must be callable (an Augment), got {type(augment).__name__}")
        self.images, self.augment = images, augment

    def __getitem__(self, key: tuple[Sequence[int], int | None]) -> tuple[np.ndarray, np.ndarray]:
        """``key = (indices, augment_seed)`` -> ``(indices (B,) int64, images (B, R, R) float32 in [0, 1])``.

        Images are augmented when the reader has an ``augment`` and ``augment_seed`` is not ``None``.

        Raises:
            ValueError: ``augment_seed`` outside ``[0, 2**63)``.
        """
        indices, seed = key
        idx = np.asarray(indices, dtype=np.int64)
        images = self.images.read_batch(idx)
        if self.augment is not None and seed is not None:
            if not 0 <= int(seed) < 2**63:
                raise ValueError(f"augment_seed must be in [0, 2**63), got {seed!r}")
            for j in range(len(images)):
                images[j] = self.augment(images[j], np.random.default_rng([int(seed), j]))
        return idx, images

    @staticmethod
    def collate(item: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``collate_fn`` (with ``batch_size=None``): the batch as it is, numpy arrays."""
        return item


def dequantize(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored ``uint8``/``uint16`` pixels (any shape) -> float32 in ``[0, 1]``."""
    return (raw.astype(np.float32) / np.float32(_SCALE[dtype])).astype(np.float32)


def quantize(image: np.ndarray, dtype: str) -> np.ndarray:
    """float pixels in ``[0, 1]`` (any shape) -> ``uint8`` (``round(255 x)``) or ``uint16`` (``round(65535 x)``)."""
    scaled = np.rint(np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * _SCALE[dtype])
    return scaled.astype(dtype)

