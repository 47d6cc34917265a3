"""The user's model under test: a TorchScript file, an ONNX file or a Python callable.

- TorchScript (any file that ``torch.jit.load`` reads, e.g. ``model.pt``): loaded with
  ``torch.jit.load`` only, never unpickled.
- ONNX (``*.onnx``): run with ``onnxruntime`` when it is installed.
- A callable ``package.module:function`` or ``path/to/file.py:function`` (any object with
  ``__call__``, e.g. an ``nn.Module`` instance).

Every kind takes a ``float32 (B, 1, H, W)`` batch in ``[0, 1]`` (0 = black, MONOCHROME2, patient right on
the image left) and returns a score per class: ``(B, K)`` or ``(B,)`` (one class). The score of class
``class_index`` is compared with the spec's threshold. :meth:`UserClassifier.load` runs the model on a
probe batch, so a model that fails to load, raises, returns the wrong shape, NaN or a non-tensor is
reported before any image is generated.
"""

from __future__ import annotations

import importlib
import importlib.util
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ClassifierKind", "UserClassifier"]


class ClassifierKind(str, Enum):
    """How the user's model is run."""

    TORCHSCRIPT = "torchscript"
    ONNX = "onnx"
    CALLABLE = "callable"


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r} ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for CUDA but torch sees no CUDA device")
    return dev


def _import_callable(ref: str) -> Callable[..., Any]:
    module_name, _, attr = ref.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"--classifier {ref!r}: a callable must be given as package.module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise FileNotFoundError(f"--classifier: {path} does not exist")
            spec = importlib.util.spec_from_file_location(f"_radsynth_user_classifier_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise ValueError(f"--classifier {ref!r}: cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as exc:
        raise ValueError(f"--classifier {ref!r}: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--classifier {ref!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--classifier {ref!r}: {attr} is not callable (got {type(obj).__name__})")
    return obj


class UserClassifier:
    """A loaded, probed model under test.

    Args:
        forward: Maps a ``(B, 1, S, S)`` float32 tensor in ``[0, 1]`` on ``device`` to scores.
        kind: Which loader made it.
        name: The ``--classifier`` argument (file or reference), used in every message.
        device: Where the batches go.
        input_size: Side ``S`` the images are resized to (bilinear, antialiased), or ``None`` to keep
            the generator's size.
        batch_size: Images per call.
        class_index: Which score is the positive class.
    """

    def __init__(self, forward: Callable[[torch.Tensor], Any], *, kind: ClassifierKind, name: str,
                 device: torch.device, input_size: int | None, batch_size: int, class_index: int) -> None:
        if input_size is not None and (isinstance(input_size, bool) or int(input_size) < 1):
            raise ValueError(f"--input-size must be >= 1, got {input_size!r}")
        if int(batch_size) < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size!r}")
        self._forward = forward
        self.kind = kind
        self.name = name
        self.device = device
        self.input_size = None if input_size is None else int(input_size)
        self.batch_size = int(batch_size)
        self.class_index = int(class_index)

    @classmethod
    def load(cls, ref: str, *, device: str = "cpu", input_size: int | None = None, batch_size: int = 32,
             class_index: int = 0, probe_size: int = 64) -> "UserClassifier":
        """Load ``ref`` and run it once on a probe batch.

        Args:
            ref: A TorchScript file, an ``.onnx`` file, or ``package.module:function`` /
                ``file.py:function``.
            device: ``"cpu"`` or ``"cuda[:N]"``.
            input_size: Resize images to this side first (``None``: as generated).
            batch_size: Images per call.
            class_index: Which score is the positive class.
            probe_size: Image side of the probe batch when ``input_size`` is ``None`` (the generator's).

        Raises:
            FileNotFoundError: a file path that does not exist.
            ValueError: the model does not load, raises on the probe, returns a non-tensor, a wrong
                shape, too few classes for ``class_index`` or non-finite scores (naming ``ref``).
        """
        dev = _check_device(device)
        path = Path(ref)
        if path.is_file():
            if path.suffix.lower() == ".onnx":
                forward, kind = cls._onnx(path), ClassifierKind.ONNX
            else:
                forward, kind = cls._torchscript(path, dev), ClassifierKind.TORCHSCRIPT
        elif ":" in ref and path.suffix.lower() not in (".pt", ".pth", ".ts", ".onnx"):
            fn = _import_callable(ref)
            if isinstance(fn, torch.nn.Module):
                fn = fn.to(dev).eval()
            forward, kind = fn, ClassifierKind.CALLABLE
        else:
            raise FileNotFoundError(
                f"--classifier {ref!r}: no such file, and not a package.module:function reference"
            )
        model = cls(forward, kind=kind, name=ref, device=dev, input_size=input_size, batch_size=batch_size,
                    class_index=class_index)
        model.probe(probe_size)
        return model

    @staticmethod
    def _torchscript(path: Path, device: torch.device) -> Callable[[torch.Tensor], Any]:
        try:
            module = torch.jit.load(str(path), map_location=device)
        except Exception as exc:  # torch raises RuntimeError, ValueError or zipfile errors here
            raise ValueError(
                f"--classifier {path}: not a TorchScript file that torch.jit.load reads "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); save the model "
                "with torch.jit.save(torch.jit.script(model), PATH), export it to ONNX, or pass "
                "package.module:function"
            ) from None
        module.eval()
        return module

    @staticmethod
    def _onnx(path: Path) -> Callable[[torch.Tensor], Any]:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError(
                f"--classifier {path}: ONNX models need onnxruntime (pip install onnxruntime)"
            ) from None
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"--classifier {path}: onnxruntime cannot load it ({exc})") from None
        input_name = session.get_inputs()[0].name

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = session.run(None, {input_name: x.detach().cpu().numpy().astype(np.float32)})[0]
            return torch.from_numpy(np.asarray(out))

        return forward

    def _prepare(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True).clamp(0.0, 1.0)
        return x.to(self.device)

    def _run(self, images: np.ndarray, what: str) -> np.ndarray:
        x = self._prepare(images)
        try:
            with torch.no_grad():
                out = self._forward(x)
        except Exception as exc:  # the user's code may raise anything
            raise ValueError(
                f"--classifier {self.name} failed on a {tuple(x.shape)} float32 batch in [0, 1] ({what}): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(out, torch.Tensor):
            raise ValueError(
                f"--classifier {self.name} returned {type(out).__name__}, not a tensor of scores (B, K) ({what})"
            )
        out = out.detach().float().cpu()
        b = x.shape[0]
        if out.ndim == 1 and out.shape[0] == b:
            out = out[:, None]
        if out.ndim != 2 or out.shape[0] != b:
            raise ValueError(
                f"--classifier {self.name} returned shape {tuple(out.shape)} for a batch of {b}; expected "
                f"({b}, K) or ({b},) scores ({what})"
            )
        if out.shape[1] <= self.class_index:
            raise ValueError(
                f"--classifier {self.name} returned {out.shape[1]} score(s) per image but the spec's "
                f"class_index is {self.class_index}"
            )
        scores = out[:, self.class_index].numpy().astype(np.float64)
        if not np.all(np.isfinite(scores)):
            bad = int(np.flatnonzero(~np.isfinite(scores))[0])
            raise ValueError(
                f"--classifier {self.name} returned a non-finite score ({scores[bad]}) for image {bad} ({what})"
            )
        return scores

    def probe(self, size: int) -> None:
        """Run the model on two ``size`` x ``size`` images (grey and noise); raise on any misbehaviour."""
        rng = np.random.default_rng(0)
        batch = np.stack([np.full((size, size), 0.5, np.float32), rng.random((size, size), dtype=np.float32)])
        self._run(batch, "probe batch")

    def scores(self, images: np.ndarray, names: list[str] | None = None) -> np.ndarray:
        """Positive-class scores of ``images``.

        Args:
            images: ``(N, H, W)`` float in ``[0, 1]``.
            names: File names of the images, used in error messages.

        Returns:
            ``(N,)`` float64 scores.

        Raises:
            ValueError: the model misbehaves on a batch (naming the model and the first image).
        """
        arr = np.asarray(images, dtype=np.float32)
        if arr.ndim != 3:
            raise ValueError(f"images must be (N, H, W), got {arr.shape}")
        out = []
        for i in range(0, len(arr), self.batch_size):
            what = f"images {names[i]}..." if names else f"images {i}..{min(i + self.batch_size, len(arr)) - 1}"
            out.append(self._run(arr[i : i + self.batch_size], what))
        return np.concatenate(out) if out else np.zeros(0)

    def describe(self) -> dict[str, Any]:
        """JSON description for the report."""
        return {"model": self.name, "kind": self.kind.value, "device": str(self.device),
                "input_size": self.input_size, "batch_size": self.batch_size, "class_index": self.class_index}
