"""Write a prepared dataset in one streaming pass (issue 9; format in :mod:`generator.data.prepared`).

:func:`prepare` reads any source that :func:`generator.data.load_dataset` accepts (imagefolder, DICOM
folder + reports CSV, NIfTI, MedMNIST ``.npz``) with the same per-file readers, and writes resized
images at the source bit depth into ``.npy`` shards. Memory stays flat in the number of images:

- The plan (metadata rows, the file list in natural order, reports) lives in a temporary SQLite file
  in the output folder, not in memory; metadata files are read row by row.
- Work is cut into shards of ``shard_size`` source files (``.npz``: images); a worker process reads a
  shard's files and streams its images to disk. At most ``2 * workers`` shards are in flight.
- Shard ``k`` always holds the same files, whichever worker wrote it, so the output is byte for byte
  the same for any ``workers``; the manifest lists shards in order.

Interruptions: a shard is finished when its summary ``shard-K.json`` exists (written last, atomically).
``resume=True`` keeps finished shards whose recorded input digest (file names, sizes, mtimes, metadata
rows, settings) still matches and whose files still match their SHA-256; other shards are rebuilt.

Changes: each file's size and mtime are compared with the plan before and after it is read, and the
whole source (metadata bytes, every file's size and mtime) is checked again at the end; a change is a
:class:`SourceChanged` error naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import sqlite3
import shutil
import sys
import time
import zipfile
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from generator.data import dataset as _ds
from generator.data import readers
from generator.data.metadata import METADATA_NAMES, iter_metadata_rows, resolve_member, split_fragment
from generator.data.prepared import (
    FORMAT, FORMAT_VERSION, HEADER_BYTES, MANIFEST_NAME, PROGRESS_NAME, REPORT_NAME, PreparedDataset,
    dequantize, npy_header, quantize, read_json, sha256_file, shard_names,
)
from generator.data.records import ImageRecord, IntensityMapping
from generator.manifest import atomic_write_bytes

__all__ = ["prepare", "PrepareResult", "SourceChanged", "default_shard_size"]

logger = logging.getLogger(__name__)

_PLAN_NAME = ".plan.sqlite"
_MAX_RESOLUTION = 8192


class SourceChanged(ValueError):
    """The source changed while it was being prepared (the message names the file)."""


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare` wrote.

    Attributes:
        path: The prepared folder.
        count: Images written.
        shards: Number of shards.
        reused: Shards kept from an earlier, interrupted run (``resume=True``).
        skipped: Files skipped (see ``report.jsonl``).
        summary: The ingest summary line.
        fingerprint: Data fingerprint (:meth:`PreparedDataset.fingerprint`).
        seconds: Wall-clock time.
    """

    path: Path
    count: int
    shards: int
    reused: int
    skipped: int
    summary: str
    fingerprint: str
    seconds: float


def default_shard_size(resolution: int) -> int:
    """Source files per shard: about 64 MiB of 16-bit pixels, between 16 and 4096."""
    return int(max(16, min(4096, (64 << 20) // (2 * resolution * resolution))))


# -------------------------------------------------------------------------------------- small parts
def _walk(root: Path) -> Iterator[Path]:
    """The files :func:`generator.data.metadata.walk_files` lists (hidden entries skipped, symlinked
    folders not entered), in no particular order and without holding a folder's listing in memory."""
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if not entry.is_symlink():
                        stack.append(entry.path)
                else:
                    yield Path(entry.path)


def _walk_order(root: Path, path: Path) -> tuple[tuple[int, str], ...]:
    """Sort key giving ``walk_files``' order: a folder's files (by name) before its subfolders."""
    parts = path.relative_to(root).parts
    return tuple((1, d) for d in parts[:-1]) + ((0, parts[-1]),)


_DIGITS = re.compile(r"\d+")


def _sort_key(name: str) -> str:
    """A string whose plain order is natural order: digit runs compare as numbers, before letters."""
    def num(m: re.Match[str]) -> str:
        s = m.group().lstrip("0") or "0"
        return f"\x01{len(s):05d}{s}"
    return _DIGITS.sub(num, name)


def _stat(path: Path) -> tuple[int, int]:
    """(size, mtime_ns), or (-1, -1) for a missing file."""
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def _h(h: Any, *parts: Any) -> None:
    """Feed length-prefixed parts to a hash."""
    for part in parts:
        b = part if isinstance(part, bytes) else str(part).encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)


# --------------------------------------------------------------------------------------------- plan
class _Plan:
    """The source's work list, in a temporary SQLite file (memory stays flat in the number of rows).

    Tables: ``rows`` (imagefolder metadata rows), ``units`` (files in natural order with their size
    and mtime at planning time), ``skips`` (skips found while planning), ``reports`` (DICOM reports).
    """

    def __init__(self, db: Path) -> None:
        db.unlink(missing_ok=True)
        self.db = db
        self.conn = sqlite3.connect(str(db))
        self.conn.executescript("""
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-2048;
            PRAGMA temp_store=FILE;
            CREATE TABLE rows(id INTEGER PRIMARY KEY, rel TEXT, frag TEXT, meta TEXT, line INTEGER,
                              csv INTEGER, row TEXT, key TEXT, UNIQUE(rel, frag));
            CREATE TABLE units(seq INTEGER PRIMARY KEY, rel TEXT UNIQUE, size INTEGER, mtime INTEGER);
            CREATE TABLE files(rel TEXT PRIMARY KEY, key TEXT);
            CREATE TABLE skips(id INTEGER PRIMARY KEY, path TEXT, reason TEXT);
            CREATE TABLE reports(key TEXT PRIMARY KEY, row TEXT);
        """)
        self.kind = ""
        self.root = Path()
        self.n_units = 0
        self.ignored = 0
        self.digests: list[tuple[str, str]] = []  # (file shown in errors, sha256) of metadata/reports
        self.report_key: str | None = None
        self.reports_name: str | None = None
        self.npz: dict[str, Any] = {}

    def skip(self, path: str, reason: str) -> None:
        logger.warning("skipped %s: %s", path, reason)
        self.conn.execute("INSERT INTO skips(path, reason) VALUES (?, ?)", (path, reason))

    def close(self, remove: bool = True) -> None:
        self.conn.close()
        if remove:
            self.db.unlink(missing_ok=True)

    def order_units(self) -> None:
        """Fill ``units`` from ``files`` in natural order, with each file's size and mtime."""
        self.conn.execute("CREATE INDEX files_order ON files(key, rel)")
        cur = self.conn.execute("SELECT rel FROM files ORDER BY key, rel")
        seq = 0
        while batch := cur.fetchmany(4096):
            rows = []
            for (rel,) in batch:
                size, mtime = _stat(self.root / rel)
                rows.append((seq, rel, size, mtime))
                seq += 1
            self.conn.executemany("INSERT INTO units VALUES (?, ?, ?, ?)", rows)
        self.n_units = seq

    def units(self, first: int, last: int) -> list[tuple[int, str, int, int]]:
        return self.conn.execute("SELECT seq, rel, size, mtime FROM units WHERE seq BETWEEN ? AND ? "
                                 "ORDER BY seq", (first, last)).fetchall()

    def rows_of(self, rel: str) -> list[tuple[str, str, int, str]]:
        return self.conn.execute("SELECT frag, meta, csv, row FROM rows WHERE rel = ? ORDER BY id",
                                 (rel,)).fetchall()


def _plan_imagefolder(plan: _Plan, root: Path, metas: list[Path]) -> None:
    root_abs = root.resolve()
    conn = plan.conn
    for meta in metas:
        meta_rel = meta.relative_to(root).as_posix()
        from_csv = int(meta.suffix == ".csv")
        plan.digests.append((str(meta), sha256_file(meta)))
        for i, row in enumerate(iter_metadata_rows(meta), 1):
            name = row.get("file_name")
            base, frag = split_fragment(name.strip()) if isinstance(name, str) else (name, None)
            try:
                target = resolve_member(meta.parent, base, source=meta, row=i)
            except ValueError as exc:
                plan.skip(meta_rel, f"bad metadata row: {exc}")
                continue
            rel = target.relative_to(root_abs).as_posix()
            try:
                conn.execute("INSERT INTO rows(rel, frag, meta, line, csv, row, key) VALUES (?,?,?,?,?,?,?)",
                             (rel, frag or "", meta_rel, i, from_csv, json.dumps(row), _sort_key(rel)))
            except sqlite3.IntegrityError:
                first_meta, first_line = conn.execute(
                    "SELECT meta, line FROM rows WHERE rel = ? AND frag = ?", (rel, frag or "")).fetchone()
                plan.skip(f"{rel}{'#' + frag if frag else ''}",
                          f"duplicate row: {meta_rel} row {i} names the same image as {first_meta} row "
                          f"{first_line} (the first row is used)")
    conn.execute("CREATE INDEX rows_rel ON rows(rel)")
    conn.execute("INSERT INTO files(rel, key) SELECT rel, min(key) FROM rows GROUP BY rel")
    plan.order_units()
    ignored = 0
    for p in _walk(root):
        if p.name.lower().endswith(_ds._IMAGE_ENDINGS):
            rel = p.relative_to(root).as_posix()
            if conn.execute("SELECT 1 FROM units WHERE rel = ?", (rel,)).fetchone() is None:
                ignored += 1
    plan.ignored = ignored


def _plan_dicom(plan: _Plan, root: Path, reports_csv: Path | None) -> None:
    conn = plan.conn
    n_img = ignored = n_dicom = 0
    batch: list[tuple[str, str]] = []
    for p in _walk(root):
        if readers.is_dicom_file(p):
            rel = p.relative_to(root).as_posix()
            batch.append((rel, _sort_key(rel)))
            n_dicom += 1
            if len(batch) >= 4096:
                conn.executemany("INSERT INTO files VALUES (?, ?)", batch)
                batch.clear()
        elif p.name.lower().endswith(_ds._IMAGE_ENDINGS):
            n_img += 1
            ignored += 1
    conn.executemany("INSERT INTO files VALUES (?, ?)", batch)
    if not n_dicom:
        if n_img:
            raise ValueError(
                f"no metadata.jsonl or metadata.csv in {root} ({n_img} image files found): "
                "write one with 'file_name' and 'text' columns (Hugging Face imagefolder)"
            )
        raise ValueError(f"empty dataset: no images and no metadata found in {root}")
    plan.ignored = ignored
    if reports_csv is not None:
        _plan_reports(plan, reports_csv)
    plan.order_units()


def _plan_reports(plan: _Plan, reports_csv: Path) -> None:
    """Reports CSV into the plan (first row per key wins, like ``load_dataset``)."""
    if not reports_csv.is_file():
        raise FileNotFoundError(f"reports_csv not found: {reports_csv}")
    plan.digests.append((str(reports_csv), sha256_file(reports_csv)))
    with open(reports_csv, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        key = next((c for c in ("StudyInstanceUID", "AccessionNumber") if c in columns), None)
        if "text" not in columns or key is None:
            raise ValueError(
                f"{reports_csv}: a reports CSV needs a 'text' column and a 'StudyInstanceUID' or "
                f"'AccessionNumber' column; columns found: {columns}"
            )
        for r in reader:
            row = {(k or "").strip(): v for k, v in r.items() if k is not None}
            k = (row.get(key) or "").strip()
            if k and plan.conn.execute("INSERT OR IGNORE INTO reports VALUES (?, ?)",
                                       (k, json.dumps(row))).rowcount == 0:
                logger.warning("%s: several reports for %s %s; using the first", reports_csv, key, k)
    plan.report_key, plan.reports_name = key, reports_csv.name


class _NpzImages:
    """Stream the images of an ``.npz`` member chunk by chunk (compressed or not)."""

    def __init__(self, path: Path, member: str) -> None:
        self.path, self.member = path, member
        with zipfile.ZipFile(path) as zf, zf.open(member + ".npy") as f:
            major, _ = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            self.shape, self.fortran, self.dtype = reader(f)
        if self.dtype.hasobject:
            raise ValueError(f"{path}: {member} holds Python objects, not pixels")

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """``(n, ...)`` arrays of at most ``size`` images, in order."""
        n = self.shape[0]
        if self.fortran:  # rare: no streaming possible, read the member whole
            arr = np.load(self.path, allow_pickle=False)[self.member]
            for s in range(0, n, size):
                yield np.ascontiguousarray(arr[s:s + size])
            return
        per = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member + ".npy") as f:
            major, _ = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)
            for s in range(0, n, size):
                m = min(size, n - s)
                buf = f.read(m * per)
                if len(buf) != m * per:
                    raise ValueError(f"{self.path}: {self.member} is truncated")
                yield np.frombuffer(buf, dtype=self.dtype).reshape((m,) + tuple(self.shape[1:]))


def _plan_npz(plan: _Plan, path: Path, label_text: Mapping[int, str] | None, split: str) -> None:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    ik, lk = _ds.npz_keys(path, names, split)
    with np.load(path, allow_pickle=False) as z:
        raw_labels = np.asarray(z[lk])
    stream = _NpzImages(path, ik)
    shape = tuple(stream.shape)
    gray_shape = shape[:3] if len(shape) == 4 and shape[-1] in (1, 3) else shape
    labels = _ds.npz_labels(path, split, raw_labels, gray_shape)

    def value_range() -> tuple[float, float]:
        lo, hi = np.inf, -np.inf
        for chunk in stream.chunks(256):
            g = _ds.npz_gray(chunk)
            lo, hi = min(lo, float(g.min())), max(hi, float(g.max()))
        return lo, hi

    texts, mapping, scale = _ds.npz_plan(path, split, labels, label_text, gray_shape, stream.dtype, value_range)
    size, mtime = _stat(path)
    plan.npz = {"path": path, "split": split, "stream": stream, "labels": labels, "texts": texts,
                "mapping": mapping, "scale": scale}
    plan.conn.execute("INSERT INTO units VALUES (0, ?, ?, ?)", (path.name, size, mtime))
    plan.n_units = int(gray_shape[0])


# ------------------------------------------------------------------------------------------- shards
class _ShardWriter:
    """Streams one shard's images and metadata to temporary files, then renames them into place."""

    def __init__(self, out: Path, index: int, resolution: int) -> None:
        self.out, self.index, self.resolution = out, index, resolution
        self.names = shard_names(index)
        self.tmp_img = out / f".{self.names[0]}.tmp"
        self.tmp_meta = out / f".{self.names[1]}.tmp"
        self.f = open(self.tmp_img, "wb")
        self.f.write(b"\0" * HEADER_BYTES)
        self.m = open(self.tmp_meta, "wb")
        self.dtype: str | None = None
        self.count = 0

    def add(self, rec: ImageRecord) -> None:
        wide = rec.intensity is not None and rec.intensity.bits_stored > 8
        if self.dtype is None:
            self.dtype = "uint16" if wide else "uint8"
        elif wide and self.dtype == "uint8":
            self._widen()
        pixels = quantize(rec.image, self.dtype)
        if pixels.shape != (self.resolution, self.resolution):
            raise ValueError(f"{rec.file_name}: image shape {pixels.shape}, expected resolution {self.resolution}")
        self.f.write(pixels.astype("<u2" if self.dtype == "uint16" else "u1").tobytes())
        meta = {"file_name": rec.file_name, "text": rec.text, "attributes": rec.attributes,
                "extra": rec.extra, "intensity": None if rec.intensity is None else rec.intensity.to_dict()}
        self.m.write(json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
        self.count += 1

    def _widen(self) -> None:
        """A >8-bit image after 8-bit ones: rewrite the shard so far as uint16 (``v8 * 257`` is exact)."""
        self.f.close()
        wide = self.out / f".{self.names[0]}.wide.tmp"
        per = self.resolution * self.resolution
        with open(self.tmp_img, "rb") as src, open(wide, "wb") as dst:
            dst.write(src.read(HEADER_BYTES))
            while buf := src.read(256 * per):
                dst.write((np.frombuffer(buf, np.uint8).astype("<u2") * 257).astype("<u2").tobytes())
        os.replace(wide, self.tmp_img)
        self.f = open(self.tmp_img, "r+b")  # not "ab": finish() rewrites the header at offset 0
        self.f.seek(0, os.SEEK_END)
        self.dtype = "uint16"

    def finish(self) -> dict[str, Any]:
        """Write the header, rename into place; returns the shard's manifest entry."""
        dtype = self.dtype or "uint8"
        self.f.seek(0)
        self.f.write(npy_header(dtype, self.count, self.resolution))
        self.f.close()
        self.m.close()
        mode = 0o666 & ~_umask()
        for tmp, name in ((self.tmp_img, self.names[0]), (self.tmp_meta, self.names[1])):
            os.chmod(tmp, mode)
            os.replace(tmp, self.out / name)
        img, meta = self.out / self.names[0], self.out / self.names[1]
        return {"images": self.names[0], "meta": self.names[1], "count": self.count, "dtype": dtype,
                "images_bytes": img.stat().st_size, "images_sha256": sha256_file(img),
                "meta_bytes": meta.stat().st_size, "meta_sha256": sha256_file(meta)}

    def abort(self) -> None:
        for fh in (self.f, self.m):
            fh.close()
        self.tmp_img.unlink(missing_ok=True)
        self.tmp_meta.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _changed(path: Path, planned: tuple[int, int], when: str) -> SourceChanged:
    now = _stat(path)
    what = "appeared" if planned[0] < 0 else "disappeared" if now[0] < 0 else (
        f"size {planned[0]} -> {now[0]} bytes" if now[0] != planned[0] else "modification time changed")
    return SourceChanged(f"{path}: the source changed while it was being prepared ({what}, {when}); "
                         "prepare again once the source is stable")


def _work(job: dict[str, Any]) -> dict[str, Any]:
    """Write shard ``job["index"]`` (runs in a worker process, or in-process for one worker)."""
    out, index, res = Path(job["out"]), job["index"], job["resolution"]
    state = _ds._State(resolution=res)
    writer = _ShardWriter(out, index, res)
    intensities: Counter[str] = Counter()
    try:
        if job["kind"] == "npz":
            for rec in _npz_records(job, state):
                writer.add(rec)
                intensities[json.dumps(rec.intensity.to_dict(), sort_keys=True)] += 1
        else:
            root = Path(job["root"])
            ct = tuple(job["ct_window"])
            conn = sqlite3.connect(f"file:{job['plan']}?mode=ro", uri=True)
            try:
                units = conn.execute("SELECT seq, rel, size, mtime FROM units WHERE seq BETWEEN ? AND ? "
                                     "ORDER BY seq", (job["first"], job["last"])).fetchall()
                for _seq, rel, size, mtime in units:
                    path = root / rel
                    if _stat(path) != (size, mtime):
                        raise _changed(path, (size, mtime), "before reading it")
                    if job["kind"] == "imagefolder":
                        rows = [(frag or None, json.loads(row), bool(from_csv), meta)
                                for frag, meta, from_csv, row in conn.execute(
                                    "SELECT frag, meta, csv, row FROM rows WHERE rel = ? ORDER BY id", (rel,))]
                        gen = _ds.file_records(root, rel, rows, ct, job["nifti_axis"], state)
                    else:
                        report_of = None
                        if job["report_key"] is not None:
                            def report_of(k: str, _c: sqlite3.Connection = conn) -> dict[str, Any] | None:
                                hit = _c.execute("SELECT row FROM reports WHERE key = ?", (k,)).fetchone()
                                return None if hit is None else json.loads(hit[0])
                        gen = _ds.dicom_file_records(root, path, job["report_key"], report_of,
                                                     job["reports_name"], ct, state)
                    # one file's records (a volume at most), in load_dataset's order (stable natural sort)
                    for rec in sorted(gen, key=lambda r: readers.natural_key(r.file_name)):
                        writer.add(rec)
                        intensities[json.dumps(rec.intensity.to_dict(), sort_keys=True)] += 1
                    if _stat(path) != (size, mtime):
                        raise _changed(path, (size, mtime), "while reading it")
            finally:
                conn.close()
        entry = writer.finish()
    except BaseException:
        writer.abort()
        raise
    summary = {"index": index, "digest": job["digest"], **entry, "files_read": state.files_read,
               "skipped": [{"path": s.path, "reason": s.reason} for s in state.skipped],
               "intensities": sorted(intensities.items())}
    atomic_write_bytes(out / shard_names(index)[2], json.dumps(summary, indent=1).encode("utf-8"))
    return summary


def _npz_records(job: dict[str, Any], state: Any) -> Iterator[ImageRecord]:
    path, split = Path(job["npz_path"]), job["npz_split"]
    images = _ds.npz_gray(job["images"])
    mapping = IntensityMapping.from_dict(job["mapping"])
    texts = {int(k): v for k, v in job["texts"].items()}
    for j in range(images.shape[0]):
        rec = state.make(*_ds.npz_record_parts(path, split, job["first"] + j, images[j], int(job["labels"][j]),
                                               texts, mapping, job["scale"]))
        if rec is not None:
            yield rec


# ------------------------------------------------------------------------------------------ prepare
def _settings(resolution: int, shard_size: int, label_text: Mapping[int, str] | None, npz_split: str,
              reports_csv: Path | None, ct_window: tuple[float, float], nifti_axis: int) -> dict[str, Any]:
    return {
        "resolution": resolution, "shard_size": shard_size,
        "ct_window": [float(ct_window[0]), float(ct_window[1])], "nifti_axis": nifti_axis,
        "npz_split": npz_split,
        "label_text": None if label_text is None else {str(int(k)): str(v) for k, v in sorted(label_text.items())},
        "reports_csv": None if reports_csv is None else reports_csv.name,
    }


def _own_files(out: Path) -> list[Path]:
    """Files in ``out`` that a preparation writes (removed by ``overwrite``)."""
    names = {MANIFEST_NAME, PROGRESS_NAME, REPORT_NAME, _PLAN_NAME}
    return [p for p in out.iterdir() if p.is_file() and (
        p.name in names or re.fullmatch(r"shard-\d{5}\.(npy|jsonl|json)", p.name)
        or (p.name.startswith((".shard-", f".{REPORT_NAME}", f".{MANIFEST_NAME}", f".{PROGRESS_NAME}"))
            and p.name.endswith(".tmp")))]


def _check_output(out: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> str:
    """Decide what to do with ``out``; returns ``"new"``, ``"resume"`` or ``"done"``."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other (--resume, --overwrite)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {str(out)!r} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return "new"
    ours = _own_files(out)
    if overwrite:
        for p in ours:
            p.unlink()
        return "new"
    recorded = None
    for name in (MANIFEST_NAME, PROGRESS_NAME):
        if (out / name).is_file():
            data = read_json(out / name, "prepared-dataset file")
            if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
                raise ValueError(f"{out / name}: format {data.get('format')!r} version {data.get('version')!r}, "
                                 f"this RadSynth writes {FORMAT!r} version {FORMAT_VERSION}; use --overwrite "
                                 "to rebuild it")
            recorded = (name, data.get("settings", {}))
            break
    if recorded is None:
        raise FileExistsError(f"output folder {str(out)!r} is not empty and holds no prepared dataset; "
                              "choose an empty or new folder")
    if not resume:
        raise FileExistsError(f"output folder {str(out)!r} already holds a prepared dataset "
                              f"({recorded[0]}); pass --resume to continue or check it, or --overwrite to replace it")
    diff = [k for k in sorted(set(settings) | set(recorded[1])) if settings.get(k) != recorded[1].get(k)]
    if diff:
        shown = ", ".join(f"{k}: {recorded[1].get(k)!r} there, {settings.get(k)!r} asked" for k in diff)
        raise ValueError(f"{out / recorded[0]}: prepared with other settings ({shown}); resuming would mix "
                         "them; use --overwrite to rebuild or another --output")
    return "done" if recorded[0] == MANIFEST_NAME else "resume"


def prepare(
    source: str | Path,
    output: str | Path,
    *,
    resolution: int,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    shard_size: int | None = None,
    label_text: Mapping[int, str] | None = None,
    npz_split: str = "train",
    reports_csv: str | Path | None = None,
    ct_window: tuple[float, float] = (40.0, 400.0),
    nifti_axis: int = 2,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> PrepareResult:
    """Prepare ``source`` into ``output`` in one streaming pass (``radsynth prepare``).

    Every image is read as :func:`generator.data.load_dataset` reads it (same readers, skips and
    reasons), centre-cropped and area-resized to ``(resolution, resolution)``, then stored as uint8
    (``round(255 x)``) or, when its source has more than 8 bits, uint16 (``round(65535 x)``); a shard
    holding both is stored as uint16. Output: see :mod:`generator.data.prepared`.

    Args:
        source: Imagefolder, DICOM folder (with ``reports_csv``) or ``.npz`` file.
        output: Folder to write (created). An existing prepared folder needs ``resume`` or ``overwrite``.
        resolution: Output side in pixels, 4 .. 8192.
        workers: Worker processes (1: in this process). The output does not depend on it.
        resume: Continue an interrupted preparation (finished shards kept when their inputs and
            checksums still match); on a finished one, check it is current and return.
        overwrite: Delete an earlier preparation in ``output`` first.
        shard_size: Source files (``.npz``: images) per shard; default :func:`default_shard_size`.
        label_text, npz_split, reports_csv, ct_window, nifti_axis: As for ``load_dataset``.
        progress: Show a progress bar and print the summary line to stderr.
        on_shard: Called with each shard's index once it is recorded, in order (tests interrupt here).

    Returns:
        A :class:`PrepareResult`.

    Raises:
        FileNotFoundError: ``source`` or ``reports_csv`` does not exist.
        FileExistsError: ``output`` is not empty and neither ``resume`` nor ``overwrite`` says what to do.
        ValueError: bad arguments or source (as ``load_dataset``), no usable image, a prepared folder with
            other settings, or :class:`SourceChanged` naming the file that changed.
    """
    t0 = time.monotonic()
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 4 <= resolution <= _MAX_RESOLUTION:
        raise ValueError(f"resolution must be an int in [4, {_MAX_RESOLUTION}], got {resolution!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
        raise ValueError(f"workers must be an int in [1, 256], got {workers!r}")
    if shard_size is None:
        shard_size = default_shard_size(resolution)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or not 1 <= shard_size <= 1_000_000:
        raise ValueError(f"shard_size must be an int in [1, 1000000], got {shard_size!r}")
    ct = _ds.check_read_options(nifti_axis, ct_window)
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"data path not found: {root}")
    reports = None if reports_csv is None else Path(reports_csv)
    out = Path(output)
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise ValueError(f"output {str(out)!r} must not be inside the source {str(root)!r}")
    settings = _settings(resolution, shard_size, label_text, npz_split, reports, ct, nifti_axis)
    mode = _check_output(out, settings, resume, overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp"):
        stale.unlink()

    plan = _Plan(out / _PLAN_NAME)
    try:
        try:
            _make_plan(plan, root, label_text, npz_split, reports, ct)
        except Exception:
            if created:  # a source refused before any shard was written leaves nothing behind
                plan.close()
                shutil.rmtree(out, ignore_errors=True)
            raise
        source_fp = _source_fingerprint(plan, settings)
        if mode == "done":
            manifest = read_json(out / MANIFEST_NAME, "manifest")
            if manifest.get("source", {}).get("fingerprint") == source_fp:
                ds = PreparedDataset(out, resolution=resolution)
                ds.verify()
                if progress:
                    print(f"radsynth prepare: {out} is already prepared from this source; checked", file=sys.stderr)
                return PrepareResult(out, len(ds), len(manifest["shards"]), len(manifest["shards"]),
                                     int(manifest["report"]["skipped"]), ds.summary, ds.fingerprint(),
                                     time.monotonic() - t0)
            logger.info("%s: the source changed since it was prepared; rebuilding changed shards", out)
        if mode == "new" or not (out / PROGRESS_NAME).is_file():
            atomic_write_bytes(out / PROGRESS_NAME, json.dumps(
                {"format": FORMAT, "version": FORMAT_VERSION, "settings": settings}, indent=1).encode("utf-8"))
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        return _run(plan, root, out, settings, source_fp, workers, shard_size, ct, nifti_axis, progress,
                    on_shard, t0)
    finally:
        plan.close()


def _make_plan(plan: _Plan, root: Path, label_text: Mapping[int, str] | None, npz_split: str,
               reports: Path | None, ct: tuple[float, float]) -> None:
    plan.root = root
    if root.is_file():
        if not root.name.lower().endswith(".npz"):
            raise ValueError(f"path must be a data folder or an .npz file, got the file {root}")
        if reports is not None:
            raise ValueError(f"reports_csv is only used for a DICOM folder, got {str(reports)!r} with {root}")
        plan.kind = "npz"
        _plan_npz(plan, root, label_text, npz_split)
        return
    if label_text is not None:
        raise ValueError(f"label_text is only used for .npz input, but {root} is a folder")
    metas = sorted((p for p in _walk(root) if p.name in METADATA_NAMES), key=lambda p: _walk_order(root, p))
    by_dir: dict[Path, list[Path]] = {}
    for p in metas:
        by_dir.setdefault(p.parent, []).append(p)
    for d, ps in by_dir.items():
        if len(ps) > 1:
            raise ValueError(f"{d} has both {' and '.join(p.name for p in ps)}; keep only one metadata file")
    if metas:
        if reports is not None:
            raise ValueError(f"reports_csv={str(reports)!r} is only used for a DICOM folder without "
                             f"metadata, but {root} has {metas[0].relative_to(root).as_posix()}")
        plan.kind = "imagefolder"
        _plan_imagefolder(plan, root, metas)
    else:
        plan.kind = "dicom_folder"
        _plan_dicom(plan, root, reports)
    plan.conn.commit()


def _source_fingerprint(plan: _Plan, settings: Mapping[str, Any]) -> str:
    """SHA-256 over settings, metadata/report bytes and every source file's name, size and mtime."""
    h = hashlib.sha256(b"radsynth-source-v1")
    _h(h, plan.kind, json.dumps(settings, sort_keys=True))
    for name, digest in plan.digests:
        _h(h, Path(name).name, digest)
    cur = plan.conn.execute("SELECT rel, size, mtime FROM units ORDER BY seq")
    while batch := cur.fetchmany(4096):
        for rel, size, mtime in batch:
            _h(h, rel, size, mtime)
    return h.hexdigest()


def _check_unchanged(plan: _Plan) -> None:
    """Raise :class:`SourceChanged` naming the first file that differs from the plan."""
    for name, digest in plan.digests:
        if not Path(name).is_file() or sha256_file(name) != digest:
            raise SourceChanged(f"{name}: the source changed while it was being prepared (contents "
                                "changed); prepare again once the source is stable")
    base = plan.root.parent if plan.kind == "npz" else plan.root
    cur = plan.conn.execute("SELECT rel, size, mtime FROM units ORDER BY seq")
    while batch := cur.fetchmany(4096):
        for rel, size, mtime in batch:
            if _stat(base / rel) != (size, mtime):
                raise _changed(base / rel, (size, mtime), "found after preparing")


def _shard_digest(plan: _Plan, settings: Mapping[str, Any], first: int, last: int) -> str:
    h = hashlib.sha256(b"radsynth-shard-v1")
    _h(h, plan.kind, json.dumps(settings, sort_keys=True), first, last)
    if plan.kind == "npz":
        for _seq, rel, size, mtime in plan.units(0, 0):
            _h(h, rel, size, mtime)
        return h.hexdigest()
    for _seq, rel, size, mtime in plan.units(first, last):
        _h(h, rel, size, mtime)
        if plan.kind == "imagefolder":
            for frag, meta, from_csv, row in plan.rows_of(rel):
                _h(h, frag, meta, from_csv, row)
    if plan.kind == "dicom_folder" and plan.report_key is not None:
        for name, digest in plan.digests:
            _h(h, Path(name).name, digest)
    return h.hexdigest()


def _finished_shard(out: Path, index: int, digest: str) -> dict[str, Any] | None:
    """The summary of a finished shard whose digest and checksums match, else ``None``."""
    img, meta, summ = (out / n for n in shard_names(index))
    if not summ.is_file():
        return None
    try:
        summary = read_json(summ, "shard summary")
    except ValueError:
        return None
    if summary.get("digest") != digest:
        logger.info("shard %d: its source changed; rebuilding it", index)
        return None
    for path, size, sha in ((img, summary.get("images_bytes"), summary.get("images_sha256")),
                            (meta, summary.get("meta_bytes"), summary.get("meta_sha256"))):
        if not path.is_file() or path.stat().st_size != size or sha256_file(path) != sha:
            logger.warning("%s: damaged (size or checksum differs); rebuilding shard %d", path, index)
            return None
    return summary


def _jobs(plan: _Plan, out: Path, settings: Mapping[str, Any], shard_size: int, ct: tuple[float, float],
          nifti_axis: int) -> Iterator[tuple[int, str, dict[str, Any] | None]]:
    """``(index, digest, job)`` for every shard, in order (an ``.npz`` job gets its pixels in ``_run``)."""
    n_shards = -(-plan.n_units // shard_size) if plan.n_units else 0
    for k in range(n_shards):
        first, last = k * shard_size, min(plan.n_units, (k + 1) * shard_size) - 1
        digest = _shard_digest(plan, settings, first, last)
        job = {"index": k, "digest": digest, "kind": plan.kind, "out": str(out), "root": str(plan.root),
               "resolution": settings["resolution"], "first": first, "last": last, "ct_window": list(ct),
               "nifti_axis": nifti_axis, "plan": str(plan.db), "report_key": plan.report_key,
               "reports_name": plan.reports_name}
        yield k, digest, job


def _run(plan: _Plan, root: Path, out: Path, settings: dict[str, Any], source_fp: str, workers: int,
         shard_size: int, ct: tuple[float, float], nifti_axis: int, progress: bool,
         on_shard: Callable[[int], None] | None, t0: float) -> PrepareResult:
    from tqdm.auto import tqdm

    plan.conn.commit()
    n_shards = -(-plan.n_units // shard_size) if plan.n_units else 0
    for extra in out.glob("shard-*.json"):  # shards beyond the plan (a smaller source) go
        m = re.fullmatch(r"shard-(\d{5})\.json", extra.name)
        if m and int(m.group(1)) >= n_shards:
            for name in shard_names(int(m.group(1))):
                (out / name).unlink(missing_ok=True)
    npz_chunks = plan.npz["stream"].chunks(shard_size) if plan.kind == "npz" else None
    entries: list[dict[str, Any]] = []
    totals = {"files_read": 0, "count": 0, "skipped": 0, "reused": 0}
    categories: Counter[str] = Counter()
    intensities: Counter[str] = Counter()
    bar = tqdm(total=plan.n_units, desc="preparing", unit="file" if plan.kind != "npz" else "img",
               disable=not progress)

    def record(summary: dict[str, Any], reused: bool) -> None:
        k = summary["index"]
        entries.append({key: summary[key] for key in ("images", "meta", "count", "dtype", "images_bytes",
                                                       "images_sha256", "meta_bytes", "meta_sha256")})
        totals["files_read"] += summary["files_read"]
        totals["count"] += summary["count"]
        totals["skipped"] += len(summary["skipped"])
        totals["reused"] += int(reused)
        categories.update(s["reason"].split(":", 1)[0] for s in summary["skipped"])
        intensities.update({m: n for m, n in summary["intensities"]})
        bar.update(min(shard_size, plan.n_units - k * shard_size))
        if on_shard is not None:
            on_shard(k)

    executor = None
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # forkserver: clean workers without re-running a ``python -m`` entry point (spawn would);
        # spawn where there is no forkserver (Windows).
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    pending: deque[tuple[Any, bool]] = deque()
    try:
        for k, digest, job in _jobs(plan, out, settings, shard_size, ct, nifti_axis):
            chunk = next(npz_chunks) if npz_chunks is not None else None
            done = _finished_shard(out, k, digest)
            if done is not None:
                pending.append((done, True))
            else:
                if chunk is not None:
                    npz = plan.npz
                    job.update(npz_path=str(npz["path"]), npz_split=npz["split"], images=chunk,
                               labels=npz["labels"][job["first"]:job["last"] + 1],
                               texts={str(a): b for a, b in npz["texts"].items()},
                               mapping=npz["mapping"].to_dict(), scale=npz["scale"])
                pending.append((executor.submit(_work, job) if executor else _work(job), False))
            while len(pending) > (2 * workers if executor else 0):
                item, reused = pending.popleft()
                record(item if isinstance(item, dict) else item.result(), reused)
        while pending:
            item, reused = pending.popleft()
            record(item if isinstance(item, dict) else item.result(), reused)
    except BaseException:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
            executor = None
        raise
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True)

    _check_unchanged(plan)
    summary_line = _summary(plan, totals, categories)
    logger.info("prepare %s: %s", root, summary_line)
    if progress:
        print(f"radsynth prepare: {summary_line}", file=sys.stderr)
    if not totals["count"]:
        raise ValueError(f"no usable image in {root}: {summary_line}")
    report_sha, n_report = _write_report(plan, out, n_shards)
    intensity = max(intensities.items(), key=lambda kv: (kv[1], kv[0]))[0] if intensities else None
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "resolution": settings["resolution"],
        "count": totals["count"], "settings": settings,
        "source": {"path": str(root), "kind": plan.kind, "fingerprint": source_fp},
        "fingerprint": _data_fingerprint(out, entries, settings["resolution"]),
        "intensity": json.loads(intensity) if intensity else None,
        "intensity_mappings": len(intensities),
        "report": {"summary": summary_line, "files_read": totals["files_read"], "skipped": n_report,
                   "skip_reasons": dict(sorted(categories.items())), "ignored": plan.ignored,
                   "file": REPORT_NAME, "sha256": report_sha},
        "shards": entries,
    }
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    return PrepareResult(out, totals["count"], n_shards, totals["reused"], n_report, summary_line,
                         manifest["fingerprint"], time.monotonic() - t0)


def _summary(plan: _Plan, totals: Mapping[str, int], categories: Counter[str]) -> str:
    """The summary line of ``load_dataset`` ("read N images from F files (kind), skipped K (...)")."""
    for (reason,) in plan.conn.execute("SELECT reason FROM skips ORDER BY id"):
        categories[reason.split(":", 1)[0]] += 1
    n = totals["count"]
    k = sum(categories.values())
    files = 1 if plan.kind == "npz" else totals["files_read"]
    unit = "file" if files == 1 else "files"
    line = f"read {n} image{'s' if n != 1 else ''} from {files} {unit} ({plan.kind}), skipped {k}"
    if k:
        line += " (" + ", ".join(f"{c} {cat}" for cat, c in categories.most_common()) + ")"
    if plan.ignored:
        line += f"; ignored {plan.ignored} image file{'s' if plan.ignored != 1 else ''} not listed in metadata"
    return line


def _write_report(plan: _Plan, out: Path, n_shards: int) -> tuple[str, int]:
    """``report.jsonl``: planning skips, then each shard's skips, in order; streamed, then renamed."""
    tmp = out / f".{REPORT_NAME}.tmp"
    h = hashlib.sha256()
    n = 0
    with open(tmp, "wb") as f:
        def put(path: str, reason: str) -> None:
            nonlocal n
            line = (json.dumps({"path": path, "reason": reason}, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            h.update(line)
            n += 1
        for path, reason in plan.conn.execute("SELECT path, reason FROM skips ORDER BY id"):
            put(path, reason)
        for k in range(n_shards):
            for s in read_json(out / shard_names(k)[2], "shard summary")["skipped"]:
                put(s["path"], s["reason"])
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, out / REPORT_NAME)
    return h.hexdigest(), n


def _data_fingerprint(out: Path, entries: list[dict[str, Any]], resolution: int) -> str:
    """``IngestResult.fingerprint`` computed over the records as :class:`PreparedDataset` returns them."""
    h = hashlib.sha256(b"radsynth-ingest-v1")
    shape = repr((resolution, resolution)).encode("ascii")
    per = resolution * resolution
    for e in entries:
        dtype = np.dtype(e["dtype"]).newbyteorder("<")
        with open(out / e["images"], "rb") as fi, open(out / e["meta"], "rb") as fm:
            fi.seek(HEADER_BYTES)
            left = e["count"]
            while left:
                m = min(max(1, (1 << 20) // per), left)  # about 4 MiB of float32 at a time
                raw = np.frombuffer(fi.read(m * per * dtype.itemsize), dtype=dtype).reshape(m, per)
                pixels = dequantize(raw, e["dtype"]).astype("<f4", copy=False)
                for j in range(m):
                    meta = json.loads(fm.readline())
                    for part in (meta["file_name"].encode("utf-8"), meta["text"].encode("utf-8"), shape,
                                 pixels[j].tobytes()):
                        h.update(len(part).to_bytes(8, "little"))
                        h.update(part)
                left -= m
    return h.hexdigest()
