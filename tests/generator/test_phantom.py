"""Phantom chest radiographs (generator.phantoms) and the measurement that checks them
(generator.phantoms.measure), plus the ``radsynth phantoms`` verb.

Image frame: patient right on the image left, so a *left* finding lives in the image's right half.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conditioning.prompts import build_prompt
from generator.phantoms import (
    LOBES,
    PHANTOM_FINDINGS,
    PhantomImage,
    phantom_seed,
    read_phantom_metadata,
    render_phantom,
    sample_attributes,
    write_phantom_folder,
)
from generator.phantoms.measure import Measurement, matches_prompt, measure

ADULT_M = {"modality": "DX", "view": "PA", "sex": "M", "age": 50}


def _with(finding, **base) -> dict:
    attrs = dict(ADULT_M, **base)
    attrs["findings"] = [finding] if finding else []
    return attrs


def _lower_lateral_zone(img: np.ndarray, side: str) -> np.ndarray:
    """Lower lateral lung zone box of a 64 px phantom on the patient's ``side``."""
    n = img.shape[0]
    rows = slice(int(0.62 * n), int(0.74 * n))
    cols = slice(int(0.14 * n), int(0.28 * n)) if side == "right" else slice(int(0.72 * n), int(0.86 * n))
    return img[rows, cols]


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------


def test_image_contract_and_determinism():
    a = render_phantom(_with("cardiomegaly"), size=64, seed=3)
    b = render_phantom(_with("cardiomegaly"), size=64, seed=3)
    c = render_phantom(_with("cardiomegaly"), size=64, seed=4)
    assert isinstance(a, PhantomImage)
    assert a.image.shape == (64, 64) and a.image.dtype == np.float32
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    np.testing.assert_array_equal(a.image, b.image)
    assert np.abs(a.image - c.image).mean() > 0.01
    # looks like a chest film: dark air outside the body, dark lungs, bright abdomen
    assert a.image[:4, :8].mean() < 0.05
    assert a.image[int(0.9 * 64), 24:40].mean() > 0.6
    assert a.image[a.lung_mask].mean() < 0.45


def test_sizes_and_speed():
    img128 = render_phantom(_with(None), size=128, seed=1).image
    assert img128.shape == (128, 128)
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        render_phantom(_with({"name": "nodule", "location": "left upper lobe", "size_mm": 20}), 128, seed=i)
        times.append(time.perf_counter() - t0)
    assert np.median(times) < 0.25  # ~30 ms on the reference machine; loose for shared CPUs


def test_cardiomegaly_ctr():
    for seed in range(6):
        big = render_phantom(_with("cardiomegaly"), seed=seed)
        normal = render_phantom(_with(None), seed=seed)
        child = render_phantom(_with(None, age=6), seed=seed)
        assert big.ctr > 0.55
        assert normal.ctr < 0.5 and child.ctr < 0.5
        assert big.heart_width_px > normal.heart_width_px


@pytest.mark.parametrize("side", ["left", "right"])
def test_effusion_on_named_side(side):
    other = "right" if side == "left" else "left"
    for size in ("small", "moderate", "large"):
        ph = render_phantom(_with({"name": "pleural effusion", "location": side, "size": size}), seed=11)
        assert ph.effusion_sides == (side,)
        fluid = _lower_lateral_zone(ph.image, side).mean()
        air = _lower_lateral_zone(ph.image, other).mean()
        assert fluid > air + 0.06, (size, fluid, air)


def test_nodule_where_the_text_says():
    for i, lobe in enumerate(LOBES):
        ph = render_phantom(_with({"name": "nodule", "location": lobe, "size_mm": 20}), seed=20 + i)
        r, c = ph.nodule_center_px
        n = ph.image.shape[0]
        # side: patient right = image left
        assert (c < n / 2) == lobe.startswith("right"), (lobe, c)
        # mm are real: radius = 10 mm / spacing
        assert ph.nodule_radius_px == pytest.approx(10.0 / ph.pixel_spacing_mm, rel=1e-4)
        yy, xx = np.mgrid[:n, :n]
        d = np.hypot(yy - r, xx - c)
        inside = ph.image[d <= max(1.0, 0.7 * ph.nodule_radius_px)].mean()
        ring = ph.image[(d >= ph.nodule_radius_px + 1.5) & (d <= ph.nodule_radius_px + 3.5)].mean()
        assert inside > ring + 0.1, (lobe, inside, ring)
        # upper lobe nodules sit higher than lower lobe nodules
        if "upper" in lobe:
            assert r < 0.5 * n
        if "lower" in lobe:
            assert r > 0.3 * n


def test_pneumothorax_and_consolidation_sides():
    for side in ("left", "right"):
        other = "right" if side == "left" else "left"
        ph = render_phantom(_with({"name": "pneumothorax", "location": side, "size": "moderate"}), seed=5)
        assert ph.pneumothorax_sides == (side,)
        m = measure(ph.image)
        assert m.pneumothorax[side] and not m.pneumothorax[other]
    normal = render_phantom(_with(None), seed=6).image
    for lobe in LOBES:
        ph = render_phantom(_with({"name": "consolidation", "location": lobe}), seed=6)
        assert ph.consolidation_lobes == (lobe,)
        half = slice(0, 32) if lobe.startswith("right") else slice(32, 64)
        assert ph.image[:, half].mean() > normal[:, half].mean() + 0.02, lobe


def test_proportions_vary_with_sex_and_age():
    def stats(sex, age):
        phs = [render_phantom({"sex": sex, "age": age, "findings": []}, seed=s) for s in range(8)]
        width = np.mean([p.thorax_width_px for p in phs])
        aspect = np.mean([p.thorax_height_px / p.thorax_width_px for p in phs])
        mm = np.mean([p.thorax_width_px * p.pixel_spacing_mm for p in phs])
        return width, aspect, mm

    man, woman, child = stats("M", 40), stats("F", 40), stats("M", 5)
    assert man[0] > woman[0]  # wider thorax on the film
    assert man[2] > woman[2] > child[2]  # and in mm
    assert child[1] < man[1]  # children: wider, shorter chest
    # breast shadows for adult women only
    assert render_phantom({"sex": "F", "age": 40}, seed=1).breast_shadow > 0
    assert render_phantom({"sex": "F", "age": 10}, seed=1).breast_shadow == 0
    assert render_phantom({"sex": "M", "age": 40}, seed=1).breast_shadow == 0


def test_sample_attributes_mix():
    rng = np.random.default_rng(0)
    draws = [sample_attributes(rng) for _ in range(400)]
    normal = np.mean([not d["findings"] for d in draws])
    assert 0.22 < normal < 0.38
    names = {f["name"] for d in draws for f in d["findings"]}
    assert names == set(PHANTOM_FINDINGS)
    assert any(len(d["findings"]) == 2 for d in draws)
    assert all(d["modality"] == "DX" and d["view"] == "PA" and d["sex"] in ("F", "M") for d in draws)
    assert any(d["age"] < 18 for d in draws) and all(2 <= d["age"] <= 90 for d in draws)
    for d in draws[:50]:
        build_prompt(d)  # the schema of conditioning.prompts
        render_phantom(d, size=32, seed=1)


@pytest.mark.parametrize(
    "attrs, match",
    [
        ({"findings": ["pneumonia"]}, "findings"),
        ({"findings": [{"name": "pleural effusion", "location": "both"}]}, "location"),
        ({"findings": [{"name": "pneumothorax", "location": "left", "size": "huge"}]}, "size"),
        ({"findings": [{"name": "nodule", "location": "right lingula"}]}, "location"),
        ({"findings": [{"name": "nodule", "location": "left upper lobe", "size_mm": 500}]}, "size_mm"),
    ],
)
def test_bad_findings_raise(attrs, match):
    with pytest.raises(ValueError, match=match):
        render_phantom(attrs)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="size"):
        render_phantom(ADULT_M, size=8)
    with pytest.raises(ValueError, match="num_images"):
        write_phantom_folder(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="p_normal"):
        sample_attributes(0, p_normal=1.5)
    with pytest.raises(ValueError, match="2D"):
        measure(np.zeros(64))
    with pytest.raises(ValueError, match="NaN"):
        measure(np.full((64, 64), np.nan))


# ---------------------------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------------------------


def test_folder_layout_and_overwrite(tmp_path):
    out = write_phantom_folder(tmp_path / "ph", 6, size=64, seed=2)
    rows = read_phantom_metadata(out)
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == len(lines) == 6
    assert sorted(p.name for p in out.iterdir()) == sorted([r["file_name"] for r in rows] + ["metadata.jsonl"])
    for i, row in enumerate(rows):
        assert set(row) >= {"file_name", "text", "patient_id", "modality", "view", "sex", "age", "findings", "label"}
        assert row["text"] == build_prompt(row)
        assert row["patient_id"].startswith("PHANTOM-")
        assert row["label"] == (row["findings"][0]["name"] if row["findings"] else "normal")
        assert row["seed"] == phantom_seed(2, i)
        with Image.open(out / row["file_name"]) as im:
            assert im.mode == "L" and im.size == (64, 64)
            pixels = np.asarray(im)
        # the stored pixels are the rendered image, 8-bit, regenerable from the seed
        again = render_phantom(row, size=64, seed=row["seed"]).image
        assert np.abs(pixels / 255.0 - again).max() <= 0.5 / 255 + 1e-6
    assert len({r["patient_id"] for r in rows}) == 6

    with pytest.raises(FileExistsError, match="not empty"):
        write_phantom_folder(out, 3, seed=2)
    first = (out / rows[0]["file_name"]).read_bytes()
    write_phantom_folder(out, 3, seed=2, overwrite=True)  # fewer images: stale files removed
    assert len(read_phantom_metadata(out)) == 3
    assert len(list(out.glob("phantom_*.png"))) == 3
    assert (out / rows[0]["file_name"]).read_bytes() == first  # deterministic
    assert not list(out.glob(".*tmp"))


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def test_measurement_agrees_with_ground_truth():
    rng = np.random.default_rng(42)
    requests = {
        "normal": None,
        "cardiomegaly": "cardiomegaly",
        "pleural effusion": lambda: {
            "name": "pleural effusion", "location": str(rng.choice(["left", "right"])),
            "size": str(rng.choice(["small", "moderate", "large"]))},
        "nodule": lambda: {
            "name": "nodule", "location": str(rng.choice(LOBES)), "size_mm": int(rng.integers(14, 31))},
        "pneumothorax": lambda: {
            "name": "pneumothorax", "location": str(rng.choice(["left", "right"])), "size": "small"},
        "consolidation": lambda: {"name": "consolidation", "location": str(rng.choice(LOBES))},
    }
    n = 10
    for key, make in requests.items():
        hits = []
        ctr_err = []
        for i in range(n):
            base = sample_attributes(rng, p_normal=1.0)
            finding = make() if callable(make) else make
            attrs = dict(base, findings=[finding] if finding else [])
            ph = render_phantom(attrs, size=64, seed=1000 + i)
            m = measure(ph.image)
            assert isinstance(m, Measurement) and m.valid
            result = matches_prompt(m, attrs)
            hits.append(result["normal" if finding is None else key])
            if key in ("normal", "cardiomegaly"):
                ctr_err.append(abs(m.ctr - ph.ctr))
        assert np.mean(hits) >= 0.8, (key, hits)
        if ctr_err:
            assert np.mean(ctr_err) < 0.04, (key, ctr_err)


def test_measure_on_128_px_and_matches_prompt_keys():
    # (a moderate or large LEFT effusion hides the left heart border, silhouette sign, and then the
    # CTR cannot be measured, as on a real film; a small right one leaves both borders visible)
    attrs = _with({"name": "pleural effusion", "location": "right", "size": "small"})
    attrs["findings"].append("cardiomegaly")
    ph = render_phantom(attrs, size=128, seed=9)
    m = measure(ph.image)
    assert m.effusion["right"] and not m.effusion["left"]
    res = matches_prompt(m, attrs)
    assert set(res) == {"pleural effusion", "cardiomegaly"}
    assert res["pleural effusion"] and res["cardiomegaly"]
    # a paraphrase of the same finding is matched the same way
    assert matches_prompt(m, {"findings": ["enlarged heart"]}) == {"cardiomegaly": True}
    # an image of nothing: invalid, matches nothing
    blank = measure(np.zeros((64, 64), np.float32))
    assert not blank.valid
    assert matches_prompt(blank, {"findings": []}) == {"normal": False}


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def test_cli_phantoms_end_to_end(tmp_path, capsys):
    from radsynth.cli import main

    out = tmp_path / "cli"
    assert main(["phantoms", "--num-images", "4", "--output", str(out), "--seed", "1"]) == 0
    assert str(out) in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((out / r["file_name"]).is_file() for r in rows)
    # refusing a non-empty folder is an error message and exit status 2
    assert main(["phantoms", "--num-images", "2", "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["phantoms", "--num-images", "2", "--output", str(out), "--overwrite", "--size", "32"]) == 0
    with Image.open(out / "phantom_000000.png") as im:
        assert im.size == (32, 32)
