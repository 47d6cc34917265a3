"""The demo's shipped privacy embedder: used only for the phantom set it was trained on."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch

from generator.demo import DEMO_EMBEDDER_FILE, DEMO_MODEL_DIR, DEMO_TRAINING
from generator.phantoms import phantom_reference_set
from privacy.embedding import CopyEmbedder, EmbedderConfig
from radsynth.commands.demo import shipped_embedder


def _save(folder, phantoms):
    torch.manual_seed(0)
    emb = CopyEmbedder(EmbedderConfig(dim=8, width=4))
    emb.save(folder / DEMO_EMBEDDER_FILE, metadata={"phantoms": phantoms})
    return emb


def test_shipped_embedder_only_for_its_own_phantoms(tmp_path):
    phantoms = {"num_images": 30, "size": 32, "seed": 3}
    assert shipped_embedder(tmp_path, phantoms) is None  # no file
    emb = _save(tmp_path, phantoms)
    assert CopyEmbedder.read_metadata(tmp_path / DEMO_EMBEDDER_FILE) == {"phantoms": phantoms}
    got = shipped_embedder(tmp_path, phantoms)
    assert isinstance(got, CopyEmbedder) and got.config == emb.config
    x = np.random.default_rng(0).random((4, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(got.embed(x), emb.embed(x), atol=1e-5)
    for other in ({**phantoms, "num_images": 31}, {**phantoms, "seed": 4}, {**phantoms, "size": 64}):
        assert shipped_embedder(tmp_path, other) is None
    (tmp_path / DEMO_EMBEDDER_FILE).write_bytes(b"not safetensors")
    assert shipped_embedder(tmp_path, phantoms) is None  # damaged: the demo trains one instead
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_saved_embedder_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        _save(tmp_path, {"num_images": 1, "size": 32, "seed": 0})
    finally:
        os.umask(old)
    assert (tmp_path / DEMO_EMBEDDER_FILE).stat().st_mode & 0o777 == 0o640


def test_bundled_model_ships_an_embedder_for_its_training_phantoms():
    path = DEMO_MODEL_DIR / DEMO_EMBEDDER_FILE
    assert path.is_file(), "run: python scripts/train_demo_model.py --embedder-only"
    phantoms = {k: DEMO_TRAINING[k] for k in ("num_images", "size", "seed")}
    assert CopyEmbedder.read_metadata(path) == {"phantoms": phantoms}
    assert path.stat().st_size < 3_000_000


def test_parallel_phantom_rendering_is_identical():
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no forkserver start method on this platform")
    one = phantom_reference_set(70, size=32, seed=5)
    two = phantom_reference_set(70, size=32, seed=5, workers=2)
    np.testing.assert_array_equal(one.images, two.images)
    assert one.ids == two.ids and one.patient_ids == two.patient_ids and one.attributes == two.attributes
    with pytest.raises(ValueError, match="workers"):
        phantom_reference_set(70, size=32, seed=5, workers=0)


def test_demo_settings_read_from_radsynth_json_alone(tmp_path):
    from generator.demo import demo_settings

    size, cfg = demo_settings(DEMO_MODEL_DIR)
    assert size == DEMO_TRAINING["size"] and cfg["num_images"] == DEMO_TRAINING["num_images"]
    (tmp_path / "radsynth.json").write_text('{"resolution": 32, "demo": {"num_images": 7, "seed": 9}}')
    size, cfg = demo_settings(tmp_path)
    assert (size, cfg["num_images"], cfg["seed"]) == (32, 7, 9)
    for text in ("[1, 2]", "{not json", '{"resolution": "64"}'):
        (tmp_path / "radsynth.json").write_text(text)
        with pytest.raises(ValueError, match="radsynth.json"):
            demo_settings(tmp_path)
