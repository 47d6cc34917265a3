"""Reference classifiers with known behaviour, to check that a stress test finds what it should.

Each takes a ``float32 (B, 1, H, W)`` batch in ``[0, 1]`` (``H, W >= 32``) and returns ``(B, 1)`` scores of
"pleural effusion" with decision threshold 0.5, like any model under test
(``--classifier generator.stress.reference_models:fair_effusion``):

- :func:`fair_effusion`: the classical measurement :func:`generator.phantoms.measure` wrapped as a
  model (score = largest costophrenic-angle rise / 2, so 0.5 is the measurement's own call). Fair:
  it looks at both sides and at nothing else.
- :func:`left_blind_effusion`: the same, counting the patient's right side only; blind to the left
  hemithorax (a planted defect).
- :class:`BrightnessShortcut`: decides from the mean brightness of the lower half of the image, with a
  threshold fitted by :meth:`BrightnessShortcut.fit` on a training set where effusion is confounded
  with sex (a planted shortcut: lower-zone brightness depends on body habitus and breast shadows).
  It is a ``torch.nn.Module`` that ``torch.jit.script`` compiles.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from generator.phantoms import measure

__all__ = ["fair_effusion", "left_blind_effusion", "BrightnessShortcut"]


def _effusion_scores(x: torch.Tensor, sides: tuple[str, ...]) -> torch.Tensor:
    images = x.detach().float().cpu().numpy()[:, 0]
    out = np.zeros((len(images), 1), dtype=np.float32)
    for i, img in enumerate(images):
        m = measure(img)
        if m.valid:
            out[i, 0] = float(np.clip(max(m.effusion_score[s] for s in sides) / 2.0, 0.0, 1.0))
    return torch.from_numpy(out)


def fair_effusion(x: torch.Tensor) -> torch.Tensor:
    """Effusion score of either side: ``(B, 1, H, W)`` in ``[0, 1]`` -> ``(B, 1)`` in ``[0, 1]``."""
    return _effusion_scores(x, ("right", "left"))


def left_blind_effusion(x: torch.Tensor) -> torch.Tensor:
    """Effusion score of the patient's right side only (blind to the left hemithorax)."""
    return _effusion_scores(x, ("right",))


class BrightnessShortcut(nn.Module):
    """``sigmoid((mean of the lower half - centre) / scale)``: an effusion "detector" that reads brightness.

    Args:
        centre: Brightness at which the score is 0.5.
        scale: Brightness change that moves the logit by 1 (> 0).

    Raises:
        ValueError: ``scale`` not positive.
    """

    def __init__(self, centre: float = 0.5, scale: float = 0.01) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.register_buffer("centre", torch.tensor(float(centre)))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> ``(B, 1)`` scores in ``(0, 1)``."""
        h = x.shape[-2]
        lower = x[:, :, h // 2 :, :].mean(dim=(1, 2, 3))
        return torch.sigmoid((lower - self.centre) / self.scale)[:, None]

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray) -> "BrightnessShortcut":
        """Fit the threshold between the two classes' mean lower-half brightness.

        Args:
            images: ``(N, H, W)`` in ``[0, 1]``.
            labels: ``(N,)`` 0/1, both present.

        Raises:
            ValueError: shapes differ or a class is missing.
        """
        x = np.asarray(images, dtype=np.float64)
        y = np.asarray(labels).reshape(-1)
        if x.ndim != 3 or len(x) != len(y):
            raise ValueError(f"images must be (N, H, W) with one label each, got {x.shape} and {y.shape}")
        if set(np.unique(y).tolist()) != {0, 1}:
            raise ValueError("labels must contain both classes 0 and 1")
        feat = x[:, x.shape[1] // 2 :, :].mean(axis=(1, 2))
        m0, m1 = feat[y == 0].mean(), feat[y == 1].mean()
        if m1 < m0:
            raise ValueError("the positive class is darker on average; this shortcut reads 'brighter = positive'")
        return cls(centre=float((m0 + m1) / 2), scale=max(float(feat.std()), 1e-4) / 4)
