"""Quality metrics for the benchmarks: PSNR, SSIM, a small CNN trained on real images, Fréchet
distance in its feature space, ROC AUC and synthetic-to-real classifier transfer.

No pretrained network weights are available offline (no Inception, no hub downloads), so the
"Fréchet distance" here is **not FID**: it is the Fréchet distance between Gaussians fitted to the
penultimate-layer features of a small CNN (:func:`train_classifier`) trained on the *real training
split* of the data at hand. Numbers are comparable between runs that use the same classifier (same
data, seed and settings), not with published FID values.

Image convention (as everywhere in RadSynth): a batch is a ``(N, H, W)`` float array with values in
``[0, 1]``, 0 = black.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg, ndimage, stats
from torch import nn

__all__ = [
    "Classifier",
    "frechet_distance",
    "psnr",
    "roc_auc",
    "ssim",
    "synthetic_to_real_auc",
    "train_classifier",
]


# ----------------------------------------------------------------------------------- validation
def _as_batch(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """``x`` as a float64 ``(N, H, W)`` array; ``(N, 1, H, W)`` is squeezed."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, H, W) with N >= 1, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _pair(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_batch(a, "a"), _as_batch(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape, got {x.shape} and {y.shape}")
    return x, y


def _binary_labels(labels: np.ndarray | torch.Tensor, n: int, name: str = "labels") -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per image/score), got {y.shape[0]}")
    uniq = set(np.unique(y).tolist())
    if not uniq <= {0, 1, True, False}:
        raise ValueError(f"{name} must be binary (0/1), got values {sorted(uniq)[:10]}")
    y = y.astype(np.int64)
    if y.min() == y.max():
        raise ValueError(f"{name} must contain both classes 0 and 1, got only {int(y[0])}")
    return y


# ----------------------------------------------------------------------------------- pixel metrics
def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, computed per image and averaged over the batch.

    Args:
        a: ``(N, H, W)`` images in ``[0, data_range]`` (``(N, 1, H, W)`` accepted).
        b: Same shape as ``a``.
        data_range: Peak value (1 for images in ``[0, 1]``).

    Returns:
        Mean over images of ``10 log10(data_range^2 / MSE)``; ``inf`` if any pair is identical.

    Raises:
        ValueError: shapes differ, are not ``(N, H, W)``, or ``data_range`` <= 0.
    """
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    x, y = _pair(a, b)
    mse = np.mean((x - y) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore"):
        per = 10.0 * np.log10(data_range**2 / mse)
    return float(np.mean(per))


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004), per image then averaged over the batch.

    Window: Gaussian, 11x11 taps, sigma 1.5 (the paper's setting; ``scipy.ndimage.gaussian_filter``
    with ``truncate=3.5`` and reflected borders), population (biased) local variances,
    ``K1 = 0.01``, ``K2 = 0.03``; the SSIM map is averaged after cropping the 5-pixel border where
    the window leaves the image. This matches ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range)``.

    Args:
        a: ``(N, H, W)`` images in ``[0, data_range]`` with ``H, W >= 11`` (``(N, 1, H, W)`` accepted).
        b: Same shape as ``a``.
        data_range: Value range of the images.

    Returns:
        Mean SSIM in ``[-1, 1]`` (1 for identical images).

    Raises:
        ValueError: shapes differ, images smaller than 11x11, or ``data_range`` <= 0.
    """
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    x, y = _pair(a, b)
    if min(x.shape[1:]) < 11:
        raise ValueError(f"images must be at least 11x11 for an 11x11 SSIM window, got {x.shape[1:]}")
    sig = (0.0, 1.5, 1.5)

    def filt(z: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(z, sigma=sig, truncate=3.5, mode="reflect")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    vx = filt(x * x) - mx * mx
    vy = filt(y * y) - my * my
    cxy = filt(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = 5
    per = smap[:, pad:-pad, pad:-pad].mean(axis=(1, 2))
    return float(np.mean(per))


# ----------------------------------------------------------------------------------- ranking
def roc_auc(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor) -> float:
    """Area under the ROC curve by the rank (Mann-Whitney U) statistic.

    Equals the probability that a random positive scores higher than a random negative, ties
    counting one half (average ranks).

    Args:
        labels: ``(N,)`` binary labels (1 = positive); both classes must be present.
        scores: ``(N,)`` real scores, higher meaning more likely positive.

    Returns:
        AUC in ``[0, 1]``.

    Raises:
        ValueError: lengths differ, labels not binary or one class missing, non-finite scores.
    """
    s = np.asarray(scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else scores,
                   dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contains NaN or infinite values")
    y = _binary_labels(labels, s.shape[0])
    ranks = stats.rankdata(s)  # average ranks for ties
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# ----------------------------------------------------------------------------------- Fréchet
def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with ``scipy.linalg.sqrtm``. When the
    product is near-singular a ``1e-6`` ridge is added to both covariances; tiny imaginary parts
    from numerical error are dropped.

    This is the formula of FID, but RadSynth applies it to features of a classifier trained on the
    real training split (:meth:`Classifier.features`), since no Inception weights exist offline.

    Args:
        feats_a: ``(N_a, D)`` features, ``N_a >= 2``.
        feats_b: ``(N_b, D)`` features, ``N_b >= 2``.

    Returns:
        The distance (>= 0; 0 for identical sets).

    Raises:
        ValueError: not 2-D, fewer than 2 rows, different ``D``, non-finite values, or a large
            imaginary component in the matrix square root.
    """
    def prep(f: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
        arr = np.asarray(f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N, D) with N >= 2, got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or infinite values")
        return arr

    a, b = prep(feats_a, "feats_a"), prep(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same width D, got {a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # near-singular products handled below
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.all(np.isfinite(covmean)):
            ridge = np.eye(s_a.shape[0]) * 1e-6
            covmean = linalg.sqrtm((s_a + ridge) @ (s_b + ridge))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.imag(np.diag(covmean))))
        scale = max(1.0, float(np.max(np.abs(np.real(np.diag(covmean))))))
        if imag > 1e-3 * scale:
            raise ValueError(f"matrix square root has a large imaginary component ({imag:.3g})")
        covmean = np.real(covmean)
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


# ----------------------------------------------------------------------------------- classifier
@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None``: unchanged)."""
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
        with _threads(self.threads):
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

    with _threads(threads), torch.random.fork_rng(devices=[]):
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
