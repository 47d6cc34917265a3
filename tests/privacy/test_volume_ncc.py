"""The 3D ``ncc`` view: shifted, flipped normalized correlation over windows (privacy/volumes.py)."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from privacy import volumes as V


def _explicit(query: np.ndarray, ref: np.ndarray, s: int) -> float:
    """Max over the 8 flips and every shift of the NCC between the query's centre crop and a window."""
    d, h, w = query.shape
    best = -1.0
    for axes in V._FLIPS_3D:
        q = (np.flip(query, axes) if axes else query)[s:d - s, s:h - s, s:w - s].astype(np.float64).ravel()
        q = (q - q.mean()) / np.linalg.norm(q - q.mean())
        for i, j, k in itertools.product(range(2 * s + 1), repeat=3):
            r = ref[i:i + d - 2 * s, j:j + h - 2 * s, k:k + w - 2 * s].astype(np.float64).ravel()
            r = r - r.mean()
            best = max(best, float(q @ r / np.linalg.norm(r)))
    return best


def test_shifted_ncc_equals_explicit_windows():
    rng = np.random.default_rng(3)
    query = rng.random((12, 10, 11)).astype(np.float32)
    refs = rng.random((3, 12, 10, 11)).astype(np.float32)
    refs[1] = np.roll(np.flip(query, (0, 2)), 1, axis=1)  # a flipped copy moved by one voxel
    got = V.shifted_ncc(query, refs, 2)
    want = [_explicit(query, r, 2) for r in refs]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[1] > 0.95 > max(got[0], got[2])


def test_window_means_match_average_pooling():
    rng = np.random.default_rng(4)
    r = torch.from_numpy(rng.random((2, 9, 8, 7)).astype(np.float32))
    mean, sq = V._window_means(r, (5, 4, 6))
    np.testing.assert_allclose(mean.numpy(), torch.nn.functional.avg_pool3d(r[:, None], (5, 4, 6), stride=1)[:, 0].numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(sq.numpy(), torch.nn.functional.avg_pool3d((r * r)[:, None], (5, 4, 6), stride=1)[:, 0].numpy(),
                               atol=1e-6)
