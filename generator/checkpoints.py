"""Training checkpoints: safetensors for tensors, JSON for everything else, never a pickle.

A checkpoint is a folder ``checkpoints/<stage>-<step>/`` holding ``model.safetensors`` (weights),
``optimizer.safetensors`` (AdamW moments, keys ``state.<param index>.<name>``), ``ema.safetensors``
(EMA shadow weights, keys ``shadow.<parameter name>``) and ``state.json`` (step, step budget, optimizer
param groups and scalars, LR scheduler and EMA counters, and the size and SHA-256 of every tensor file).
It is written once, into a hidden temporary folder renamed into place, so a reader never sees half of
one; on reading, every file is checked against ``state.json`` first, and only the three names above
are ever opened. No random-generator state is saved: every draw of the trainer is seeded by
(seed, stage, step, rank), so resuming needs only the step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from generator._utils import sha256_file

__all__ = [
    "CHECKPOINT_FORMAT", "STATE_JSON", "TENSOR_FILES", "write_checkpoint", "read_checkpoint_state",
    "read_checkpoint_tensors", "latest_checkpoint", "optimizer_to_files", "optimizer_from_files",
    "ema_to_files", "ema_from_files", "load_weights", "sha256_file", "json_plain",
]

#: Version of the checkpoint layout (``state.json["format"]``).
CHECKPOINT_FORMAT = 1
STATE_JSON = "state.json"
#: The only files of a checkpoint that are ever read (besides ``state.json``).
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "ema.safetensors")


def json_plain(value: Any) -> Any:
    """Tuples as lists, recursively (what ``json`` writes anyway), so that equality checks agree."""
    if isinstance(value, (list, tuple)):
        return [json_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: json_plain(v) for k, v in value.items()}
    return value


def optimizer_to_files(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (flat keys ``state.<index>.<name>``) and JSON.

    Returns:
        ``(tensors, meta)``: ``meta`` holds ``param_groups`` (hyper-parameters, parameter indices) and
        ``state_scalars`` (non-tensor per-parameter state, by index).
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{int(idx)}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(int(idx)), {})[name] = value
    return tensors, {"param_groups": json_plain(state["param_groups"]), "state_scalars": scalars}


def optimizer_from_files(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], current: Mapping[str, Any]
) -> dict[str, Any]:
    """Inverse of :func:`_optimizer_to_files`; ``current`` (the live optimizer's ``state_dict()``)
    gives the Python types of hyper-parameters (``betas`` is a tuple)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        kind, idx, name = key.split(".", 2)
        if kind != "state" or not idx.isdigit():
            raise ValueError(f"unexpected optimizer tensor {key!r}")
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["state_scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    if len(meta["param_groups"]) != len(current["param_groups"]):
        raise ValueError(
            f"the checkpoint has {len(meta['param_groups'])} optimizer parameter groups, the model "
            f"{len(current['param_groups'])}"
        )
    for saved, live in zip(meta["param_groups"], current["param_groups"]):
        groups.append({k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


def ema_to_files(ema: Any, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a ``diffusers.training_utils.EMAModel``'s state into tensors and JSON.

    Args:
        ema: The EMA of a network's parameters.
        names: The network's parameter names, in ``named_parameters()`` order (the EMA's order).

    Returns:
        ``(tensors, meta)``: shadow weights under ``shadow.<parameter name>``, and the EMA's counters and
        settings (decay, optimization step, warm-up).
    """
    state = ema.state_dict()
    tensors = {f"shadow.{n}": p.detach().cpu().contiguous() for n, p in zip(names, state["shadow_params"])}
    return tensors, {k: v for k, v in state.items() if k != "shadow_params"}


def ema_from_files(ema: Any, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], names: list[str]) -> None:
    """Inverse of :func:`ema_to_files`: load ``tensors`` and ``meta`` into ``ema`` (in place).

    Raises:
        ValueError: the shadow weights do not name exactly the network's parameters ``names``.
    """
    missing = [n for n in names if f"shadow.{n}" not in tensors]
    if missing or len(tensors) != len(names):
        raise ValueError(f"EMA weights do not match the network (missing {missing[:3]}, {len(tensors)} "
                         f"saved for {len(names)} parameters)")
    ema.load_state_dict({**meta, "shadow_params": [tensors[f"shadow.{n}"] for n in names]})


def write_checkpoint(folder: Path, tensors: Mapping[str, Mapping[str, torch.Tensor]], state: dict[str, Any]) -> None:
    """Write ``folder`` atomically: files go to a hidden sibling folder, which is then renamed.

    Args:
        folder: Final checkpoint folder (replaced if it exists).
        tensors: File name (one of ``model/optimizer/ema.safetensors``) -> flat tensor dict.
        state: JSON-serialisable state; ``format`` and ``files`` (size and SHA-256 per file) are added.
    """
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = {}
        for name, flat in tensors.items():
            if name not in TENSOR_FILES:
                raise ValueError(f"checkpoint file name must be one of {TENSOR_FILES}, got {name!r}")
            save_file(dict(flat), str(tmp / name))
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        payload = {"format": CHECKPOINT_FORMAT, **state, "files": files}
        (tmp / STATE_JSON).write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
        old = folder.parent / f".old-{folder.name}-{os.getpid()}"
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_checkpoint_state(folder: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint folder.

    Raises:
        ValueError: the file is missing, truncated or not a RadSynth checkpoint state (the message
            names the file).
    """
    path = Path(folder) / STATE_JSON
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"checkpoint file {str(path)!r} is missing or damaged ({exc}); delete {str(path.parent)!r} to "
            "resume from an earlier checkpoint, or start again with --overwrite"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not isinstance(
        state.get("files"), dict
    ):
        raise ValueError(
            f"checkpoint file {str(path)!r} is not a RadSynth checkpoint state of format {CHECKPOINT_FORMAT}"
        )
    return state


def read_checkpoint_tensors(folder: str | Path, name: str, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Load one safetensors file of a checkpoint after checking its size and SHA-256 against
    ``state["files"]`` (never a pickle: only the names in ``model/optimizer/ema.safetensors`` are read).

    Raises:
        ValueError: the file is not listed, missing, truncated or altered (the message names it).
    """
    if name not in TENSOR_FILES:
        raise ValueError(f"checkpoint file name must be one of {TENSOR_FILES}, got {name!r}")
    path = Path(folder) / name
    expected = state["files"].get(name)
    if not isinstance(expected, dict):
        raise ValueError(f"checkpoint {str(folder)!r} has no {name} in its {STATE_JSON}")
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} is missing")
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise ValueError(
            f"checkpoint file {str(path)!r} is damaged: {size} bytes, {STATE_JSON} says {expected.get('bytes')} "
            "(truncated?)"
        )
    if sha256_file(path) != expected.get("sha256"):
        raise ValueError(f"checkpoint file {str(path)!r} is damaged: its SHA-256 differs from {STATE_JSON}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"checkpoint file {str(path)!r} is not a readable safetensors file ({exc})") from None


def latest_checkpoint(workspace: Path, stage: str) -> Path | None:
    found = [
        p for p in workspace.glob(f"{stage}-*")
        if p.is_dir() and p.name.split("-", 1)[1].isdigit() and (p / STATE_JSON).exists()
    ]
    found.sort(key=lambda p: int(p.name.split("-", 1)[1]))
    return found[-1] if found else None


def load_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    """``model.load_state_dict(tensors)`` with a ``ValueError`` naming the checkpoint on a mismatch."""
    try:
        model.load_state_dict(dict(tensors), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"checkpoint {str(where)!r} does not fit the model: {first}") from None
