"""Tests for prepared datasets (issue 9): generator.data.preparing / prepared / augment, radsynth prepare.

Tiny real files (<= 40 px) under fixed seeds; every test compares against ``load_dataset`` or an
uninterrupted run, byte for byte where the contract says so.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generator.data import IngestResult, load_dataset
from generator.data.augment import Augment
from generator.data.prepared import MANIFEST_NAME, PROGRESS_NAME, PreparedDataset
from generator.data.preparing import SourceChanged, prepare
from generator.data.records import ImageRecord


def _folder(root: Path, n: int = 11, size: int = 20, seed: int = 0, sixteen: tuple[int, ...] = ()) -> Path:
    """An imagefolder of ``n`` random PNGs (8 bit; 16 bit for indices in ``sixteen``), odd sizes
    included, two images per patient, one corrupt file and one row without a file."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        h, w = size + (i % 3), size + 2 * (i % 2)
        if i in sixteen:
            Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(root / f"img{i}.png")
        else:
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(root / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"study {i}", "patient_id": f"p{i // 2}",
                     "sex": "F" if i % 2 else "M", "age": 30 + i, "extra_col": i})
    (root / "bad.png").write_bytes(rng.bytes(200))
    rows.append({"file_name": "bad.png", "text": "corrupt"})
    rows.append({"file_name": "gone.png", "text": "missing"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return _folder(tmp_path / "src")


# --------------------------------------------------------------------------------- same as ingest
def test_prepared_matches_load_dataset(src: Path, tmp_path: Path) -> None:
    result = prepare(src, tmp_path / "out", resolution=16, shard_size=4, progress=False)
    ds = PreparedDataset(tmp_path / "out", resolution=16)
    ingest = load_dataset(src, resolution=16, progress=False)
    assert len(ds) == len(ingest.records) == result.count == 11
    assert result.shards == 4  # 13 listed files (two unusable) in shards of 4
    assert ds.summary == ingest.summary == result.summary
    assert [(s["path"], s["reason"]) for s in ds.skipped()] == [(k.path, k.reason) for k in ingest.skipped]
    for i, rec in enumerate(ingest.records):
        image, text, attributes = ds[i]
        meta = ds.metadata(i)
        assert image.dtype == np.float32 and image.shape == (16, 16)
        assert (meta["file_name"], text, attributes) == (rec.file_name, rec.text, rec.attributes)
        assert meta["extra"] == rec.extra
        assert attributes["patient_id"] == rec.patient_id
        assert np.abs(image - rec.image).max() <= 0.5 / 255 + 1e-6  # uint8 quantisation only
        assert ds.dtype_of(i) == "uint8"
    assert ds.intensity == ingest.intensity
    # the fingerprint is IngestResult's scheme over the images the reader returns
    again = IngestResult(root=src, records=[ImageRecord(m["file_name"], m["text"], ds.image(i))
                                            for i, m in enumerate(ds.iter_metadata())],
                         skipped=[], intensity=ds.intensity, source="imagefolder")
    assert ds.fingerprint() == again.fingerprint() == result.fingerprint
    assert ds[-1][1] == ds[len(ds) - 1][1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_sixteen_bit_sources_keep_their_depth(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", n=6, sixteen=(3,))
    prepare(src, tmp_path / "out", resolution=16, shard_size=2, progress=False)
    ds = PreparedDataset(tmp_path / "out")
    ingest = load_dataset(src, resolution=16, progress=False)
    # shard 1 holds img2 (8 bit, written first) and img3 (16 bit): widened to uint16 exactly
    assert [ds.dtype_of(i) for i in range(len(ds))] == ["uint8", "uint8", "uint16", "uint16", "uint8", "uint8"]
    assert np.abs(ds.image(3) - ingest.records[3].image).max() <= 0.5 / 65535 + 1e-7
    assert np.abs(ds.image(2) - ingest.records[2].image).max() <= 0.5 / 255 + 1e-6
    assert ds.raw(3).dtype == np.uint16 and ds.raw(2).max() % 257 == 0


def test_npz_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "mini.npz"
    np.savez_compressed(path, train_images=rng.integers(0, 256, (9, 12, 12), dtype=np.uint8),
                        train_labels=rng.integers(0, 2, (9, 1)))
    texts = {0: "normal", 1: "pneumonia"}
    prepare(path, tmp_path / "out", resolution=8, shard_size=4, label_text=texts, progress=False)
    ds = PreparedDataset(tmp_path / "out")
    ingest = load_dataset(path, resolution=8, label_text=texts, progress=False)
    assert ds.summary == ingest.summary
    assert [m["file_name"] for m in ds.iter_metadata()] == [r.file_name for r in ingest.records]
    for i, rec in enumerate(ingest.records):
        assert ds[i][1] == rec.text and ds[i][2] == rec.attributes
        assert np.abs(ds.image(i) - rec.image).max() <= 0.5 / 255 + 1e-6


# ----------------------------------------------------------------------- determinism and resume
def test_workers_do_not_change_the_output(src: Path, tmp_path: Path) -> None:
    prepare(src, tmp_path / "w1", resolution=16, shard_size=3, workers=1, progress=False)
    prepare(src, tmp_path / "w2", resolution=16, shard_size=3, workers=2, progress=False)
    one, two = _tree_bytes(tmp_path / "w1"), _tree_bytes(tmp_path / "w2")
    assert list(one) == list(two) and one == two


def test_interrupted_then_resumed_equals_uninterrupted(src: Path, tmp_path: Path) -> None:
    prepare(src, tmp_path / "full", resolution=16, shard_size=3, progress=False)
    out = tmp_path / "part"

    def stop(k: int) -> None:
        if k == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, resolution=16, shard_size=3, progress=False, on_shard=stop)
    assert (out / PROGRESS_NAME).is_file() and not (out / MANIFEST_NAME).exists()
    with pytest.raises(ValueError, match="did not finish"):
        PreparedDataset(out)
    with pytest.raises(FileExistsError, match="--resume"):
        prepare(src, out, resolution=16, shard_size=3, progress=False)
    # damage: a half-written temporary file, and a finished shard cut short
    (out / ".shard-00003.npy.tmp").write_bytes(b"partial")
    data = (out / "shard-00001.npy").read_bytes()
    (out / "shard-00001.npy").write_bytes(data[:-5])
    result = prepare(src, out, resolution=16, shard_size=3, resume=True, progress=False)
    assert result.reused == 2  # shards 0 and 2 kept; 1 (damaged) and 3, 4 rebuilt
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "full")
    # resuming a finished, current preparation only checks it
    assert prepare(src, out, resolution=16, shard_size=3, resume=True, progress=False).reused == result.shards


def test_resume_rebuilds_shards_whose_source_changed(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(src, out, resolution=16, shard_size=3, progress=False)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(src / "img7.png")
    result = prepare(src, out, resolution=16, shard_size=3, resume=True, progress=False)
    assert result.reused == result.shards - 1
    ds = PreparedDataset(out)
    names = [m["file_name"] for m in ds.iter_metadata()]
    assert ds.image(names.index("img7.png")).max() == 0.0
    fresh = tmp_path / "fresh"
    prepare(src, fresh, resolution=16, shard_size=3, progress=False)
    assert _tree_bytes(out) == _tree_bytes(fresh)


# ---------------------------------------------------------------------------------------- bad input
def test_truncated_or_modified_shard_is_named(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(src, out, resolution=16, shard_size=4, progress=False)
    shard = out / "shard-00001.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"shard-00001\.npy: truncated"):
        PreparedDataset(out)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    ds = PreparedDataset(out)  # same size: only the checksum sees it
    with pytest.raises(ValueError, match=r"shard-00001\.npy: checksum mismatch"):
        ds.verify()
    meta = out / "shard-00000.jsonl"
    meta.write_bytes(meta.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"shard-00000\.jsonl: truncated"):
        PreparedDataset(out)


def test_other_resolution_or_version_is_refused(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(src, out, resolution=16, progress=False)
    with pytest.raises(ValueError, match="prepared at resolution 16, but resolution 8"):
        PreparedDataset(out, resolution=8)
    with pytest.raises(ValueError, match="resolution: 16 there, 8 asked"):
        prepare(src, out, resolution=8, resume=True, progress=False)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["version"] = 99
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 99"):
        PreparedDataset(out)
    with pytest.raises(ValueError, match="version 99"):
        prepare(src, out, resolution=16, resume=True, progress=False)
    result = prepare(src, out, resolution=8, overwrite=True, progress=False)
    assert PreparedDataset(out, resolution=8).resolution == 8 and result.reused == 0


def test_source_changing_while_preparing_is_named(src: Path, tmp_path: Path) -> None:
    def touch_later(k: int) -> None:  # after shard 0, rewrite a file of shard 2 (not read yet)
        if k == 0:
            Image.fromarray(np.zeros((30, 30), np.uint8)).save(src / "img8.png")

    with pytest.raises(SourceChanged, match=r"img8\.png: the source changed .*before reading it"):
        prepare(src, tmp_path / "a", resolution=16, shard_size=3, progress=False, on_shard=touch_later)

    def touch_earlier(k: int) -> None:  # after shard 2, rewrite a file of shard 0 (already read)
        if k == 2:
            Image.fromarray(np.zeros((31, 31), np.uint8)).save(src / "img1.png")

    with pytest.raises(SourceChanged, match=r"img1\.png: the source changed .*found after preparing"):
        prepare(src, tmp_path / "b", resolution=16, shard_size=3, progress=False, on_shard=touch_earlier)
    assert not (tmp_path / "b" / MANIFEST_NAME).exists()

    def edit_metadata(k: int) -> None:
        if k == 1:
            with open(src / "metadata.jsonl", "a") as f:
                f.write(json.dumps({"file_name": "img0.png#", "text": "late row"}) + "\n")

    with pytest.raises(SourceChanged, match=r"metadata\.jsonl: the source changed"):
        prepare(src, tmp_path / "c", resolution=16, shard_size=3, progress=False, on_shard=edit_metadata)


def test_arguments_and_outputs_are_checked(src: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resolution must be an int"):
        prepare(src, tmp_path / "o", resolution=0)
    with pytest.raises(ValueError, match="workers must be"):
        prepare(src, tmp_path / "o", resolution=8, workers=0)
    with pytest.raises(ValueError, match="inside the source"):
        prepare(src, src / "prepared", resolution=8)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no prepared dataset"):
        prepare(src, other, resolution=8, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "t"}) + "\n")
    with pytest.raises(ValueError, match="no usable image"):
        prepare(empty, tmp_path / "o2", resolution=8, progress=False)


# ------------------------------------------------------------------------------------------- reader
def test_reader_pickles_and_serves_a_dataloader(src: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    prepare(src, tmp_path / "out", resolution=16, shard_size=4, progress=False)
    ds = PreparedDataset(tmp_path / "out")
    ds[0]  # opens files; the pickle must not carry them
    clone = pickle.loads(pickle.dumps(ds))
    assert all(np.array_equal(clone.image(i), ds.image(i)) for i in range(len(ds)))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    images, texts = [], []
    for batch_images, batch_texts, _attrs in loader:
        images.append(batch_images.numpy())
        texts.extend(batch_texts)
    assert np.array_equal(np.concatenate(images), np.stack([ds.image(i) for i in range(len(ds))]))
    assert texts == [m["text"] for m in ds.iter_metadata()]
    # records with different attribute keys: the dataset's own collate keeps them as a list of dicts
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=0, collate_fn=PreparedDataset.collate)
    batch_images, batch_texts, batch_attrs = next(iter(loader))
    assert batch_images.shape == (5, 16, 16) and batch_images.dtype == np.float32
    assert batch_attrs[0]["patient_id"] == "p0" and len(batch_texts) == 5


def test_augmentation_is_deterministic_radiological_and_serialisable(src: Path, tmp_path: Path) -> None:
    aug = Augment()
    assert not aug.hflip and Augment.from_dict(json.loads(json.dumps(aug.to_dict()))) == aug
    with pytest.raises(ValueError, match="did you mean 'max_shift'"):
        Augment.from_dict({"max_shfit": 0.1})
    with pytest.raises(ValueError, match="max_rotation must be"):
        Augment(max_rotation=90)
    # a lateralised image: bright left half; no flip may ever move it to the right
    img = np.zeros((24, 24), np.float32)
    img[:, :10] = 0.8
    for s in range(20):
        out = aug(img, np.random.default_rng(s))
        assert out.shape == img.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        assert out[:, :12].mean() > out[:, 12:].mean() + 0.4
    flips = Augment(max_shift=0, max_zoom=0, max_rotation=0, brightness=0, contrast=0, gamma=0, hflip=True)
    flipped = [np.array_equal(flips(img, np.random.default_rng(s)), img[:, ::-1]) for s in range(20)]
    assert any(flipped) and not all(flipped)
    ident = Augment(max_shift=0, max_zoom=0, max_rotation=0, brightness=0, contrast=0, gamma=0)
    assert ident.is_identity and np.array_equal(ident(img, np.random.default_rng(0)), img)
    prepare(src, tmp_path / "out", resolution=16, progress=False)
    a = PreparedDataset(tmp_path / "out", augment=aug, augment_seed=5)
    b = pickle.loads(pickle.dumps(a))
    assert np.array_equal(a[3][0], b[3][0]) and not np.array_equal(a[3][0], a.image(3))
    a.set_epoch(1)
    assert not np.array_equal(a[3][0], b[3][0])


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_prepare(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from radsynth.cli import main

    out = tmp_path / "cli"
    assert main(["prepare", "--data", str(src), "--output", str(out), "--resolution", "16", "--quiet"]) == 0
    assert "prepared 11 images in 1 shards" in capsys.readouterr().out
    assert main(["prepare", "--data", str(src), "--output", str(out), "--resolution", "16", "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["prepare", "--data", str(src), "--output", str(out), "--resolution", "2"]) == 2
    assert "--resolution" in capsys.readouterr().err
    assert main(["prepare", "--data", str(src), "--output", str(out), "--resolution", "16",
                 "--resume", "--quiet"]) == 0
    assert oct(os.stat(out / MANIFEST_NAME).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------ DICOM and NIfTI
def _same_as_ingest(out: Path, ingest: IngestResult, resolution: int) -> PreparedDataset:
    ds = PreparedDataset(out, resolution=resolution)
    assert ds.summary == ingest.summary
    assert [(s["path"], s["reason"]) for s in ds.skipped()] == [(k.path, k.reason) for k in ingest.skipped]
    assert [m["file_name"] for m in ds.iter_metadata()] == [r.file_name for r in ingest.records]
    for i, rec in enumerate(ingest.records):
        meta = ds.metadata(i)
        assert (meta["text"], meta["attributes"]) == (rec.text, rec.attributes)
        assert meta["intensity"] == rec.intensity.to_dict()
        step = 0.5 / (65535 if ds.dtype_of(i) == "uint16" else 255)
        assert np.abs(ds.image(i) - rec.image).max() <= step + 1e-6
    return ds


def test_dicom_folder_with_reports(tmp_path: Path) -> None:
    import csv
    import shutil

    import pydicom
    from pydicom.data import get_testdata_file

    names = {"ct.dcm": "CT_small.dcm", "mr.dcm": "MR_small.dcm", "cr/6154": "dicomdirtests/77654033/CR1/6154"}
    root = tmp_path / "study"
    (root / "cr").mkdir(parents=True)
    for dst, name in names.items():
        p = get_testdata_file(name)
        if p is None:
            pytest.skip(f"pydicom test file {name} not available")
        shutil.copy(p, root / dst)
    (root / "junk.dcm").write_bytes(np.random.default_rng(3).bytes(200))
    reports = tmp_path / "reports.csv"
    with open(reports, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["StudyInstanceUID", "text", "label"])
        w.writeheader()
        w.writerow({"StudyInstanceUID": pydicom.dcmread(root / "ct.dcm").StudyInstanceUID,
                    "text": "CT head, no acute findings.", "label": "0"})
        w.writerow({"StudyInstanceUID": pydicom.dcmread(root / "cr" / "6154").StudyInstanceUID,
                    "text": "Cervical spine lateral view, normal.", "label": "1"})
    prepare(root, tmp_path / "out", resolution=8, shard_size=2, workers=2, reports_csv=reports, progress=False)
    ds = _same_as_ingest(tmp_path / "out", load_dataset(root, reports_csv=reports, resolution=8, progress=False), 8)
    assert len(ds) == 2 and {ds.dtype_of(i) for i in range(2)} == {"uint16"}  # 12/16-bit sources
    prepare(root, tmp_path / "caption", resolution=8, shard_size=1, progress=False)
    _same_as_ingest(tmp_path / "caption", load_dataset(root, resolution=8, progress=False), 8)


def test_nifti_volume_gives_many_images_per_file(tmp_path: Path) -> None:
    import nibabel as nib

    rng = np.random.default_rng(2)
    root = tmp_path / "nii"
    root.mkdir()
    rows = []
    for v in range(3):
        vol = rng.normal(0, 100, (10, 12, 5 + v)).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), root / f"vol{v}.nii.gz")
        rows.append({"file_name": f"vol{v}.nii.gz", "text": f"volume {v}", "modality": "CT" if v == 1 else "MR"})
    rows.append({"file_name": "vol2.nii.gz#z=3", "text": "duplicate slice row"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(root, tmp_path / "w1", resolution=8, shard_size=2, progress=False)
    prepare(root, tmp_path / "w2", resolution=8, shard_size=2, workers=2, progress=False)
    assert _tree_bytes(tmp_path / "w1") == _tree_bytes(tmp_path / "w2")
    ds = _same_as_ingest(tmp_path / "w1", load_dataset(root, resolution=8, progress=False), 8)
    assert len(ds) == 5 + 6 + 7 + 1


def test_npz_errors_match_load_dataset(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        prepare(bad, tmp_path / "o1", resolution=8, label_text={0: "x"}, progress=False)
    good = tmp_path / "good.npz"
    np.savez(good, train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"label_text has no text for labels \[2\]"):
        prepare(good, tmp_path / "o2", resolution=8, label_text={0: "a", 1: "b"}, progress=False)
    with pytest.raises(ValueError, match="npz_split='val' needs arrays"):
        prepare(good, tmp_path / "o3", resolution=8, npz_split="val", label_text={0: "a"}, progress=False)
    floats = tmp_path / "floats.npz"
    np.savez(floats, train_images=np.full((2, 8, 8), 1.5, np.float32), train_labels=np.array([0, 0]))
    with pytest.raises(ValueError, match=r"must be uint8, uint16 or float in \[0, 1\]"):
        prepare(floats, tmp_path / "o4", resolution=8, label_text={0: "a"}, progress=False)


def test_is_prepared_only_when_finished(src: Path, tmp_path: Path) -> None:
    from generator.data.prepared import is_prepared

    out = tmp_path / "out"

    def stop(k: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, resolution=16, shard_size=4, progress=False, on_shard=stop)
    assert not is_prepared(out) and not is_prepared(src)
    prepare(src, out, resolution=16, shard_size=4, resume=True, progress=False)
    assert is_prepared(out)
