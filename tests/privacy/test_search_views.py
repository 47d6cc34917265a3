import numpy as np
import pytest
from scipy import ndimage

from privacy import views as V
from privacy.search import exact_topk, faiss_available, topk_search


def test_exact_topk_matches_brute_force_across_chunks():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(103, 8)).astype(np.float32)
    q = rng.normal(size=(17, 8)).astype(np.float32)
    s, i = exact_topk(q, refs, 5, query_chunk=4, ref_chunk=10)
    full = q @ refs.T
    order = np.argsort(-full, axis=1)[:, :5]
    np.testing.assert_array_equal(i, order)
    np.testing.assert_allclose(s, np.take_along_axis(full, order, 1), rtol=1e-5)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_backend_agrees_with_exact():
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(200, 16)).astype(np.float32)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    s1, i1 = topk_search(q, refs, 3, backend="exact")
    s2, i2 = topk_search(q, refs, 3, backend="faiss")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-4)


def test_search_errors():
    with pytest.raises(ValueError, match="backend"):
        topk_search(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32), 1, backend="annoy")
    with pytest.raises(ValueError, match="features"):
        topk_search(np.zeros((1, 2), np.float32), np.zeros((1, 3), np.float32), 1)


def test_shifted_ncc_finds_flipped_and_shifted_copies(make_images):
    imgs = make_images(6, size=24, seed=5)
    ref = V.reference_windows(V.ncc_images(imgs), 2)
    shifted = np.roll(imgs[2], (1, -2), axis=(0, 1))[:, ::-1]  # shift then mirror
    q = np.stack([shifted, imgs[4]])
    cand = np.tile(np.arange(6), (2, 1))
    sims = V.shifted_ncc_max(V.ncc_images(q), ref, cand, max_shift=2)
    assert sims[0, 2] > 0.99 and sims[0, 2] == sims[0].max()
    assert sims[1, 4] == pytest.approx(1.0, abs=1e-5)
    # a different image correlates less
    assert sims[1, 0] < 0.99


def test_shifted_ncc_equals_explicit_windows_and_flat_queries_score_zero(make_images):
    """The grouped-correlation search agrees with the explicit (materialised) shifted windows."""
    imgs = make_images(8, size=24, seed=3)
    m, warps = 2, ((0.0, 1.0), (6.0, 0.95))
    r_ncc = V.ncc_images(imgs)
    ref = V.reference_windows(r_ncc, m)
    q = np.concatenate([imgs[:3], imgs[3:5, :, ::-1], np.full((1, 24, 24), 0.4, np.float32)])
    q_ncc = V.ncc_images(q)
    cand = np.tile(np.arange(8), (len(q), 1))
    cand[0, -1] = -1
    sims, variant = V.shifted_ncc_max(q_ncc, ref, cand, m, warps=warps, return_argmax=True)
    windows = V.query_windows(q_ncc, m, flips=True, warps=warps)  # (Q, V, D), explicit
    full = np.einsum("qvd,qcd->qcv", windows, ref[np.clip(cand, 0, None)])
    ok = cand >= 0
    np.testing.assert_allclose(sims[:-1][ok[:-1]], full.max(-1)[:-1][ok[:-1]], atol=1e-5)
    np.testing.assert_array_equal(variant[:-1][ok[:-1]], full.argmax(-1)[:-1][ok[:-1]])
    assert np.isneginf(sims[0, -1])
    assert (sims[-1] == 0.0).all()  # a flat image has no correlation with anything
    assert (np.abs(sims[np.isfinite(sims)]) <= 1.0).all()


def test_phash_identical_and_mirror():
    img = np.zeros((1, 24, 24), np.float32)
    img[0, 4:12, 2:10] = 1.0
    a = V.phash_bits(img)
    assert (V.phash_bits(img[:, :, ::-1], flip=True) == a).all()
    sim = V.hash_similarity_from_dot(V.hash_features(a) @ V.hash_features(a).T)
    assert sim[0, 0] == pytest.approx(1.0)


def test_check_images_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        V.check_images(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        V.check_images(np.full((1, 4, 4), 3.0))


def _crop_resize(img: np.ndarray, c: int, y0: int, x0: int) -> np.ndarray:
    """Crop ``c`` pixels at ``(y0, x0)`` and resize back bilinearly (pixel-centre aligned)."""
    s = c / img.shape[0]
    off = (y0 - 0.5 + 0.5 * s, x0 - 0.5 + 0.5 * s)
    return ndimage.affine_transform(img, (s, s), offset=off, order=1, mode="nearest")


def test_decode_variant_inverts_the_variant_order():
    warps = ((0.0, 1.0), (6.0, 0.9))
    m = 2
    n = 2 * m + 1
    # warp 1, mirrored, dy = -1, dx = +2
    v = ((1 * 2 + 1) * n + (-1 + m)) * n + (2 + m)
    row = V.decode_variant(np.array([v]), m, True, warps)[0]
    np.testing.assert_allclose(row, [1.0, 0.9, -6.0, 1.0, 2.0])


def test_refine_ncc_aligns_crops_and_rotations_to_subpixel(make_images):
    imgs = make_images(4, size=28, seed=7)
    warps = tuple((float(a), float(z)) for a in (-6, 0, 6) for z in (1.0, 0.9))
    queries = np.stack([
        _crop_resize(imgs[0], 26, 0, 2),  # zoom 28/26 between grid points, half-pixel offset
        _crop_resize(imgs[1], 25, 3, 1)[:, ::-1],  # and mirrored
        ndimage.rotate(imgs[2], 7.0, reshape=False, order=1, mode="nearest"),
    ]).astype(np.float32)
    m = 3
    q_ncc, r_ncc = V.ncc_images(queries), V.ncc_images(imgs)
    cand = np.arange(3)[:, None]
    grid, variant = V.shifted_ncc_max(q_ncc, V.reference_windows(r_ncc, m), cand, m, warps=warps, return_argmax=True)
    init = V.decode_variant(variant[:, 0], m, True, warps)
    assert (init[:, 0] == [0, 1, 0]).all()  # the mirror was found by the grid search
    sims, params = V.refine_ncc(q_ncc, r_ncc, np.arange(3), np.arange(3), init, m)
    assert (sims >= grid[:, 0] - 1e-6).all()
    assert (sims > 0.999).all()
    np.testing.assert_allclose(params[:2, 1], [26 / 28, 25 / 28], atol=0.01)
    assert abs(params[2, 2]) == pytest.approx(7.0, abs=0.75)
    # a different reference stays far from a copy
    other, _ = V.refine_ncc(q_ncc, r_ncc, np.arange(3), np.array([3, 3, 3]), init, m)
    assert (other < 0.99).all()
    with pytest.raises(ValueError, match="init"):
        V.refine_ncc(q_ncc, r_ncc, np.arange(3), np.arange(3), init[:, :4], m)
    with pytest.raises(ValueError, match="query_idx"):
        V.refine_ncc(q_ncc, r_ncc, np.arange(2), np.arange(3), init, m)


def test_refine_ncc_ignores_clipped_pixels(make_images):
    imgs = make_images(2, size=28, seed=9)
    bright = np.clip(imgs[:1] * 1.4, 0, 1).astype(np.float32)  # saturates the brightest blobs
    assert (bright >= 1.0).mean() > 0.01
    m = 3
    q_ncc, r_ncc = V.ncc_images(bright), V.ncc_images(imgs)
    plain = V.shifted_ncc_max(q_ncc, V.reference_windows(r_ncc, m), np.array([[0]]), m)[0, 0]
    init = np.array([[0.0, 1.0, 0.0, 0.0, 0.0]])
    masked, _ = V.refine_ncc(q_ncc, r_ncc, np.array([0]), np.array([0]), init, m)
    unmasked, _ = V.refine_ncc(q_ncc, r_ncc, np.array([0]), np.array([0]), init, m, clip_eps=-1.0)
    assert masked[0] == pytest.approx(1.0, abs=1e-4)
    assert unmasked[0] == pytest.approx(plain, abs=1e-3) and plain < 0.999


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_approximate_search_index_finds_planted_copies_with_exact_similarities(tmp_path):
    from privacy.search import SearchIndex

    rng = np.random.default_rng(2)
    centres = rng.normal(size=(40, 32))
    refs = centres[rng.integers(0, 40, 4000)] + 0.5 * rng.normal(size=(4000, 32))
    refs = (refs / np.linalg.norm(refs, axis=1, keepdims=True)).astype(np.float32)
    np.save(tmp_path / "refs.npy", refs)
    mapped = np.load(tmp_path / "refs.npy", mmap_mode="r")  # references stay on disk
    src = rng.choice(4000, 200, replace=False)
    q = refs[src] + 0.05 * rng.normal(size=(200, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ann = SearchIndex(mapped, approximate=True, nlist=64, nprobe=8)
    assert ann.approximate and len(ann) == 4000
    s, i = ann.search(q, 10)
    es, ei = exact_topk(q, refs, 10)
    assert (i[:, 0] == src).mean() >= 0.99  # the planted source is found
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i, ei)])
    assert recall >= 0.9
    # similarities are exact inner products of the returned references
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, refs[i]), rtol=1e-5, atol=1e-6)
    # below the size threshold the same class searches exactly
    exact = SearchIndex(refs)
    assert not exact.approximate
    np.testing.assert_array_equal(exact.search(q, 10)[1], ei)
    with pytest.raises(ValueError, match="rerank"):
        SearchIndex(refs, rerank=0)
