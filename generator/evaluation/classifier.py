"""A small CNN trained on real images: the feature space of the Fréchet distance, and the
synthetic-to-real transfer test (train on synthetic, score on real).

No pretrained network weights are available offline, so the "Fréchet distance" of RadSynth is the
distance between Gaussians fitted to this CNN's penultimate features (see
:mod:`generator.evaluation.metrics`). Images: ``(N, H, W)`` float in ``[0, 1]``, 0 = black.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from generator._utils import torch_threads
from generator.evaluation.metrics import _as_batch, _binary_labels, roc_auc

__all__ = ["Classifier", "train_classifier", "synthetic_to_real_auc"]


class _SmallCNN(nn.Module):
    """Four conv stages (16-32-64-``width``), max-pooling between them, global average pooling."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            stage(1, 16), nn.MaxPool2d(2),
            stage(16, 32), nn.MaxPool2d(2),
            stage(32, 64), nn.MaxPool2d(2),
            stage(64, width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(width, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x))).squeeze(1)


@dataclass
class Classifier:
    """A small binary CNN trained by :func:`train_classifier`.

    Images are resized (bilinear, antialiased) to ``size`` x ``size`` and standardised with the
    training set's pixel mean and standard deviation before the network sees them.

    Attributes:
        net: The trained network (eval mode).
        size: Side the images are resized to.
        mean: Pixel mean of the training images (in ``[0, 1]`` units).
        std: Pixel standard deviation of the training images.
        threads: torch intra-op threads used for inference (``None``: unchanged).
    """

    net: _SmallCNN
    size: int
    mean: float
    std: float
    threads: int | None = None

    @property
    def feature_dim(self) -> int:
        """Width ``D`` of :meth:`features`."""
        return int(self.net.head.in_features)

    def _prepare(self, images: np.ndarray | torch.Tensor, name: str = "images") -> torch.Tensor:
        arr = _as_batch(images, name)
        return _to_input(arr, self.size, self.mean, self.std)

    @torch.no_grad()
    def _run(self, images: np.ndarray | torch.Tensor, fn: str, batch_size: int) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x = self._prepare(images)
        self.net.eval()
        out = []
        with torch_threads(self.threads):
            for i in range(0, x.shape[0], batch_size):
                xb = x[i : i + batch_size]
                out.append(self.net.features(xb) if fn == "features" else torch.sigmoid(self.net(xb)))
        return torch.cat(out).double().numpy()

    def predict_proba(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Probability of class 1 per image.

        Args:
            images: ``(N, H, W)`` in ``[0, 1]``, any size (resized to :attr:`size`).
            batch_size: Images per forward pass.

        Returns:
            ``(N,)`` float64 in ``[0, 1]``.
        """
        return self._run(images, "proba", batch_size)

    def features(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Penultimate-layer features (global-average-pooled last conv stage, before dropout/head).

        Args:
            images: ``(N, H, W)`` in ``[0, 1]``, any size (resized to :attr:`size`).
            batch_size: Images per forward pass.

        Returns:
            ``(N, D)`` float64, ``D =`` :attr:`feature_dim` (non-negative, post-ReLU).
        """
        return self._run(images, "features", batch_size)


def _to_input(arr: np.ndarray, size: int, mean: float, std: float) -> torch.Tensor:
    x = torch.from_numpy(arr.astype(np.float32)).unsqueeze(1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - mean) / std


def train_classifier(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    epochs: int = 10,
    seed: int = 0,
    size: int = 32,
    width: int = 64,
    batch_size: int = 64,
    lr: float = 3e-3,
    max_shift: int = 2,
    flip: bool = False,
    threads: int | None = None,
) -> Classifier:
    """Train a small binary CNN on real images (no pretrained weights; deterministic under ``seed``).

    AdamW with a one-cycle learning rate, class-weighted binary cross-entropy (so an unbalanced set
    is not learned as its majority class), light augmentation: random shifts of up to ``max_shift``
    pixels (zero-padded at the working size) and, if ``flip``, left-right flips (off by default:
    radiographs are not mirror-symmetric). Global torch random state is left untouched.

    Cost: about 3 M multiply-adds per 32x32 image forward; 2,500 images x 10 epochs take roughly
    10-20 s on two CPU cores.

    Args:
        images: ``(N, H, W)`` in ``[0, 1]`` (``(N, 1, H, W)`` accepted), any ``H, W``.
        labels: ``(N,)`` binary labels, both classes present.
        epochs: Passes over the data.
        seed: Seed of initialisation, batch order and augmentation.
        size: Working side; images are resized to ``size`` x ``size`` (>= 8).
        width: Channels of the last conv stage = feature width ``D``.
        batch_size: Images per step.
        lr: Peak learning rate.
        max_shift: Largest random shift in pixels (0 disables).
        flip: Also flip left-right at random.
        threads: torch intra-op threads while training and predicting (``None``: unchanged).

    Returns:
        The trained :class:`Classifier` (eval mode).

    Raises:
        ValueError: bad shapes, non-binary or single-class labels, or a non-positive setting.
    """
    arr = _as_batch(images, "images")
    y = _binary_labels(labels, arr.shape[0])
    for name, value, low in (("epochs", epochs, 1), ("size", size, 8), ("width", width, 1),
                             ("batch_size", batch_size, 1), ("max_shift", max_shift, 0)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    mean = float(arr.mean())
    std = float(arr.std()) or 1.0
    x_all = _to_input(arr, size, mean, std)
    y_all = torch.from_numpy(y.astype(np.float32))
    n = x_all.shape[0]
    pos = float(y.sum())
    pos_weight = torch.tensor((n - pos) / pos)

    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = _SmallCNN(width)
        steps_per_epoch = math.ceil(n / batch_size)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.25)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                xb = _augment(x_all[idx], g, max_shift, flip)
                loss = F.binary_cross_entropy_with_logits(net(xb), y_all[idx], pos_weight=pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
    return Classifier(net=net, size=size, mean=mean, std=std, threads=threads)


def _augment(x: torch.Tensor, g: torch.Generator, max_shift: int, flip: bool) -> torch.Tensor:
    """Random integer shifts (zero padding in standardised units) and optional flips of ``(B,1,S,S)``."""
    b, _, s, _ = x.shape
    if max_shift > 0:
        m = max_shift
        padded = F.pad(x, (m, m, m, m), value=0.0)
        offs = torch.randint(0, 2 * m + 1, (b, 2), generator=g)
        x = torch.stack([padded[i, :, oy : oy + s, ox : ox + s] for i, (oy, ox) in enumerate(offs.tolist())])
    if flip:
        mask = torch.rand(b, generator=g) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def synthetic_to_real_auc(
    syn_images: np.ndarray | torch.Tensor,
    syn_labels: np.ndarray | torch.Tensor,
    real_images: np.ndarray | torch.Tensor,
    real_labels: np.ndarray | torch.Tensor,
    seed: int = 0,
    **classifier_kwargs: object,
) -> float:
    """Train a classifier on synthetic images only and score it on real ones.

    The usual test of whether synthetic data carries the class distinction (compare with the
    same call on real training images: the real-to-real AUC).

    Args:
        syn_images: ``(N_s, H, W)`` synthetic images in ``[0, 1]``.
        syn_labels: ``(N_s,)`` binary labels (the class each image was prompted for).
        real_images: ``(N_r, H', W')`` real images in ``[0, 1]`` (resized like the synthetic ones).
        real_labels: ``(N_r,)`` binary labels.
        seed: Seed of :func:`train_classifier`.
        **classifier_kwargs: Passed to :func:`train_classifier` (``epochs``, ``size``, ``threads``...).

    Returns:
        ROC AUC of the synthetic-trained classifier on the real images.

    Raises:
        ValueError: as :func:`train_classifier` and :func:`roc_auc`.
    """
    clf = train_classifier(syn_images, syn_labels, seed=seed, **classifier_kwargs)  # type: ignore[arg-type]
    real = _as_batch(real_images, "real_images")
    y = _binary_labels(real_labels, real.shape[0], "real_labels")
    return roc_auc(y, clf.predict_proba(real))
