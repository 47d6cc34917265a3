"""The demo's check that a sample shows what its prompt asked for, side included; side swaps and size
errors against the prompt (issue 12); scripts/eval_text_control.py with stand-in models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from generator.phantoms import render_phantom, text_control_summary
from generator.phantoms.measure import (
    THORAX_WIDTH_MM,
    effusion_grade,
    effusion_grade_mismatch,
    measure,
    nodule_diameter_mm,
    nodule_size_error_mm,
    side_swapped,
)

LEFT = {"sex": "F", "age": 60, "findings": [{"name": "pleural effusion", "location": "left", "size": "large"}]}
RIGHT = {"sex": "F", "age": 60, "findings": [{"name": "pleural effusion", "location": "right", "size": "large"}]}
NORMAL = {"sex": "F", "age": 60, "findings": []}


def test_matching_prompts_are_counted_and_swapped_sides_are_not():
    left = [render_phantom(LEFT, size=64, seed=s).image for s in range(3)]
    normal = [render_phantom(NORMAL, size=64, seed=s).image for s in range(3)]
    lines = ([{"text": "left", "attributes": LEFT}] * 3 + [{"text": "normal", "attributes": NORMAL}] * 3
             + [{"text": "asked right, drew left", "attributes": RIGHT}] * 3
             + [{"text": "asked left, drew normal", "attributes": LEFT}] * 3)
    summary = text_control_summary(lines, left + normal + left + normal)
    assert summary["left"] == {"n": 3, "shown": 3, "swapped": 0}
    assert summary["normal"] == {"n": 3, "shown": 3}  # no side asked: no swap count
    assert summary["asked right, drew left"] == {"n": 3, "shown": 0, "swapped": 3}
    assert summary["asked left, drew normal"] == {"n": 3, "shown": 0, "swapped": 0}  # a miss, not a swap


def test_lengths_must_match():
    with pytest.raises(ValueError, match="pair up"):
        text_control_summary([{"text": "x"}], [])


# ---------------------------------------------------------------------------------------------
# sides and sizes against the prompt (issue 12)
# ---------------------------------------------------------------------------------------------


def _nodule(location: str, size_mm: int | None = None, **base) -> dict:
    f = {"name": "nodule", "location": location}
    if size_mm is not None:
        f["size_mm"] = size_mm
    return {"sex": "M", "age": 55, **base, "findings": [f]}


def _effusion(side: str, size: str | None = "moderate") -> dict:
    f = {"name": "pleural effusion", "location": side}
    if size is not None:
        f["size"] = size
    return {"sex": "F", "age": 60, "findings": [f]}


def test_side_swapped_effusion_and_nodule():
    m = measure(render_phantom(_effusion("left"), size=64, seed=0).image)
    assert side_swapped(m, _effusion("right")) is True
    assert side_swapped(m, _effusion("left")) is False
    assert side_swapped(m, NORMAL) is None
    assert side_swapped(m, {"findings": ["cardiomegaly"]}) is None
    assert side_swapped(m, {"findings": [{"name": "pleural effusion"}]}) is None  # no side asked
    # a nodule drawn in the left lower lobe: swapped for a right-lobe prompt, not for a left one
    n = measure(render_phantom(_nodule("left lower lobe", 24), size=64, seed=1).image)
    assert n.nodule and n.nodule_side == "left"
    assert side_swapped(n, _nodule("right upper lobe")) is True
    assert side_swapped(n, _nodule("left upper lobe")) is False
    # a normal image asked for a right effusion: a miss, not a swap; an invalid image swaps nothing
    normal = measure(render_phantom(NORMAL, size=64, seed=2).image)
    assert side_swapped(normal, _effusion("right")) is False
    assert side_swapped(measure(np.zeros((64, 64), np.float32)), _effusion("right")) is False


def test_nodule_diameter_tells_sizes_apart_on_phantoms():
    sizes = {}
    for mm in (14, 20, 30):
        vals = []
        for s in range(6):
            attrs = _nodule(("right upper lobe", "left lower lobe")[s % 2], mm, sex=("F", "M")[s % 2])
            m = measure(render_phantom(attrs, size=64, seed=100 + s).image)
            assert m.nodule and np.isfinite(m.nodule_sigma_px) and m.nodule_diameter_px > 0
            vals.append(nodule_diameter_mm(m))
            err = nodule_size_error_mm(m, attrs)
            assert err == pytest.approx(abs(vals[-1] - mm))
        sizes[mm] = np.array(vals)
        assert abs(np.mean(vals) - mm) < 3.0, (mm, vals)
    assert sizes[14].mean() + 3 < sizes[20].mean() and sizes[20].mean() + 5 < sizes[30].mean()
    # the thorax is the ruler: a wider assumed thorax scales the diameter
    m = measure(render_phantom(_nodule("right upper lobe", 20), size=64, seed=7).image)
    assert nodule_diameter_mm(m, 2 * THORAX_WIDTH_MM) == pytest.approx(2 * nodule_diameter_mm(m))
    with pytest.raises(ValueError, match="thorax_width_mm"):
        nodule_diameter_mm(m, 0.0)
    # no size asked, or no nodule found: no size error
    assert nodule_size_error_mm(m, _nodule("right upper lobe")) is None
    normal = measure(render_phantom(NORMAL, size=64, seed=7).image)
    assert np.isnan(normal.nodule_diameter_px) and np.isnan(nodule_diameter_mm(normal))
    assert nodule_size_error_mm(normal, _nodule("right upper lobe", 20)) is None


def test_effusion_grade_from_the_costophrenic_rise():
    for k, size in enumerate(("small", "moderate", "large")):
        for side in ("left", "right"):
            m = measure(render_phantom(_effusion(side, size), size=64, seed=20 + k).image)
            assert effusion_grade(m, side) == size
            other = "right" if side == "left" else "left"
            assert effusion_grade(m, other) is None
            assert effusion_grade_mismatch(m, _effusion(side, size)) is False
            wrong = "large" if size != "large" else "small"
            assert effusion_grade_mismatch(m, _effusion(side, wrong)) is True
            assert effusion_grade_mismatch(m, _effusion(other, size)) is None  # not shown there: a miss
            assert effusion_grade_mismatch(m, _effusion(side, None)) is None  # no grade asked
    with pytest.raises(ValueError, match="side"):
        effusion_grade(m, "middle")


# ---------------------------------------------------------------------------------------------
# scripts/eval_text_control.py with stand-in models
# ---------------------------------------------------------------------------------------------


def _script():
    src = Path(__file__).resolve().parents[2] / "scripts" / "eval_text_control.py"
    spec = importlib.util.spec_from_file_location("eval_text_control", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _phantom_model(mirror: bool):
    """A stand-in model that draws the phantom its text was written from (mirrored: sides swapped)."""

    def sample(texts, attrs, base_seed):
        ims = np.stack([render_phantom(a, size=64, seed=base_seed + i).image for i, a in enumerate(attrs)])
        return ims[:, :, ::-1] if mirror else ims

    return sample


def test_evaluate_reports_side_swaps_and_size_errors():
    ev = _script()
    good = {r["prompt"]: r for r in ev.evaluate(_phantom_model(False), 64, 3, seed=5)["rows"]}
    result = ev.evaluate(_phantom_model(True), 64, 3, seed=5)
    mirrored = {r["prompt"]: r for r in result["rows"]}
    assert set(good) == set(ev.CONDITIONS) | {label for label, _, _ in ev.PARAPHRASES}
    for name in ("left pleural effusion", "right pleural effusion", "left pneumothorax", "right pneumothorax"):
        assert good[name]["model"] == 1.0 and good[name]["side_swapped"] == 0.0, good[name]
        assert mirrored[name]["model"] == 0.0 and mirrored[name]["side_swapped"] == 1.0, mirrored[name]
    assert good["nodule, left lower lobe"]["side_swapped"] == 0.0
    assert mirrored["nodule, left lower lobe"]["side_swapped"] >= 2 / 3
    # no side, no swap rate; the normal prompt has no base rate of its own
    assert good["cardiomegaly"]["side_swapped"] is None and good["normal"]["normal_prompt_base_rate"] is None
    assert good["cardiomegaly"]["normal_prompt_base_rate"] == 0.0
    # size columns: nodule MAE in mm, effusion grade mismatch; none for a paraphrase without a size
    assert good["nodule, right upper lobe, 30 mm"]["size_error_kind"] == "nodule_mae_mm"
    assert 0.0 <= good["nodule, right upper lobe, 30 mm"]["size_error_samples"] < 6.0
    assert good["left pleural effusion"]["size_error_kind"] == "effusion_grade_mismatch"
    assert good["left pleural effusion"]["size_error_samples"] == 0.0
    assert good["left pleural effusion"]["size_error_n"] == [3, 3]
    paraphrase = good["paraphrase: lung nodule in the left lower lobe"]
    assert paraphrase["size_error_kind"] is None
    assert paraphrase["example_text"].startswith("PA chest x-ray, lung nodule")
    assert paraphrase["vae_round_trip"] is None and paraphrase["size_error_vae_round_trip"] is None
    table = ev.format_table(result)
    assert ("| prompt | samples showing it | VAE round trip | phantoms | normal-prompt base rate "
            "| side swapped (samples) | size error (samples / VAE round trip / phantoms) |") in table
    assert "| left pleural effusion | 0.00 | – | 1.00 | 0.00 | 1.00 |" in table
    assert " mm |" in table and " grade |" in table and "14 mm: " in table


def test_evaluate_measures_the_phantoms_through_the_round_trip():
    """The VAE round-trip column measures what the round trip returns: identity keeps every finding, a
    mirror puts every sided one on the other side, and a blur erases small nodules and widens large ones."""
    ev = _script()
    ident = {r["prompt"]: r for r in ev.evaluate(_phantom_model(False), 64, 3, seed=5, round_trip=lambda x: x)["rows"]}
    mirror = {r["prompt"]: r for r in ev.evaluate(_phantom_model(False), 64, 3, seed=5,
                                                  round_trip=lambda x: x[:, :, ::-1])["rows"]}
    for name, row in ident.items():
        assert row["vae_round_trip"] == row["phantoms"], name
        assert row["size_error_vae_round_trip"] == row["size_error_phantoms"], name
    assert mirror["left pleural effusion"]["vae_round_trip"] == 0.0
    assert mirror["left pleural effusion"]["model"] == 1.0  # the samples themselves are not touched
    from scipy.ndimage import gaussian_filter

    blurred = {r["prompt"]: r for r in ev.evaluate(
        _phantom_model(False), 64, 3, seed=5, round_trip=lambda x: gaussian_filter(x, (0, 0.8, 0.8)))["rows"]}
    small, large = blurred["nodule, right upper lobe, 14 mm"], blurred["nodule, right upper lobe, 30 mm"]
    assert small["phantoms"] == 1.0 and small["vae_round_trip"] == 0.0 and small["size_error_vae_round_trip"] is None
    assert large["vae_round_trip"] == 1.0 and large["size_error_vae_round_trip"] > large["size_error_phantoms"] + 0.5
    table = ev.format_table({"rows": list(ident.values())})
    assert "| left pleural effusion | 1.00 | 1.00 | 1.00 | 0.00 | 0.00 | 0.00 / 0.00 / 0.00 grade |" in table


def test_script_rejects_bad_arguments():
    ev = _script()
    with pytest.raises(SystemExit):
        ev.main(["--num-images", "0"])
    with pytest.raises(ValueError, match="resolution"):
        ev.evaluate(_phantom_model(False), 16, 2)
