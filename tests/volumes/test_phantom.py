"""The procedural 3D CT phantom: HU content, determinism, attribute effects, folder round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from generator.volumes.ingest import load_volumes
from generator.volumes.phantom import phantom_attributes, render_ct_phantom, write_phantom_volumes

BASE = {"sex": "F", "age": 50, "findings": []}


def test_deterministic_per_seed():
    a = render_ct_phantom(BASE, shape=24, seed=3)
    b = render_ct_phantom(BASE, shape=24, seed=3)
    c = render_ct_phantom(BASE, shape=24, seed=4)
    np.testing.assert_array_equal(a.array, b.array)
    assert np.abs(a.array - c.array).max() > 10
    assert phantom_attributes(7) == phantom_attributes(7)


def test_tissues_in_hounsfield_units():
    v = render_ct_phantom(BASE, shape=48, seed=0)
    assert v.intensity.unit == "HU" and v.modality == "CT"
    assert v.array[:, 0, 0].max() == pytest.approx(-1000.0)  # corners: air, no noise outside the body
    lung = ((v.array > -950) & (v.array < -700)).mean()
    bone = (v.array > 200).mean()
    soft = ((v.array > -150) & (v.array < 100)).mean()
    assert 0.02 < lung < 0.3 and 0.001 < bone < 0.05 and soft > 0.1
    # lungs lie in the upper (superior, high d) half
    d_lung = np.nonzero((v.array > -950) & (v.array < -700))[0]
    body = v.array > -500
    assert d_lung.mean() > v.shape[0] / 2 and body[:, : v.shape[1] // 5].sum() < body[:, v.shape[1] // 2].sum()


def test_sex_and_age_change_the_anatomy():
    f = render_ct_phantom({**BASE, "sex": "F"}, shape=32, seed=1, noise_hu=0)
    m = render_ct_phantom({**BASE, "sex": "M"}, shape=32, seed=1, noise_hu=0)
    assert (m.array > -500).sum() > 1.05 * (f.array > -500).sum()  # larger body
    young = render_ct_phantom({**BASE, "age": 25}, shape=32, seed=1, noise_hu=0)
    old = render_ct_phantom({**BASE, "age": 85}, shape=32, seed=1, noise_hu=0)
    spine = (young.array > 150) & (young.array < 650)
    assert old.array[spine].mean() < young.array[spine].mean() - 60  # lower bone density


@pytest.mark.parametrize("lobe", ["right upper lobe", "left lower lobe"])
def test_nodule_lies_in_its_lobe(lobe):
    attrs = {**BASE, "findings": [{"name": "nodule", "location": lobe, "size_mm": 30}]}
    with_n = render_ct_phantom(attrs, shape=48, seed=2, noise_hu=0)
    without = render_ct_phantom(BASE, shape=48, seed=2, noise_hu=0)
    changed = np.argwhere(np.abs(with_n.array - without.array) > 100)
    assert len(changed) > 10
    d, _, w = changed.mean(0)
    # w runs patient right -> left: right lobes at low w
    assert (w < 24) == lobe.startswith("right")
    assert "30 mm nodule in the " + lobe in with_n.text


def test_liver_lesion_is_hypodense_in_the_liver():
    attrs = {**BASE, "findings": [{"name": "liver lesion", "size_mm": 40}]}
    v = render_ct_phantom(attrs, shape=48, seed=5, noise_hu=0)
    ref = render_ct_phantom(BASE, shape=48, seed=5, noise_hu=0)
    changed = np.abs(v.array - ref.array) > 20
    assert changed.sum() > 10
    assert np.allclose(ref.array[changed], 65.0) and np.allclose(v.array[changed], 10.0)
    assert "40 mm liver lesion" in v.text


def test_bad_attributes_are_refused():
    with pytest.raises(ValueError, match="location"):
        render_ct_phantom({"findings": [{"name": "nodule", "location": "middle lobe", "size_mm": 9}]})
    with pytest.raises(ValueError, match="size_mm"):
        render_ct_phantom({"findings": [{"name": "liver lesion", "size_mm": 500}]})
    with pytest.raises(ValueError, match="age"):
        render_ct_phantom({"age": "old"})
    with pytest.raises(ValueError, match="findings"):
        phantom_attributes(0, findings=["cardiomegaly"])


def test_folder_round_trip(tmp_path):
    out = write_phantom_volumes(tmp_path / "p", 3, shape=(16, 20, 24), seed=1)
    again = write_phantom_volumes(tmp_path / "q", 3, shape=(16, 20, 24), seed=1)
    assert (out / "phantom_0001.nii.gz").read_bytes() == (again / "phantom_0001.nii.gz").read_bytes()
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    res = load_volumes(out)
    assert len(res.records) == 3 and not res.skipped
    for row, vol in zip(rows, res.records):
        ref = render_ct_phantom({k: row[k] for k in ("sex", "age", "findings", "patient_id")}, shape=(16, 20, 24),
                                seed=row["seed"])
        assert vol.shape == (16, 20, 24) and vol.text == row["text"] == ref.text
        np.testing.assert_allclose(vol.array, np.round(ref.array), atol=0)  # int16 HU on disk
        np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-5)
        assert vol.patient_id == row["patient_id"] and vol.spacing == pytest.approx(row["spacing_mm"])
