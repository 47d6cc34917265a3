"""Fixtures of the stress-test tests: specs, planted-defect classifiers, one thread."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from generator._utils import torch_threads

#: The issue's spec form, with a nuisance attribute (sex) added.
EFFUSION_SPEC: dict[str, Any] = {
    "prompt": "frontal chest radiograph, {finding}, {age} year old {sex}",
    "vary": {
        "finding": ["no acute findings", "moderate left pleural effusion", "moderate right pleural effusion"],
        "sex": ["woman", "man"],
    },
    "fixed": {"age": 60},
    "labels": {"finding": {"no acute findings": 0, "moderate left pleural effusion": 1,
                           "moderate right pleural effusion": 1}},
    "seeds": 16,
}

#: A spec in the tiny test model's 90-word vocabulary (tests/conftest.py): "bright"/"dark" field.
TINY_SPEC: dict[str, Any] = {
    "prompt": "{shade} field, {sex}",
    "vary": {"shade": ["dark", "bright"], "sex": ["woman", "man"]},
    "labels": {"shade": {"dark": 0, "bright": 1}},
    "seeds": 3,
}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread (shared CPUs); restored afterwards."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def spec_data():
    """``spec_data("effusion" | "tiny")``: a fresh copy of :data:`EFFUSION_SPEC` or :data:`TINY_SPEC`."""
    return lambda name: copy.deepcopy({"effusion": EFFUSION_SPEC, "tiny": TINY_SPEC}[name])


@pytest.fixture
def effusion_spec() -> dict[str, Any]:
    """A fresh copy of :data:`EFFUSION_SPEC` to modify."""
    return copy.deepcopy(EFFUSION_SPEC)


@pytest.fixture
def tiny_spec() -> dict[str, Any]:
    """A fresh copy of :data:`TINY_SPEC` to modify."""
    return copy.deepcopy(TINY_SPEC)


def _fixed_tokenizer(folder: Path) -> None:
    """Rewrite the tokenizer of a tiny encoder folder from its vocab.txt. Under transformers 5,
    ``BertTokenizerFast(vocab_file=...)`` (tests/conftest.py) ignores the file, so every word becomes
    [UNK] and every prompt encodes the same (reported); ids follow vocab.txt, as the embedding rows do."""
    from transformers import BertTokenizerFast

    words = (folder / "vocab.txt").read_text().split()
    try:
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True, model_max_length=32)
    except TypeError:  # transformers 4 takes a vocab file
        tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True, model_max_length=32)
    if tok.convert_tokens_to_ids("dark") != words.index("dark"):
        raise RuntimeError("could not build the tiny tokenizer from vocab.txt")
    tok.save_pretrained(folder)


@pytest.fixture(scope="session")
def vocab_model(tmp_path_factory, square_data, tiny_text_encoder) -> Path:
    """Like the session's ``tiny_model`` (16 px, 6 steps of the tiny preset) but with a tokenizer that
    knows its 90 words, so that prompts differ (and the vocabulary check passes)."""
    import shutil

    from generator.data import load_dataset
    from generator.models.config import get_preset
    from generator.training import Trainer

    root = tmp_path_factory.mktemp("vocab_model")
    encoder = root / "encoder"
    shutil.copytree(tiny_text_encoder, encoder)
    _fixed_tokenizer(encoder)
    data = load_dataset(square_data, resolution=16, progress=False)
    Trainer(data, root / "model", get_preset("tiny"), resolution=16, text_encoder=str(encoder),
            seed=0, max_steps=6, progress=False).run()
    return root / "model"


@pytest.fixture(scope="session")
def shortcut_torchscript(tmp_path_factory) -> Path:
    """Planted defect (a): a brightness 'effusion detector' fitted on phantoms where effusion is
    confounded with sex (every positive a man, every negative a woman), saved as TorchScript."""
    from generator.phantoms import render_phantom
    from generator.stress.reference_models import BrightnessShortcut

    images, labels = [], []
    for s in range(1000, 1030):
        side = "right" if s % 2 else "left"
        images.append(render_phantom({"sex": "M", "age": 60, "findings": [
            {"name": "pleural effusion", "location": side, "size": "moderate"}]}, size=64, seed=s).image)
        labels.append(1)
        images.append(render_phantom({"sex": "F", "age": 60, "findings": []}, size=64, seed=s).image)
        labels.append(0)
    model = BrightnessShortcut.fit(np.stack(images), np.array(labels))
    path = tmp_path_factory.mktemp("shortcut") / "shortcut.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return path


@pytest.fixture(scope="session")
def bright_torchscript(tmp_path_factory) -> Path:
    """A TorchScript model for the tiny 16 px generator: score = mean brightness (2 classes)."""

    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([m, 1 - m], dim=1)

    path = tmp_path_factory.mktemp("bright") / "bright.pt"
    torch.jit.save(torch.jit.script(Mean()), str(path))
    return path
