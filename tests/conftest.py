"""Shared fixtures: tiny real components under fixed seeds (no mocks, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WORDS = (
    "frontal chest radiograph x-ray pa ap lateral no acute findings normal study abnormality "
    "cardiomegaly enlarged heart cardiac silhouette pleural effusion fluid small moderate large left right "
    "nodule pulmonary lung mm in the upper middle lower lobe pneumothorax collapsed air consolidation "
    "airspace opacity lobar pneumonia year old woman man female male girl boy patient bright square dark "
    "field with and , 1 2 3 4 5 6 7 8 9 0"
).split()


def make_tiny_text_encoder(folder: Path) -> Path:
    """A randomly initialised 1-layer BERT (hidden size 16) with a 90-word vocabulary, saved to
    ``folder`` so that ``transformers.AutoModel/AutoTokenizer.from_pretrained(folder)`` load it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # ``vocab=`` (transformers 5 ignores ``vocab_file=`` here and would map every word to [UNK])
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=32)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def make_square_folder(folder: Path, n: int = 24, size: int = 24, seed: int = 0) -> Path:
    """An imagefolder of 8-bit PNGs: odd images hold a bright square ("bright square"), even ones
    are dark ("dark field"); two images per patient id."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as fh:
        for i in range(n):
            im = np.full((size, size), 20, np.int32)
            if i % 2:
                lo, hi = size // 4, 3 * size // 4
                im[lo:hi, lo:hi] = 220
            im = np.clip(im + rng.integers(0, 20, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(folder / f"img{i:03d}.png")
            text = "bright square" if i % 2 else "dark field"
            fh.write(json.dumps({"file_name": f"img{i:03d}.png", "text": text, "patient_id": f"P{i // 2}"}) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory) -> Path:
    """Folder of a tiny random BERT text encoder + tokenizer."""
    return make_tiny_text_encoder(tmp_path_factory.mktemp("tiny_text_encoder"))


@pytest.fixture(scope="session")
def square_data(tmp_path_factory) -> Path:
    """A 24-image imagefolder (see :func:`make_square_folder`)."""
    return make_square_folder(tmp_path_factory.mktemp("square_data"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, square_data, tiny_text_encoder) -> Path:
    """A model folder trained for a few steps of the ``tiny`` preset at 16 px."""
    from generator.models.config import get_preset
    from generator.data import load_dataset
    from generator.training import Trainer

    out = tmp_path_factory.mktemp("tiny_model")
    data = load_dataset(square_data, resolution=16, progress=False)
    Trainer(data, out, get_preset("tiny"), resolution=16, text_encoder=str(tiny_text_encoder),
            seed=0, max_steps=6, progress=False, mixed_precision="no").run()  # same weights on every CPU
    return out
