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

import warnings

import numpy as np
import torch
from scipy import linalg, ndimage, stats

__all__ = ["frechet_distance", "psnr", "roc_auc", "ssim"]


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
