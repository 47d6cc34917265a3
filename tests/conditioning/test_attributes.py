"""Attributes read back from prompt text (issue 12): parse_prompt inverts build_prompt and its
paraphrases, the vector keeps side and size apart, and any prompt is accepted."""

from __future__ import annotations

import random

import numpy as np
import pytest

from conditioning.attributes import (
    ATTRIBUTE_DIM, VECTOR_FINDINGS, attribute_vector, parse_prompt, prompt_vectors,
)
from conditioning.prompts import build_prompt, paraphrase_prompt

CASES = [
    {"view": "PA", "sex": "F", "age": 70,
     "findings": [{"name": "pleural effusion", "location": "left", "size": "small"}]},
    {"view": "AP", "sex": "M", "age": 44,
     "findings": [{"name": "nodule", "location": "right upper lobe", "size_mm": 18}]},
    {"view": "PA", "sex": "M", "age": 61, "findings": [{"name": "pneumothorax", "location": "right", "size": "large"},
                                                       {"name": "cardiomegaly"}]},
    {"view": "PA", "sex": "F", "age": 35, "findings": [{"name": "consolidation", "location": "left lower lobe"}]},
    {"view": "PA", "sex": "F", "age": 50, "findings": []},
]


@pytest.mark.parametrize("attrs", CASES)
def test_parse_inverts_build_prompt_and_paraphrases(attrs):
    want = attribute_vector(attrs)
    assert np.array_equal(attribute_vector(parse_prompt(build_prompt(attrs))), want)
    rng = random.Random(0)
    for _ in range(12):
        text = paraphrase_prompt(attrs, rng)
        assert np.array_equal(attribute_vector(parse_prompt(text)), want), text


def test_sides_lobes_and_sizes_give_different_vectors():
    texts = [
        "chest radiograph, left pleural effusion", "chest radiograph, right pleural effusion",
        "chest radiograph, small left pleural effusion", "chest radiograph, large left pleural effusion",
        "chest radiograph, 12 mm nodule in the right upper lobe", "chest radiograph, 25 mm nodule in the right upper lobe",
        "chest radiograph, 12 mm nodule in the left lower lobe", "chest radiograph, left pneumothorax",
    ]
    vecs = prompt_vectors(texts)
    assert vecs.shape == (len(texts), ATTRIBUTE_DIM) and vecs.dtype == np.float32
    assert len({v.tobytes() for v in vecs}) == len(texts)


def test_user_wording_negation_units_and_bilateral():
    p = parse_prompt("AP CXR of an 80-year-old female with bilateral effusions and an enlarged heart; no pneumothorax")
    names = {f["name"]: f for f in p["findings"]}
    assert set(names) == {"pleural effusion", "cardiomegaly"} and p["stated"]
    assert names["pleural effusion"]["location"] == "bilateral"
    assert p["sex"] == "F" and p["age"] == 80
    nod = parse_prompt("1.5 cm lung nodule in the lingula")["findings"][0]
    assert nod == {"name": "nodule", "location": "left upper lobe", "size_mm": 15.0}
    v = attribute_vector(parse_prompt("bilateral pleural effusion"))
    base = 1 + VECTOR_FINDINGS.index("pleural effusion") * 10
    assert v[base] == v[base + 1] == v[base + 2] == 1.0  # present, right, left


def test_null_prompt_unknown_and_normal_differ():
    null, free, normal = prompt_vectors(["", "a chest radiograph", "chest radiograph, no acute findings"])
    assert not null.any() and not free.any()  # nothing stated: "not said", not "absent"
    assert normal[0] == 1.0 and normal[1:-4].sum() == 0  # stated: no finding
    assert parse_prompt("PA chest x-ray, normal study")["stated"]


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="text must be a string"):
        parse_prompt(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompts must be a list"):
        prompt_vectors("left effusion")  # type: ignore[arg-type]
