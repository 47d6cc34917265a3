"""How ``scripts/train_demo_model.py`` records the bundled model's history (``radsynth.json`` ``demo``)."""

from __future__ import annotations

import json
from pathlib import Path

from generator.demo import DEMO_MODEL_DIR, demo_settings
from tests.cli.test_demo_volumes import _script


def _folder(path: Path, info: dict) -> Path:
    path.mkdir()
    (path / "radsynth.json").write_text(json.dumps(info))
    return path


def test_a_fine_tune_continues_the_stages_of_its_start(tmp_path):
    script = _script()
    new = {"model_hash": "c" * 16, "training": {"mixed_precision": "bf16"}}
    first = script._stages(None, new, "python scripts/train_demo_model.py --output m", {"vae": 5, "unet": 7})
    assert first == [{"command": "python scripts/train_demo_model.py --output m", "model_hash": "c" * 16,
                      "steps": {"vae": 5, "unet": 7}, "mixed_precision": "bf16"}]
    start = _folder(tmp_path / "start", {"model_hash": "a" * 16, "demo": {"stages": first, "guidance_scale": 4.5}})
    chained = script._stages(str(start), {**new, "model_hash": "d" * 16}, "fine-tune", {"vae": 0, "unet": 3})
    assert [s["model_hash"] for s in chained] == ["c" * 16, "d" * 16]
    assert chained[1]["steps"] == {"vae": 0, "unet": 3} and "fine-tune" in chained[1]["note"]
    assert script._demo_block(start)["guidance_scale"] == 4.5
    # a start made before stages were recorded counts as one stage: its own command
    old = _folder(tmp_path / "old", {"model_hash": "b" * 16, "demo": {"command": "python scripts/train_demo_model.py"}})
    chained = script._stages(str(old), new, "fine-tune", {"unet": 1})
    assert chained[0] == {"command": "python scripts/train_demo_model.py", "model_hash": "b" * 16}
    assert len(chained) == 2


def test_the_bundled_model_records_each_stage_and_its_guidance():
    info = json.loads((DEMO_MODEL_DIR / "radsynth.json").read_text())
    stages = info["demo"]["stages"]
    assert stages[-1]["model_hash"] == info["model_hash"]  # the last stage is the model that ships
    assert all(s["command"].startswith("python scripts/train_demo_model.py") for s in stages)
    _, settings = demo_settings(DEMO_MODEL_DIR)
    assert settings["guidance_scale"] == info["demo"]["guidance_scale"]


def test_the_model_card_names_every_stage():
    info = json.loads((DEMO_MODEL_DIR / "radsynth.json").read_text())
    assert _script().stages_paragraph(info["demo"]) in (DEMO_MODEL_DIR / "README.md").read_text()
