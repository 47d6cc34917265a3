"""Prompt text from attributes, paraphrases, prompt files, text encoders."""

from __future__ import annotations

import random

import pytest
import torch

from conditioning.prompt_file import read_prompt_file
from conditioning.prompts import (
    attribute_grid,
    build_prompt,
    canonical_finding,
    normalize_findings,
    paraphrase_prompt,
)
from conditioning.text_encoder import encode_prompts, hidden_size, load_text_encoder


def test_canonical_prompt():
    attrs = {"view": "PA", "sex": "F", "age": 70,
             "findings": [{"name": "pleural effusion", "location": "left", "size": "small"}]}
    assert build_prompt(attrs) == "frontal chest radiograph, small left pleural effusion, 70 year old woman"
    assert build_prompt({"findings": [{"name": "nodule", "location": "right upper lobe", "size_mm": 12}],
                         "sex": "M", "age": 8}) == (
        "frontal chest radiograph, 12 mm nodule in the right upper lobe, 8 year old boy")
    assert build_prompt({}) == "frontal chest radiograph, no acute findings"
    assert build_prompt({"modality": "CT", "findings": "nodule"}) == "chest CT, nodule"


def test_paraphrases_keep_content():
    attrs = {"sex": "M", "age": 50, "findings": ["cardiomegaly"]}
    rng = random.Random(0)
    texts = {paraphrase_prompt(attrs, rng) for _ in range(30)}
    assert len(texts) > 3
    for t in texts:
        assert "50 year old" in t
        assert any(s in t for s in ("cardiomegaly", "enlarged heart", "enlarged cardiac silhouette"))


def test_synonyms_and_normalisation():
    assert canonical_finding("Enlarged heart") == "cardiomegaly"
    assert normalize_findings("cardiomegaly; no acute findings") == [{"name": "cardiomegaly"}]
    with pytest.raises(ValueError, match="name"):
        normalize_findings([{"location": "left"}])
    with pytest.raises(ValueError, match="sex"):
        build_prompt({"sex": "X"})
    with pytest.raises(ValueError, match="age"):
        build_prompt({"age": "old"})


def test_attribute_grid_balanced():
    grid = attribute_grid({"findings": [[], ["cardiomegaly"]], "sex": ["F", "M"]}, per_cell=3)
    assert len(grid) == 12
    assert sum(1 for g in grid if g["sex"] == "F" and g["findings"] == ["cardiomegaly"]) == 3
    with pytest.raises(ValueError, match="per_cell"):
        attribute_grid({"sex": ["F"]}, per_cell=0)


def test_prompt_files(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('text,num_images,sex,age,findings\n,2,F,70,"[{""name"": ""nodule"", ""location"": '
                        '""left upper lobe"", ""size_mm"": 10}]"\nfree text,1,,,\n')
    rows = read_prompt_file(csv_path)
    assert rows[0] == ("frontal chest radiograph, 10 mm nodule in the left upper lobe, 70 year old woman",
                       {"sex": "F", "age": "70", "findings": [{"name": "nodule", "location": "left upper lobe",
                                                               "size_mm": 10}]}, 2)
    assert rows[1] == ("free text", None, 1)
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"findings": ["cardiomegaly"], "num_images": 3}\n')
    assert read_prompt_file(jl)[0][2] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"num_images": 0, "text": "x"}\n')
    with pytest.raises(ValueError, match=r"row 1: num_images must be in \[1, 100000\], got 0"):
        read_prompt_file(bad)
    empty_row = tmp_path / "e.jsonl"
    empty_row.write_text('{"num_images": 1}\n')
    with pytest.raises(ValueError, match="neither 'text' nor attribute"):
        read_prompt_file(empty_row)
    with pytest.raises(FileNotFoundError):
        read_prompt_file(tmp_path / "none.csv")


def test_tiny_text_encoder(tiny_text_encoder):
    tok, enc = load_text_encoder(str(tiny_text_encoder))
    assert not any(p.requires_grad for p in enc.parameters())
    h = encode_prompts(tok, enc, ["bright square", ""])
    assert h.shape == (2, 32, hidden_size(enc)) and torch.isfinite(h).all()
    assert not torch.allclose(h[0], h[1])
    with pytest.raises(ValueError, match="list of strings"):
        encode_prompts(tok, enc, "bright square")
    with pytest.raises(FileNotFoundError):
        load_text_encoder("./no/such/folder")


def test_default_text_encoder_offline():
    """The bundled MiniLM loads with no network and separates paraphrases from other findings."""
    tok, enc = load_text_encoder(None)
    h = encode_prompts(tok, enc, ["frontal chest radiograph, cardiomegaly",
                                  "frontal chest radiograph, enlarged heart",
                                  "frontal chest radiograph, left pneumothorax"]).mean(1)
    cos = torch.nn.functional.cosine_similarity
    assert hidden_size(enc) == 384
    assert cos(h[0:1], h[1:2]) > cos(h[0:1], h[2:3])
