"""Quality metrics (generator.evaluation): small synthetic arrays, fixed seeds, no data files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from generator.evaluation import (
    frechet_distance,
    psnr,
    roc_auc,
    ssim,
    synthetic_to_real_auc,
    train_classifier,
)


def _toy_set(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images; class 1 holds a bright 5x5 blob at a random place, class 0 none."""
    rng = np.random.default_rng(seed)
    x = 0.3 + 0.1 * rng.standard_normal((n, size, size))
    y = np.arange(n) % 2
    for i in np.flatnonzero(y):
        r, c = rng.integers(1, size - 6, size=2)
        x[i, r : r + 5, c : c + 5] += 0.5
    return np.clip(x, 0, 1).astype(np.float32), y


def test_psnr_known_value() -> None:
    a = np.zeros((2, 12, 12))
    b = np.full((2, 12, 12), 0.1)  # MSE 0.01 -> 20 dB
    assert psnr(a, b) == pytest.approx(20.0)
    assert psnr(a, a) == float("inf")
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, b[:, :10])


def test_ssim_identity_and_degradation() -> None:
    rng = np.random.default_rng(1)
    x = rng.random((3, 20, 20))
    assert ssim(x, x) == pytest.approx(1.0)
    noisy = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    assert ssim(x, noisy) < 0.9
    with pytest.raises(ValueError, match="11x11"):
        ssim(x[:, :8, :8], x[:, :8, :8])


def test_ssim_matches_skimage() -> None:
    sk = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    x = rng.random((2, 24, 24))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    ref = np.mean([sk.structural_similarity(x[i], y[i], gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=1.0) for i in range(2)])
    assert ssim(x, y) == pytest.approx(ref, abs=1e-9)


def _brute_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_pairwise_with_ties() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = rng.integers(0, 6, 60).astype(float)  # many ties
    assert roc_auc(labels, scores) == pytest.approx(_brute_auc(labels, scores))
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="binary"):
        roc_auc([0, 2], [0.1, 0.2])


def test_frechet_distance_zero_and_growing() -> None:
    rng = np.random.default_rng(4)
    f = rng.standard_normal((200, 8))
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    d1 = frechet_distance(f, f + 0.1)
    d2 = frechet_distance(f, f * 1.5 + 0.5)
    assert 0.0 < d1 < d2
    assert d1 == pytest.approx(8 * 0.01, rel=1e-6)  # mean shift only
    with pytest.raises(ValueError, match="width"):
        frechet_distance(f, f[:, :4])
    # Rank-deficient covariances (fewer samples than dimensions) still give a finite value.
    assert np.isfinite(frechet_distance(f[:5], f[5:10]))


def test_classifier_separates_toy_set_and_is_deterministic() -> None:
    x, y = _toy_set(160, seed=5)
    xt, yt = _toy_set(80, seed=6)
    clf = train_classifier(x, y, epochs=6, seed=0, size=16, width=16, threads=1)
    p = clf.predict_proba(xt)
    assert p.shape == (80,) and np.all((p >= 0) & (p <= 1))
    assert roc_auc(yt, p) > 0.95
    feats = clf.features(xt)
    assert feats.shape == (80, clf.feature_dim) == (80, 16)
    again = train_classifier(x, y, epochs=6, seed=0, size=16, width=16, threads=1)
    np.testing.assert_array_equal(again.predict_proba(xt), p)
    # Features separate a distorted copy from the original set.
    d_same = frechet_distance(clf.features(xt[:40]), clf.features(xt[40:]))
    d_blur = frechet_distance(clf.features(xt[:40]), clf.features(np.clip(xt[40:] * 0.3, 0, 1)))
    assert d_blur > d_same
    assert synthetic_to_real_auc(x, y, xt, yt, seed=0, epochs=6, size=16, width=16, threads=1) > 0.95


def test_classifier_rejects_bad_input() -> None:
    x, y = _toy_set(10)
    with pytest.raises(ValueError, match="both classes"):
        train_classifier(x, np.zeros(10), epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(x, y, epochs=0)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        train_classifier(x[0], y, epochs=1)
