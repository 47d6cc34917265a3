"""Loading the user's model: TorchScript, callables, ONNX; every misbehaviour is an error naming it."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from generator.stress.classifier import ClassifierKind, UserClassifier


def _script(tmp_path, body: str, name: str = "m.pt"):
    """A TorchScript file whose forward is ``body`` (TorchScript compiles from a source file)."""
    src = tmp_path / f"src_{abs(hash(body))}.py"
    src.write_text(f"import torch\n\nclass M(torch.nn.Module):\n    def forward(self, x: torch.Tensor):\n"
                   f"        {body}\n")
    spec = importlib.util.spec_from_file_location(src.stem, src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / name
    torch.jit.save(torch.jit.script(module.M()), str(path))
    return path


def test_torchscript_scores_and_resize(tmp_path, bright_torchscript):
    model = UserClassifier.load(str(bright_torchscript), probe_size=16)
    assert model.kind == ClassifierKind.TORCHSCRIPT
    images = np.stack([np.full((16, 16), v, np.float32) for v in (0.1, 0.5, 0.9)])
    assert np.allclose(model.scores(images), [0.1, 0.5, 0.9], atol=1e-6)
    # a model that only accepts 24 px input works once --input-size resizes
    fixed = _script(tmp_path, "assert x.shape[-1] == 24\n        return x.mean(dim=(1, 2, 3))")
    with pytest.raises(ValueError, match="m.pt failed on a \\(2, 1, 16, 16\\)"):
        UserClassifier.load(str(fixed), probe_size=16)
    ok = UserClassifier.load(str(fixed), input_size=24, probe_size=16)
    assert np.allclose(ok.scores(images), [0.1, 0.5, 0.9], atol=1e-5)


def test_class_index_picks_the_score(bright_torchscript):
    model = UserClassifier.load(str(bright_torchscript), class_index=1, probe_size=16)
    assert np.allclose(model.scores(np.full((1, 16, 16), 0.25, np.float32)), [0.75])
    with pytest.raises(ValueError, match="class_index is 2"):
        UserClassifier.load(str(bright_torchscript), class_index=2, probe_size=16)


def test_python_callables(tmp_path):
    mod = tmp_path / "user_model.py"
    mod.write_text("import torch\n\ndef predict(x):\n    return x.amax(dim=(1, 2, 3))\n\nNOT_CALLABLE = 3\n")
    model = UserClassifier.load(f"{mod}:predict", probe_size=16, batch_size=2)
    assert model.kind == ClassifierKind.CALLABLE
    images = np.random.default_rng(0).random((5, 16, 16)).astype(np.float32)
    assert np.allclose(model.scores(images), images.reshape(5, -1).max(axis=1), atol=1e-6)
    ref = UserClassifier.load("generator.stress.reference_models:fair_effusion", probe_size=64)
    assert ref.scores(np.zeros((1, 64, 64), np.float32)).shape == (1,)
    with pytest.raises(ValueError, match="not callable"):
        UserClassifier.load(f"{mod}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        UserClassifier.load(f"{mod}:nope")
    with pytest.raises(ValueError, match="cannot import no_such_pkg"):
        UserClassifier.load("no_such_pkg.models:predict")


@pytest.mark.parametrize(
    "body, message",
    [
        ("return x.mean(dim=(2, 3))[:, :, None]", r"returned shape \(2, 1, 1\)"),
        ("return x.mean(dim=(1, 2, 3))[:1]", r"returned shape \(1,\) for a batch of 2"),
        ("return x.mean(dim=(1, 2, 3)) * float('nan')", "non-finite score"),
        ("return [x.mean()]", "returned list, not a tensor"),
        ("raise RuntimeError('boom')", "boom"),
    ],
)
def test_misbehaving_models_fail_at_load(tmp_path, body, message):
    path = _script(tmp_path, body)
    with pytest.raises(ValueError, match=message) as err:
        UserClassifier.load(str(path), probe_size=16)
    assert str(path) in str(err.value)


def test_files_that_do_not_load(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="weights.pt: not a TorchScript file"):
        UserClassifier.load(str(bad))
    pickled = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, pickled)  # a state dict is not a model: refused, never unpickled
    with pytest.raises(ValueError, match="state.pt: not a TorchScript file"):
        UserClassifier.load(str(pickled))
    with pytest.raises(FileNotFoundError, match="no such file"):
        UserClassifier.load(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="--device"):
        UserClassifier.load(str(bad), device="tpu")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is not None, reason="onnxruntime is installed")
def test_onnx_without_onnxruntime_is_a_clear_error(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08\x07")
    with pytest.raises(ValueError, match="pip install onnxruntime"):
        UserClassifier.load(str(path))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="needs onnxruntime and onnx")
def test_onnx_model_runs(tmp_path):  # pragma: no cover - optional dependency
    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3), keepdim=False)[:, None]

    path = tmp_path / "m.onnx"
    torch.onnx.export(Mean(), torch.zeros(2, 1, 16, 16), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})
    model = UserClassifier.load(str(path), probe_size=16)
    assert model.kind == ClassifierKind.ONNX
    assert np.allclose(model.scores(np.full((3, 16, 16), 0.3, np.float32)), 0.3, atol=1e-6)
