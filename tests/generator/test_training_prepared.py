"""Training from prepared datasets on disk (issue 9): same weights as in memory, loader workers that do
not change results, exact resume, an on-disk memory-mapped latent cache, augmentation without flips.

32 px phantoms are written at exactly the training resolution, so ``load_dataset`` does not resize
them and their pixels are ``v / 255`` in float32 both in memory and as read back from the uint8 shards:
the two paths see bit-identical images, hence the same data fingerprint and the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from generator.data import IngestResult, load_dataset
from generator.data.augment import Augment
from generator.data.prepared import BatchReader, InMemoryImages, PreparedDataset
from generator.data.records import ImageRecord, IntensityMapping
from generator.data.preparing import prepare
from generator.models.config import get_preset
from generator.phantoms import write_phantom_folder
from generator.training import LatentCache, Trainer
from radsynth.cli import main

RES = 32
STEPS = 4


def _train(data, out: Path, enc: Path, **kw) -> None:
    kw.setdefault("max_steps", STEPS)
    Trainer(data, out, get_preset("tiny", checkpoint_every=2), resolution=RES, text_encoder=str(enc), seed=0,
            progress=False, mixed_precision="no", **kw).run()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part in ("vae", "unet")
            for k, v in load_file(next((folder / part).glob("*.safetensors"))).items()}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_folder(tmp_path_factory.mktemp("phantoms") / "src", 20, size=RES, seed=3)


@pytest.fixture(scope="module")
def prepared(phantoms: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "p32"
    prepare(phantoms, out, resolution=RES, shard_size=6, progress=False)  # 4 shards
    return out


@pytest.fixture(scope="module")
def in_memory_model(phantoms: Path, tiny_text_encoder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mem") / "m"
    _train(load_dataset(phantoms, resolution=RES, progress=False), out, tiny_text_encoder)
    return out


@pytest.fixture(scope="module")
def prepared_model(prepared: Path, tiny_text_encoder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "m"
    _train(PreparedDataset(prepared, resolution=RES), out, tiny_text_encoder, keep_checkpoints=True)
    return out


def test_prepared_folder_gives_the_in_memory_weights(in_memory_model: Path, prepared_model: Path) -> None:
    _assert_same_weights(in_memory_model, prepared_model)
    mem = json.loads((in_memory_model / "radsynth.json").read_text())
    disk = json.loads((prepared_model / "radsynth.json").read_text())
    assert mem["data"]["fingerprint"] == disk["data"]["fingerprint"]  # IngestResult's scheme on both paths
    assert (mem["data"]["read_from"], disk["data"]["read_from"]) == ("memory", "prepared")
    assert disk["data"]["num_images"] == 20 and disk["data"]["source"] == "imagefolder"
    run = json.loads((prepared_model / "checkpoints" / "run.json").read_text())
    assert run["data_fingerprint"] == disk["data"]["fingerprint"] and "augment" not in run
    assert disk["training"]["augment"] is None and disk["training"]["gradient_checkpointing"] is False


@pytest.mark.slow  # starts worker processes (a forkserver importing torch)
def test_loader_workers_and_checkpointing_do_not_change_the_weights(prepared: Path, prepared_model: Path,
                                                                    tiny_text_encoder: Path, tmp_path: Path) -> None:
    # two loader workers, and activations recomputed in the backward pass: bit-identical weights
    _train(PreparedDataset(prepared, resolution=RES), tmp_path / "w2", tiny_text_encoder, dataloader_workers=2,
           gradient_checkpointing=True)
    _assert_same_weights(prepared_model, tmp_path / "w2")
    assert json.loads((tmp_path / "w2" / "radsynth.json").read_text())["training"]["gradient_checkpointing"] is True


def test_latent_cache_is_a_memory_mapped_file(prepared: Path, prepared_model: Path) -> None:
    ws = prepared_model / "checkpoints"
    meta = json.loads((ws / "latents.json").read_text())
    assert meta["shape"] == [20, 4, 8, 8] and meta["data_fingerprint"] == PreparedDataset(prepared).fingerprint()
    cache = LatentCache(ws, tuple(meta["shape"]), meta["std"])
    mean, std = cache.open()
    assert isinstance(mean, np.memmap) and isinstance(std, np.memmap) and Path(mean.filename) == ws / "latents-mean.npy"
    assert float(std.min()) > 0 and abs(float(np.asarray(mean).std(ddof=1)) - meta["std"]) < 1e-5
    # scaling factor of the saved VAE is 1 / std of the cached means
    vae_cfg = json.loads((prepared_model / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(1.0 / meta["std"], rel=1e-6)
    rows, _ = cache.rows(torch.tensor([3, 0, 3]))
    assert torch.equal(rows[0], rows[2]) and torch.equal(rows[1], torch.from_numpy(np.array(mean[0])))
    # the cached means are the saved VAE's posterior means of the images
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(prepared_model / "vae").eval()
    x = torch.from_numpy(PreparedDataset(prepared).read_batch([0, 7]) * 2 - 1).unsqueeze(1)
    with torch.no_grad():
        enc = vae.encode(x).latent_dist.mean.numpy()
    np.testing.assert_allclose(enc, mean[[0, 7]], atol=1e-5)


@pytest.mark.slow
def test_interrupted_run_resumes_exactly_from_a_prepared_folder(prepared: Path, prepared_model: Path,
                                                                tiny_text_encoder: Path, tmp_path: Path) -> None:
    def interrupt(stage: str, step: int) -> None:
        if (stage, step) == ("unet", 3):
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _train(PreparedDataset(prepared, resolution=RES), out, tiny_text_encoder, step_hook=interrupt)
    latents = out / "checkpoints" / "latents-mean.npy"
    before = (latents.stat().st_ino, latents.stat().st_mtime_ns)
    states = out / "checkpoints" / "text-embeds.npy"
    states_before = (states.stat().st_ino, states.stat().st_mtime_ns)
    seen: list[tuple[str, int]] = []
    _train(PreparedDataset(prepared, resolution=RES), out, tiny_text_encoder, resume=True, keep_checkpoints=True,
           dataloader_workers=1, step_hook=lambda s, n: seen.append((s, n)))
    assert seen[0] == ("unet", 3)
    assert (latents.stat().st_ino, latents.stat().st_mtime_ns) == before  # the cache was reused, not rewritten
    assert (states.stat().st_ino, states.stat().st_mtime_ns) == states_before  # prompt states too
    _assert_same_weights(prepared_model, out)


def test_prepared_folder_at_another_resolution_is_refused(prepared: Path, phantoms: Path, tiny_text_encoder: Path,
                                                          tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match=rf"{prepared}.* resolution 32.* resolution 16"):
        Trainer(PreparedDataset(prepared), tmp_path / "m", get_preset("tiny"), resolution=16, progress=False)
    argv = ["train", "--data", str(prepared), "--output", str(tmp_path / "cli"), "--preset", "tiny",
            "--resolution", "16", "--text-encoder", str(tiny_text_encoder), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(prepared) in err and "resolution 32" in err and "resolution 16" in err


def test_augment_changes_vae_batches_never_flips(prepared: Path) -> None:
    ds = PreparedDataset(prepared)
    plain, aug = BatchReader(ds), BatchReader(ds, Augment())
    idx = list(range(len(ds)))
    base = plain[(idx, None)][1]
    got_idx, images = aug[(idx, 7)]
    assert list(got_idx) == idx and images.dtype == np.float32 and images.shape == base.shape
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert np.abs(images - base).max() > 0.02  # changed
    assert np.array_equal(images, aug[(idx, 7)][1])  # a function of the key: loader workers do not matter
    assert not np.array_equal(images, aug[(idx, 8)][1])
    assert np.array_equal(aug[(idx, None)][1], base)  # the latent cache reads unaugmented pixels
    # laterality survives: an image bright on its left stays bright on its left, whatever the draw
    left = np.zeros((RES, RES), np.float32)
    left[:, : RES // 2] = 0.8
    lateral = BatchReader(InMemoryImages(IngestResult(Path("."), [ImageRecord("l.png", "left", left)], [],
                                                      IntensityMapping("png8", 0, 255), "imagefolder"), RES),
                          Augment())
    for seed in range(200):
        out = lateral[([0], seed)][1][0]
        assert out[:, : RES // 2].mean() > 0.6 and out[:, RES // 2 :].mean() < 0.2, seed
    with pytest.raises(ValueError, match="hflip"):
        Trainer(ds, "unused", get_preset("tiny"), resolution=RES, augment=Augment(hflip=True))


def test_augment_is_recorded_and_changes_the_vae(prepared: Path, prepared_model: Path,
                                                         tiny_text_encoder: Path, tmp_path: Path) -> None:
    out = tmp_path / "aug"
    _train(PreparedDataset(prepared, resolution=RES), out, tiny_text_encoder, augment=Augment(), keep_checkpoints=True)
    info = json.loads((out / "radsynth.json").read_text())
    assert info["training"]["augment"] == Augment().to_dict() and info["training"]["augment"]["hflip"] is False
    assert json.loads((out / "checkpoints" / "run.json").read_text())["augment"] == Augment().to_dict()
    # augmented batches train another VAE than the plain run (same seed, same data)
    wa, wp = _weights(out), _weights(prepared_model)
    assert any(not torch.equal(wa[k], wp[k]) for k in wa if k.startswith("vae."))


def test_cli_stream_from_disk_resumes_an_interrupted_preparation(phantoms: Path, in_memory_model: Path,
                                                                 tiny_text_encoder: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    folder = out / "checkpoints" / "prepared"

    def stop(k: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an interrupted `--stream-from-disk` start (default settings)
        prepare(phantoms, folder, resolution=RES, progress=False, on_shard=stop)
    assert (folder / "progress.json").is_file()
    assert not (folder / "manifest.json").exists()
    argv = ["train", "--data", str(phantoms), "--output", str(out), "--preset", "tiny", "--resolution", str(RES),
            "--max-steps", str(STEPS), "--checkpoint-every", "2", "--text-encoder", str(tiny_text_encoder),
            "--mixed-precision", "no", "--quiet", "--stream-from-disk", "--keep-checkpoints", "--resume"]
    assert main(argv) == 0
    assert (folder / "manifest.json").is_file()
    info = json.loads((out / "radsynth.json").read_text())
    mem = json.loads((in_memory_model / "radsynth.json").read_text())
    assert info["data"]["read_from"] == "prepared" and info["data"]["fingerprint"] == mem["data"]["fingerprint"]
    # same images, same weights as in memory
    _assert_same_weights(in_memory_model, out)


def test_npy_rows_writes_what_np_save_writes(tmp_path: Path) -> None:
    """The latent cache and prompt states are written block by block through the file (not a memory map,
    whose written pages count in the process's RSS): the file reads back as np.save's would."""
    from generator.training import _NpyRows

    arr = np.random.default_rng(0).standard_normal((10, 3, 4)).astype(np.float16)
    w = _NpyRows(tmp_path / "a.npy", np.float16, arr.shape)
    w.write(0, arr[:4])
    w.write(4, arr[4:])
    w.close()
    back = np.load(tmp_path / "a.npy", mmap_mode="r", allow_pickle=False)
    assert back.dtype == np.float16 and back.shape == arr.shape and np.array_equal(back, arr)
    w = _NpyRows(tmp_path / "b.npy", np.float32, (5, 2))
    with pytest.raises(ValueError, match="does not follow"):
        w.write(1, np.zeros((2, 2)))  # out of order
    w.write(0, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="2 of 5 rows"):
        w.close()
