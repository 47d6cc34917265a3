"""Top-k inner-product search over reference features (DESIGN.md §4, "Search").

Exact chunked matrix products below ``FAISS_MIN_REFERENCES`` references; above it, FAISS
(``faiss-cpu``, an exact flat inner-product index, added in chunks) when it is installed, with the
exact chunked search as the fallback. Memory is bounded by the chunk sizes: the largest temporary
is ``query_chunk x ref_chunk`` float32 similarities.
"""

from __future__ import annotations

import importlib.util

import numpy as np
from tqdm.auto import tqdm

#: Reference count above which FAISS is used when available.
FAISS_MIN_REFERENCES = 100_000


def faiss_available() -> bool:
    """Whether ``faiss`` can be imported."""
    return importlib.util.find_spec("faiss") is not None


def _merge_topk(
    best_s: np.ndarray, best_i: np.ndarray, new_s: np.ndarray, new_i: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    s = np.concatenate([best_s, new_s], axis=1)
    i = np.concatenate([best_i, new_i], axis=1)
    if s.shape[1] > k:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(s, part, axis=1)
        i = np.take_along_axis(i, part, axis=1)
    return s, i


def exact_topk(
    queries: np.ndarray,
    refs: np.ndarray,
    k: int,
    query_chunk: int = 2048,
    ref_chunk: int = 16384,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, chunked over queries and references.

    Args:
        queries: ``(Q, D)`` float32 features.
        refs: ``(N, D)`` float32 features.
        k: Neighbours kept per query (clipped to ``N``).
        query_chunk: Queries per block.
        ref_chunk: References per block.
        progress: Show a tqdm bar over query blocks.

    Returns:
        ``(sims, idx)``: ``(Q, k)`` float32 similarities sorted descending and ``(Q, k)`` int64
        reference indices.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    refs = np.ascontiguousarray(refs, dtype=np.float32)
    k = int(min(k, len(refs)))
    q_count = len(queries)
    out_s = np.empty((q_count, k), dtype=np.float32)
    out_i = np.empty((q_count, k), dtype=np.int64)
    starts = range(0, q_count, query_chunk)
    for qs in tqdm(starts, desc="search", disable=not progress, leave=False):
        qb = queries[qs : qs + query_chunk]
        best_s = np.full((len(qb), 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((len(qb), 0), dtype=np.int64)
        for rs in range(0, len(refs), ref_chunk):
            sims = qb @ refs[rs : rs + ref_chunk].T
            kk = min(k, sims.shape[1])
            part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            s = np.take_along_axis(sims, part, axis=1)
            best_s, best_i = _merge_topk(best_s, best_i, s, part.astype(np.int64) + rs, k)
        order = np.argsort(-best_s, axis=1, kind="stable")
        out_s[qs : qs + len(qb)] = np.take_along_axis(best_s, order, axis=1)
        out_i[qs : qs + len(qb)] = np.take_along_axis(best_i, order, axis=1)
    return out_s, out_i


def faiss_topk(
    queries: np.ndarray, refs: np.ndarray, k: int, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k with a FAISS exact inner-product index (``IndexFlatIP``).

    Args:
        queries: ``(Q, D)`` float32 features.
        refs: ``(N, D)`` float32 features.
        k: Neighbours kept per query.
        chunk: Queries searched per call.

    Returns:
        Same as :func:`exact_topk`.
    """
    import faiss  # optional dependency

    refs = np.ascontiguousarray(refs, dtype=np.float32)
    index = faiss.IndexFlatIP(refs.shape[1])
    for rs in range(0, len(refs), chunk):
        index.add(refs[rs : rs + chunk])
    k = int(min(k, len(refs)))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    sims, idx = [], []
    for qs in range(0, len(queries), chunk):
        s, i = index.search(queries[qs : qs + chunk], k)
        sims.append(s)
        idx.append(i)
    return np.concatenate(sims).astype(np.float32), np.concatenate(idx).astype(np.int64)


def topk_search(
    queries: np.ndarray,
    refs: np.ndarray,
    k: int,
    backend: str = "auto",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product neighbours of each query.

    Args:
        queries: ``(Q, D)`` float32 features.
        refs: ``(N, D)`` float32 features, ``N >= 1``.
        k: Neighbours per query (clipped to ``N``).
        backend: ``"auto"`` (FAISS above ``FAISS_MIN_REFERENCES`` references when installed),
            ``"exact"`` or ``"faiss"``.
        progress: Show progress for the exact search.

    Returns:
        ``(sims, idx)``, both ``(Q, min(k, N))``, sorted by decreasing similarity.

    Raises:
        ValueError: unknown ``backend``, ``k < 1``, empty references or mismatched feature sizes;
            ``backend="faiss"`` without faiss installed.
    """
    if backend not in ("auto", "exact", "faiss"):
        raise ValueError(f"backend must be 'auto', 'exact' or 'faiss', got {backend!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(refs) == 0:
        raise ValueError("refs is empty: the reference index holds no images")
    if queries.shape[1] != refs.shape[1]:
        raise ValueError(
            f"queries have {queries.shape[1]} features but refs have {refs.shape[1]}"
        )
    if backend == "faiss" and not faiss_available():
        raise ValueError("backend='faiss' but faiss is not installed (pip install faiss-cpu)")
    use_faiss = backend == "faiss" or (
        backend == "auto" and len(refs) > FAISS_MIN_REFERENCES and faiss_available()
    )
    if use_faiss:
        return faiss_topk(queries, refs, k)
    return exact_topk(queries, refs, k, progress=progress)
