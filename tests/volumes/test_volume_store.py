"""The on-disk volume store (``train --dims 3 --stream-from-disk``): what it holds equals the in-memory path,
training from it gives the same weights, damage is refused by name, skipped volumes are reported, the CLI
writes/reuses/rebuilds it, and writing it holds one volume at a time."""

from __future__ import annotations

import json
import shutil
import tracemalloc
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from generator.volumes import store as store_module
from generator.volumes.geometry import centred_affine
from generator.volumes.ingest import VolumeStream, load_volumes
from generator.volumes.models import get_volume_preset
from generator.volumes.phantom import write_phantom_volumes
from generator.volumes.records import Volume, ct_mapping
from generator.volumes.store import (
    RECORDS_JSONL,
    STORE_JSON,
    VOLUMES_NPY,
    VolumeSetError,
    VolumeStore,
    is_volume_store,
    write_volume_store,
)
from generator.volumes.training import VolumeTrainConfig, VolumeTrainer, VolumeTrainingData
from tests.volumes.conftest import TINY_TRAIN


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("vae", "unet"):
        out.update({f"{part}.{k}": v for k, v in load_file(str(folder / part / "model.safetensors")).items()})
    return out


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines() if x.strip()]


def _write_rows(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------ (a) contents
def test_store_holds_exactly_what_the_in_memory_path_holds(tmp_path, phantom_folder, phantom_data):
    res = load_volumes(phantom_folder)
    store = write_volume_store(tmp_path / "store", phantom_folder)
    assert isinstance(store.volumes, np.memmap) and not store.volumes.flags.writeable
    assert store.volumes.dtype == np.float32 and store.volumes.shape == (6, 16, 16, 16)
    assert np.array_equal(store.volumes, phantom_data.volumes)  # bit for bit
    assert store.texts == phantom_data.texts
    assert [r["file_name"] for r in store.records] == [v.file_name for v in res.records]
    assert [r["patient_id"] for r in store.records] == [v.patient_id for v in res.records]
    assert [r["attributes"] for r in store.records] == [json.loads(json.dumps(v.attributes)) for v in res.records]
    assert store.spacing == phantom_data.spacing and store.shape == phantom_data.shape
    assert store.intensity == phantom_data.intensity and store.intensity_description == res.intensity
    assert store.fingerprint == phantom_data.fingerprint == res.fingerprint()
    assert store.summary == res.summary and store.skipped == []
    store.verify()
    # reopened from the folder: the same; no temporary folder left beside it
    again = VolumeStore.open(tmp_path / "store")
    assert again.info == store.info and np.array_equal(again.volumes, store.volumes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    # training data from the store: a memory map, never a copy, with the in-memory path's fields
    data = VolumeTrainingData.from_store(store)
    assert isinstance(data.volumes, np.memmap) and Path(data.volumes.filename) == tmp_path / "store" / VOLUMES_NPY
    assert (data.texts, data.spacing, data.intensity, data.fingerprint) == (
        phantom_data.texts, phantom_data.spacing, phantom_data.intensity, phantom_data.fingerprint)
    assert np.array_equal(data.volumes, phantom_data.volumes)
    # a read-only memory map is taken as it is (no copy into memory)
    ro = VolumeTrainingData(store.volumes, store.texts, store.spacing, store.intensity, store.fingerprint)
    assert ro.volumes is store.volumes


def test_a_header_of_another_length_is_handled_by_copying(tmp_path, phantom_folder, phantom_data, monkeypatch):
    """Fewer volumes than rows: the header is rewritten in place; were its length to change, the volumes are
    copied into a new file instead (the fallback), with the same result."""
    src = _copy(phantom_folder, tmp_path / "src")
    _write_rows(src, [*_rows(src), {"file_name": "absent.nii.gz", "text": "x"}])  # capacity 7, count 6
    in_place = write_volume_store(tmp_path / "in_place", src)
    monkeypatch.setattr(store_module, "_npy_header", lambda shape: b"")
    copied = write_volume_store(tmp_path / "copied", src)
    for store in (in_place, copied):
        assert store.volumes.shape == (6, 16, 16, 16) and np.array_equal(store.volumes, phantom_data.volumes)
        store.verify()
    assert not [p.name for p in copied.path.iterdir() if p.name not in (VOLUMES_NPY, RECORDS_JSONL, STORE_JSON)]


def test_value_check_reads_chunks_and_still_finds_a_bad_volume(monkeypatch):
    from generator.volumes import training

    monkeypatch.setattr(training, "_CHECK_VOXELS", 64)  # one 4^3 volume per chunk
    vols = np.full((5, 4, 4, 4), 0.5, np.float32)
    VolumeTrainingData(vols, ["x"] * 5, (1, 1, 1), ct_mapping())
    vols[4, 3, 3, 3] = 1.5  # in the last chunk only
    with pytest.raises(ValueError, match=r"finite in \[0, 1\], got range \[0.5, 1.5\]"):
        VolumeTrainingData(vols, ["x"] * 5, (1, 1, 1), ct_mapping())
    vols[4, 3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        VolumeTrainingData(vols, ["x"] * 5, (1, 1, 1), ct_mapping())


# ------------------------------------------------------------------------------------------ (b) training
def test_training_from_the_store_gives_the_in_memory_weights(tmp_path, phantom_folder, tiny_volume_model,
                                                             tiny_text_encoder):
    """``tiny_volume_model`` was trained from ``VolumeTrainingData.from_ingest(load_volumes(phantoms))`` with
    ``TINY_TRAIN``; the same config from the store gives the same weights, exactly."""
    store = write_volume_store(tmp_path / "store", phantom_folder)
    out = tmp_path / "from_store"
    res = VolumeTrainer(VolumeTrainingData.from_store(store), out, get_volume_preset("tiny"),
                        VolumeTrainConfig(**TINY_TRAIN), text_encoder=str(tiny_text_encoder)).run()
    assert res.finished and (res.vae_step, res.unet_step) == (6, 8)
    _assert_same_weights(tiny_volume_model, out)
    a, b = (json.loads((f / "radsynth.json").read_text()) for f in (tiny_volume_model, out))
    assert a["data_fingerprint"] == b["data_fingerprint"] and a["scaling_factor"] == b["scaling_factor"]
    assert (a["shape"], a["spacing"], a["intensity"]) == (b["shape"], b["spacing"], b["intensity"])


# ------------------------------------------------------------------------------------------ (c) damage
def test_damaged_or_unfinished_stores_are_refused_by_name(tmp_path, phantom_folder):
    good = write_volume_store(tmp_path / "good", phantom_folder).path

    truncated = _copy(good, tmp_path / "truncated")
    npy = truncated / VOLUMES_NPY
    npy.write_bytes(npy.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"truncated/volumes\.npy: truncated"):
        VolumeStore.open(truncated)

    garbage = _copy(good, tmp_path / "garbage")
    (garbage / VOLUMES_NPY).write_bytes(b"not an npy file at all" * 10)
    with pytest.raises(ValueError, match=r"garbage/volumes\.npy: not a readable \.npy file"):
        VolumeStore.open(garbage)

    other_shape = _copy(good, tmp_path / "other_shape")
    np.save(other_shape / VOLUMES_NPY, np.zeros((6, 16, 16, 8), np.float32))
    with pytest.raises(ValueError, match=r"other_shape/volumes\.npy: holds float32 C-order \(6, 16, 16, 8\)"):
        VolumeStore.open(other_shape)

    no_json = _copy(good, tmp_path / "no_json")
    (no_json / STORE_JSON).unlink()
    with pytest.raises(ValueError, match=r"no_json/store\.json: missing"):
        VolumeStore.open(no_json)
    assert not is_volume_store(no_json)

    bad_json = _copy(good, tmp_path / "bad_json")
    (bad_json / STORE_JSON).write_text('{"format": "radsynth-volume-store", "vers')
    with pytest.raises(ValueError, match=r"bad_json/store\.json: unreadable"):
        VolumeStore.open(bad_json)

    records = _copy(good, tmp_path / "records")
    lines = (records / RECORDS_JSONL).read_text().splitlines(keepends=True)
    (records / RECORDS_JSONL).write_text("".join(lines[:-1]))
    with pytest.raises(ValueError, match=r"records/records\.jsonl: damaged"):
        VolumeStore.open(records)

    with pytest.raises(ValueError, match="not a folder"):
        VolumeStore.open(tmp_path / "nowhere")


def test_the_hidden_temporary_folder_is_never_a_store(tmp_path, phantom_folder, monkeypatch):
    good = write_volume_store(tmp_path / "good", phantom_folder).path

    # an interrupted write (here: between the last volume and the rename) leaves nothing under either name
    def interrupted(tmp: Path, folder: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "_publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_volume_store(tmp_path / "store", phantom_folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]
    monkeypatch.undo()

    # a complete copy under the temporary name (what a crash just before the rename leaves) is refused
    tmp = _copy(good, tmp_path / ".store.tmp-abc123")
    with pytest.raises(ValueError, match="hidden temporary folder"):
        VolumeStore.open(tmp)
    assert not is_volume_store(tmp)
    # the next write of that store removes the stale temporary folder and publishes a complete store
    write_volume_store(tmp_path / "store", phantom_folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "store"]
    assert VolumeStore.open(tmp_path / "store").count == 6


# ------------------------------------------------------------------------------------------ (d) skipped
def test_unreadable_and_odd_shaped_volumes_are_skipped_with_reasons(tmp_path, phantom_folder):
    """Rows out of file_name order, a corrupt file, a 2D image and a missing file: the store keeps the six
    good volumes in load_volumes's order and lists the others with load_volumes's reasons, in row order."""
    src = _copy(phantom_folder, tmp_path / "src")
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    flat = nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4))
    nib.save(flat, str(src / "flat.nii.gz"))
    rows = _rows(src)
    extra = [{"file_name": "flat.nii.gz", "text": "chest CT"}, {"file_name": "broken.nii.gz", "text": "chest CT"},
             {"file_name": "absent.nii.gz", "text": "chest CT"}]
    _write_rows(src, [extra[0], *rows[::-1][:3], extra[1], *rows[::-1][3:], extra[2]])
    res = load_volumes(src)
    store = write_volume_store(tmp_path / "store", src)
    assert [r["file_name"] for r in store.records] == [v.file_name for v in res.records] == sorted(
        r["file_name"] for r in rows)
    assert [s.path for s in store.skipped] == ["flat.nii.gz", "broken.nii.gz", "absent.nii.gz"]
    assert store.skipped == res.skipped
    reasons = {s["path"]: s["reason"] for s in json.loads((store.path / STORE_JSON).read_text())["skipped"]}
    assert "expected a 3D volume" in reasons["flat.nii.gz"]
    assert "not a readable NIfTI file" in reasons["broken.nii.gz"]
    assert "no such file" in reasons["absent.nii.gz"]
    assert store.summary == res.summary and store.summary.startswith("read 6 volumes from 9 rows, skipped 3 (")
    assert np.array_equal(store.volumes, res.stack()) and store.fingerprint == res.fingerprint()


def test_a_dicom_archive_is_stored_in_load_volumes_order_with_its_skips(tmp_path):
    """Series named out of creation order, one with a missing slice, one MR series kept out by modality, and a
    file that is not DICOM: the store equals load_volumes's stack, order, skipped list and summary."""
    from tests.volumes.dicom_helpers import write_series

    rng = np.random.default_rng(0)
    root = tmp_path / "archive"
    for rel, shape in (("P2/b", (6, 8, 10)), ("P1/z", (8, 10, 8)), ("P1/a", (7, 8, 8)), ("P3/gap", (6, 8, 8))):
        write_series(root / rel, rng.integers(-1000, 1500, size=shape).astype(np.float32), spacing=(2.0, 1.5, 1.5),
                     patient_id=rel.split("/")[0])
    (root / "P3/gap/slice003.dcm").unlink()
    write_series(root / "P4/mr", rng.integers(0, 900, size=(6, 8, 8)).astype(np.float32), modality="MR")
    (root / "notes.txt").write_text("not DICOM")
    kwargs = dict(spacing=2.0, shape=8, modality="CT")
    res = load_volumes(root, **kwargs)
    store = write_volume_store(tmp_path / "store", root, **kwargs)
    assert [r["file_name"] for r in store.records] == [v.file_name for v in res.records] == ["P1/a", "P1/z", "P2/b"]
    assert store.skipped == res.skipped and [s.path for s in store.skipped] == ["P3/gap", "P4/mr"]
    assert store.summary == res.summary and "ignored 1 files" in store.summary
    assert np.array_equal(store.volumes, res.stack()) and store.fingerprint == res.fingerprint()
    assert store.texts == [v.text for v in res.records] and store.settings["modality"] == "CT"


def test_volumes_on_another_grid_stop_the_write_as_from_ingest_does(tmp_path, phantom_folder):
    src = _copy(phantom_folder, tmp_path / "src")
    path = src / "phantom_0003.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ np.diag([1.5, 1.5, 1.5, 1.0])), str(path))
    with pytest.raises(ValueError, match="spacings"):
        VolumeTrainingData.from_ingest(load_volumes(src))
    with pytest.raises(VolumeSetError, match=r"volumes have 2 spacings .*'phantom_0003.nii.gz' differs from "
                                             r"'phantom_0000.nii.gz'.*load with spacing=") as info:
        write_volume_store(tmp_path / "store", src)
    assert info.value.kind == "grid"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing left behind
    # resampled to one grid it is fine, and equals the in-memory path
    store = write_volume_store(tmp_path / "store", src, spacing=20, shape=12)
    assert np.array_equal(store.volumes, VolumeTrainingData.from_ingest(load_volumes(src, spacing=20, shape=12)).volumes)
    # a source without a usable volume is refused
    empty = tmp_path / "empty"
    empty.mkdir()
    _write_rows(empty, [{"file_name": "absent.nii.gz", "text": "x"}])
    with pytest.raises(VolumeSetError, match=r"no usable volumes \(read 0 volumes from 1 rows, skipped 1"):
        write_volume_store(tmp_path / "store2", empty)
    assert not (tmp_path / "store2").exists()


# ------------------------------------------------------------------------------------------ (e) CLI
def test_cli_stream_from_disk_trains_the_same_model_and_reuses_or_rebuilds_its_store(
        tmp_path, phantom_folder, tiny_text_encoder, monkeypatch, capsys):
    from radsynth.cli import main

    src = _copy(phantom_folder, tmp_path / "phantoms")
    common = ["train", "--dims", "3", "--data", str(src), "--resolution", "16", "--preset", "tiny",
              "--max-steps", "2", "--text-encoder", str(tiny_text_encoder), "--keep-checkpoints", "--quiet"]
    streamed, in_memory = tmp_path / "streamed", tmp_path / "in_memory"
    calls = []
    real_iter = store_module.iter_volumes
    monkeypatch.setattr(store_module, "iter_volumes", lambda *a, **k: calls.append(a) or real_iter(*a, **k))

    assert main([*common, "--output", str(streamed), "--stream-from-disk"]) == 0
    folder = streamed / "checkpoints" / "prepared_volumes"
    store = VolumeStore.open(folder)
    assert store.count == 6 and len(calls) == 1
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert main([*common, "--output", str(in_memory)]) == 0
    _assert_same_weights(streamed, in_memory)
    a, b = (json.loads((f / "radsynth.json").read_text()) for f in (streamed, in_memory))
    assert a["data_fingerprint"] == b["data_fingerprint"] == store.fingerprint

    # --resume with the same source: the store is reused, not rewritten
    stamp = (folder / STORE_JSON).stat().st_mtime_ns, (folder / VOLUMES_NPY).stat().st_ino
    assert main([*common, "--output", str(streamed), "--stream-from-disk", "--resume"]) == 0
    assert len(calls) == 1
    assert ((folder / STORE_JSON).stat().st_mtime_ns, (folder / VOLUMES_NPY).stat().st_ino) == stamp

    # --resume after a volume was added: the store is rebuilt (then the checkpoint of the old data is refused)
    write_phantom_volumes(src, 7, shape=16, seed=0)
    capsys.readouterr()
    assert main([*common, "--output", str(streamed), "--stream-from-disk", "--resume"]) == 2
    assert "data differs" in capsys.readouterr().err
    assert len(calls) == 2
    rebuilt = VolumeStore.open(folder)
    assert rebuilt.count == 7 and rebuilt.fingerprint != store.fingerprint
    # without --keep-checkpoints the finished run removes the checkpoints, store included
    fresh = tmp_path / "fresh"
    assert main([*common[:-2], "--quiet", "--output", str(fresh), "--stream-from-disk"]) == 0
    assert (fresh / "radsynth.json").is_file() and not (fresh / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ (f) memory
def _write_counting(tmp_path: Path, monkeypatch, n: int, side: int = 16) -> tuple[int, int]:
    """Write a store from a fake source of ``n`` random ``side``^3 volumes that counts its live volumes.

    Returns:
        (the most volumes alive at once, counting each one as it is made; the traced memory peak from the
        start of the write until the last volume was written)
    """
    live, most, peaks = [0], [0], []
    affine = centred_affine((side,) * 3, (2.0, 2.0, 2.0))

    def items(stream: VolumeStream):
        rng = np.random.default_rng(0)
        for i in range(n):
            most[0] = max(most[0], live[0] + 1)
            vol = Volume(array=rng.uniform(-1000, 1000, (side,) * 3).astype(np.float32), affine=affine,
                         spacing=(2.0, 2.0, 2.0), intensity=ct_mapping(), file_name=f"v{i:04d}", text="chest CT")
            live[0] += 1
            weakref.finalize(vol, lambda: live.__setitem__(0, live[0] - 1))
            stream.done += 1
            yield vol
            del vol
        peaks.append(tracemalloc.get_traced_memory()[1])

    monkeypatch.setattr(store_module, "iter_volumes", lambda *a, **k: VolumeStream(
        items, total=n, source=f"{n} rows", spacing=None, shape=None))
    src = tmp_path / f"src{n}"
    src.mkdir()
    tracemalloc.start()
    try:
        store = write_volume_store(tmp_path / f"store{n}", src)
    finally:
        tracemalloc.stop()
    assert store.count == n and store.volumes.shape == (n, side, side, side)
    assert float(store.volumes[n - 1].max()) > 0.9  # the last volume was written, not left as zeros
    return most[0], peaks[0]


def test_writing_holds_one_volume_at_a_time(tmp_path, monkeypatch):
    """No volume of the source is made while another is still referenced (by the stream, the writer or the
    progress wrapper), and 300 more volumes (4.9 MB of float32) raise the traced peak by far less than a
    tenth of their size (only their small records: ~0.5 KB each)."""
    side = 16
    most_small, peak_small = _write_counting(tmp_path, monkeypatch, 100, side)
    most_large, peak_large = _write_counting(tmp_path, monkeypatch, 400, side)
    assert most_small == most_large == 1
    extra = 300 * side**3 * 4
    assert peak_large - peak_small < extra / 10, (peak_small, peak_large, extra)
