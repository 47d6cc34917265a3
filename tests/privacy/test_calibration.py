import math

import numpy as np
import pytest

from privacy.calibration import (
    Calibration,
    conformal_threshold,
    empirical_p_value,
    patient_disjoint_split,
)


@pytest.mark.parametrize("n,alpha", [(135, 0.01), (200, 0.05), (1000, 0.01), (37, 0.1)])
def test_conformal_threshold_matches_independent_computation(n, alpha):
    null = np.random.default_rng(n).normal(size=n)
    k = math.ceil((n + 1) * (1 - alpha))  # independent: the k-th smallest value
    expected = sorted(null.tolist())[min(k, n) - 1]
    thr = conformal_threshold(null, alpha)
    assert thr == pytest.approx(expected)
    # at most alpha of the null lies strictly above the threshold
    assert np.mean(null > thr) <= alpha
    # and the threshold equals numpy's 'higher' quantile at level k/n
    assert thr == pytest.approx(np.quantile(null, (min(k, n) - 1) / (n - 1), method="nearest"))


def test_conformal_threshold_coverage_on_fresh_null():
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(200):
        thr = conformal_threshold(rng.normal(size=99), 0.05)
        rates.append(np.mean(rng.normal(size=1000) > thr))
    assert np.mean(rates) <= 0.05 + 0.01


def test_unresolvable_alpha_uses_max_and_bad_alpha_raises():
    null = np.arange(10.0)
    assert conformal_threshold(null, 0.001) == 9.0
    with pytest.raises(ValueError, match="alpha"):
        conformal_threshold(null, 1.5)
    with pytest.raises(ValueError, match="empty"):
        conformal_threshold(np.array([]), 0.1)


def test_p_value_brute_force():
    null = np.array([0.1, 0.5, 0.5, 0.9])
    scores = np.array([0.0, 0.5, 0.95])
    expected = [(1 + sum(x >= s for x in null)) / 5 for s in scores]
    np.testing.assert_allclose(empirical_p_value(scores, null), expected)


def test_patient_disjoint_split():
    pids = [f"p{i // 3}" for i in range(30)] + [None] * 5
    ref, hold = patient_disjoint_split(pids, 0.25, seed=1)
    assert len(ref) and len(hold) and len(ref) + len(hold) == 35
    ref_p = {pids[i] for i in ref if pids[i] is not None}
    hold_p = {pids[i] for i in hold if pids[i] is not None}
    assert not ref_p & hold_p
    with pytest.raises(ValueError, match="patient"):
        patient_disjoint_split(["a"] * 5)


def test_fused_score_standardizes_and_takes_max():
    null = {"a": np.array([0.0, 1.0, 2.0]), "b": np.array([10.0, 10.0, 13.0])}
    cal = Calibration.fit(null, ["a", "b"])
    za = (np.array([2.0]) - 1.0) / np.std([0.0, 1.0, 2.0])
    zb = (np.array([11.0]) - 11.0) / np.std([10.0, 10.0, 13.0])
    np.testing.assert_allclose(cal.fuse({"a": np.array([2.0]), "b": np.array([11.0])}), max(za[0], zb[0]))
    back = Calibration.from_dict(cal.to_dict())
    np.testing.assert_allclose(back.fused_null, cal.fused_null)
    with pytest.raises(ValueError, match="fused_views"):
        Calibration.fit(null, ["c"])
