import numpy as np
import pytest

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
