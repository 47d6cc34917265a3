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


def _blob(shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return (r2 <= 1.0).astype(np.float32)


def test_shifted_copy_of_a_small_structure_reaches_the_exact_view():
    # A small gland-like blob and a slightly different blob sitting exactly where a shifted copy of the
    # first lands: the plain coarse search ranks the wrong one first; the centred search must still
    # propose the source, so the exact view finds the copy (ncc 1) even with one candidate per search.
    shape = (16, 16, 16)
    a = _blob(shape, (7, 7, 7), (2.5, 2.5, 2.5))
    b = _blob(shape, (8, 6, 8), (2.5, 3.4, 2.0))
    others = [_blob(shape, (7 + dx, 8, 7 - dx), (2.0 + 0.3 * dx, 2.5, 3.0)) for dx in range(3)]
    refs = np.stack([a, b, *others])
    copy = np.roll(a, (1, -1, 1), axis=(0, 1, 2))[None]
    plain = V._coarse(copy, 1) @ V._coarse(refs, 1).T
    assert int(np.argmax(plain[0])) != 0  # the trap is real: the plain search alone would miss the source
    nb, nearest = V._neighbours(copy, refs, max_shift=1, candidates=1, k=1, slice_view=False)
    assert nb["ncc"][1][0, 0] == 0 and nearest["ncc"][0] > 0.999
