"""Bootstrap estimates over sets, AUROC, masked SSIM and the seeds-per-CI-width rule, checked against
independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from generator.evaluation.metrics import roc_auc, ssim
from generator.stress.statistics import (
    Estimate, SetBootstrap, ci_half_width, masked_ssim, seeds_for_half_width,
)


def test_ratio_point_is_the_plain_mean_and_ci_brackets_it():
    rng = np.random.default_rng(0)
    x = rng.random(50)
    boot = SetBootstrap(50, 1000, seed=1)
    est = boot.ratio(x, np.ones(50))
    assert est.value == pytest.approx(x.mean())
    assert est.ci_low < est.value < est.ci_high
    # the CI width matches the standard error of a mean (normal approximation)
    assert (est.ci_high - est.ci_low) / 2 == pytest.approx(1.96 * x.std() / np.sqrt(50), rel=0.2)


def test_auroc_point_matches_rank_statistic_with_ties():
    rng = np.random.default_rng(3)
    pos = np.round(rng.normal(1.0, 1.0, (20, 2)), 1)  # rounding makes ties
    neg = np.round(rng.normal(0.0, 1.0, (20, 3)), 1)
    pos[4, 1] = np.nan  # a missing image
    boot = SetBootstrap(20, 200, seed=0)
    got = boot.auroc_values(pos, neg)[0]
    p, n = pos[np.isfinite(pos)], neg.ravel()
    want = roc_auc(np.r_[np.ones(len(p)), np.zeros(len(n))], np.r_[p, n])
    assert got == pytest.approx(want, abs=1e-12)


def test_bootstrap_ci_covers_the_truth_about_95_percent():
    """Coverage of the percentile CI of a rate, over repeated simulated stress tests."""
    rng = np.random.default_rng(7)
    p, n, hits, trials = 0.2, 60, 0, 200
    for t in range(trials):
        x = (rng.random(n) < p).astype(float)
        est = SetBootstrap(n, 400, seed=t).ratio(x, np.ones(n))
        hits += est.ci_low <= p <= est.ci_high
    assert 0.88 <= hits / trials <= 0.99


def test_seeds_per_ci_width_table():
    assert seeds_for_half_width(0.5, 0.1) == 97
    assert seeds_for_half_width(0.1, 0.1) == 35
    for p in (0.05, 0.1, 0.3, 0.5):
        n = seeds_for_half_width(p, 0.05)
        assert ci_half_width(p, n) <= 0.05 < ci_half_width(p, n - 1)
    with pytest.raises(ValueError, match="half_width"):
        seeds_for_half_width(0.5, 0)


def test_masked_ssim_matches_metrics_ssim_and_ignores_the_masked_region():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    assert masked_ssim(a, b) == pytest.approx(ssim(a[None], b[None]), abs=1e-10)
    c = b.copy()
    c[:, 24:] = 1 - c[:, 24:]  # a large change confined to the right quarter
    outside = np.ones((32, 32), bool)
    outside[:, 14:] = False  # the right half (window reach included) may change
    assert masked_ssim(a, c) < masked_ssim(a, b) - 0.1
    assert masked_ssim(a, c, outside) == pytest.approx(masked_ssim(a, b, outside), abs=1e-10)


def test_estimate_helpers():
    assert Estimate(0.3, 0.15, 0.4).beyond(0.1)
    assert not Estimate(0.3, 0.05, 0.4).beyond(0.1)
    assert Estimate(-0.3, -0.5, -0.2).beyond(0.1)
    assert Estimate(float("nan"), float("nan"), float("nan")).to_dict() == {"value": None, "ci_low": None, "ci_high": None}
    with pytest.raises(ValueError, match="--bootstrap"):
        SetBootstrap(10, 10)
