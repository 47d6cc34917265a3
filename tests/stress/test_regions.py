"""Where a change should act: zones, mask files, phantom-derived regions; reading phantom prompts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from generator.stress.phantom_source import PhantomSource, prompt_attributes
from generator.stress.regions import RegionMaps, Zone, check_region_entry


def test_zones_follow_patient_sides():
    left = Zone.LEFT_HEMITHORAX.mask(8)
    assert left[:, 4:].all() and not left[:, :4].any()  # patient left = image right
    lower_right = Zone.RIGHT_LOWER_ZONE.mask(8)
    assert lower_right[4:, :4].all() and lower_right.sum() == 16


def test_mask_files_and_union_of_values(tmp_path):
    m = np.zeros((32, 32), np.uint8)
    m[:16, :] = 255
    Image.fromarray(m).save(tmp_path / "top.png")
    entry = check_region_entry("top.png", "regions.x.a", tmp_path / "spec.yaml")
    maps = RegionMaps({"x": {"a": entry, "b": "left_lower_zone"}}, size=16)
    union = maps.mask("x", "a", "b", "p a", "p b")
    assert union[:8].all() and union[8:, 8:].all() and not union[8:, :8].any()
    assert maps.mask("x", "c", "d", "", "") is None
    with pytest.raises(ValueError, match="regions.x.a is neither a zone"):
        check_region_entry("left_lung", "regions.x.a", None)


def test_phantom_region_of_a_left_effusion_is_left_and_low():
    maps = RegionMaps("phantom", size=64)
    region = maps.mask("finding", "no acute findings", "moderate left pleural effusion",
                       "frontal chest radiograph, no acute findings, 60 year old woman",
                       "frontal chest radiograph, moderate left pleural effusion, 60 year old woman")
    assert region is not None and 0 < region.mean() < 0.5
    rows, cols = np.nonzero(region)
    assert cols.mean() > 32 and rows.mean() > 32  # image right (patient left), lower half


def test_prompt_attributes_and_phantom_source():
    attrs = prompt_attributes("frontal chest radiograph, moderate left pleural effusion, 60 year old woman")
    assert attrs["sex"] == "F" and attrs["age"] == 60
    assert attrs["findings"] == [{"size": "moderate", "location": "left", "name": "pleural effusion"}]
    assert prompt_attributes("PA chest x-ray, no acute findings, man")["findings"] == []
    nodule = prompt_attributes("chest radiograph, 20 mm nodule in the right upper lobe, 8 year old boy")
    assert nodule["findings"][0]["location"] == "right upper lobe" and nodule["age"] == 8
    with pytest.raises(ValueError, match="cannot draw 'hemothorax'"):
        PhantomSource(64).check_prompts(["frontal chest radiograph, hemothorax, woman"])
    with pytest.raises(ValueError, match="resolution"):
        PhantomSource(16)
