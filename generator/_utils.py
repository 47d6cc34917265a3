"""Small helpers shared inside ``generator``: option look-up, torch threads, device choice, training precision.

``privacy`` keeps marked copies of :func:`torch_threads` (it imports no other RadSynth package).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator, TypeVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["did_you_mean", "look_up_option", "torch_threads", "best_device", "cpu_only", "check_device", "sha256_file",
           "move_entries", "MIXED_PRECISION", "bf16_supported", "resolve_mixed_precision", "training_autocast"]

T = TypeVar("T", bound=str)


def did_you_mean(value: str, options: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest option to a misspelled ``value``, else ``""``."""
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def look_up_option(value: str, options: Iterable[T], *, name: str) -> T:
    """Return the member of ``options`` equal to ``value`` (MONAI's ``look_up_option``).

    Args:
        value: What the user gave.
        options: The legal values (strings, or a ``StrEnum``'s members).
        name: The argument or flag, used in the error (``"--sampler"``, ``"preset"``).

    Raises:
        ValueError: ``value`` is not an option; the message names ``name``, the value, the
            options and the closest one.
    """
    opts = list(options)
    for o in opts:
        if value == o:
            return o
    raise ValueError(
        f"{name} must be one of {[str(o) for o in opts]}, got {value!r}{did_you_mean(str(value), opts)}"
    )


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None``: unchanged).

    Raises:
        ValueError: ``n`` is smaller than 1.
    """
    if n is None:
        yield
        return
    if int(n) < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def best_device() -> str:
    """``"cuda"`` if available, else ``"mps"`` if available, else ``"cpu"``."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_only() -> bool:
    """True when no accelerator is present.

    ``accelerate`` then needs ``cpu=True`` to run several processes (``torchrun`` or
    ``accelerate launch``) as a gloo data-parallel group instead of independent single runs.
    """
    return best_device() == "cpu"


def check_device(device: str) -> str:
    """Check that a requested torch device exists here.

    Raises:
        ValueError: the device is unknown or not available on this machine (naming it).
    """
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda or mps, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was asked for but MPS is not available on this machine")
    return str(device)


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file's bytes (read in ``block``-byte pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def move_entries(staging: Path, output: Path) -> None:
    """Move every file and folder of ``staging`` into ``output``, replacing same-named ones (the last
    step of writing a model folder: each entry appears whole, under its final name). Every file first
    gets the mode the umask gives (:func:`umask_file_mode`): safetensors writes weights private (0o600)."""
    import os
    import shutil

    mode = umask_file_mode()
    for f in staging.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)
    for entry in sorted(staging.iterdir()):
        dest = output / entry.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(entry, dest)


def umask_file_mode() -> int:
    """The mode a new file gets from ``open``: ``0o666 & ~umask`` (reads the process umask)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: Values of ``mixed_precision``; ``"auto"`` picks ``"bf16"`` where the hardware runs it natively.
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CUDA with bf16; CPUs with AMX or AVX512-BF16).

    CPUs without those instructions emulate bfloat16 and are slower than float32, so this says no.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def resolve_mixed_precision(value: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where :func:`bf16_supported`, else ``"no"``; other values unchanged.

    Raises:
        ValueError: ``value`` is not one of :data:`MIXED_PRECISION`, or ``"bf16"`` on a device that
            does not support it natively.
    """
    if value not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {value!r}")
    if value == "auto":
        return "bf16" if bf16_supported(device) else "no"
    if value == "bf16" and not bf16_supported(device):
        raise ValueError(
            f"mixed_precision 'bf16' needs a device with native bfloat16 ({device} has none); use 'no'"
        )
    return value


def training_autocast(mixed_precision: str, device: torch.device) -> ContextManager[Any]:
    """Context of a training forward pass. With ``"bf16"``: ``torch.autocast`` to bfloat16 and, on a
    CPU, the plain (math) attention kernel, because PyTorch's fused flash-attention backward is slower in
    bf16 than in fp32 there while the math kernel's matrix products use the bf16 units
    (``scripts/bench_train.py --step-timing``: 2D UNet step 1.5x faster than fp32, flash 0.9x). Any other
    value: nothing (fp16 is ``accelerate``'s job, with its gradient scaler).

    Applied by the trainers rather than by ``accelerate``, whose process-wide state would refuse a
    second trainer with another ``mixed_precision`` in the same process.
    """
    if mixed_precision != "bf16":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
    if device.type == "cpu":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack
