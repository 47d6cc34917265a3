"""The demo's check that a sample shows what its prompt asked for, side included."""

from __future__ import annotations

import pytest

from generator.phantoms import render_phantom, text_control_summary

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
    assert summary["left"] == {"n": 3, "shown": 3}
    assert summary["normal"] == {"n": 3, "shown": 3}
    assert summary["asked right, drew left"]["shown"] == 0
    assert summary["asked left, drew normal"]["shown"] == 0


def test_lengths_must_match():
    with pytest.raises(ValueError, match="pair up"):
        text_control_summary([{"text": "x"}], [])
