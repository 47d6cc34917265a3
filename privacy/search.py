"""Top-k inner-product search over reference features (DESIGN.md §4, "Search").

Exact chunked matrix products below ``FAISS_MIN_REFERENCES`` references. Above it, when
``faiss-cpu`` is installed, :class:`SearchIndex` finds *candidates* with an approximate inverted-file
index (IVF, 8-bit scalar-quantized vectors, ``nprobe`` lists searched) and re-ranks them exactly
against the float32 references, which may be a read-only memory map (``np.load(..., mmap_mode="r")``):
the approximate index holds one byte per feature, the references stay on disk. Exact search is the
fallback. Memory of the exact search is bounded by the chunk sizes: the largest temporary is
``query_chunk x ref_chunk`` float32 similarities, and references are read chunk by chunk.
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
            # one chunk at a time, so a memory-mapped `refs` is never read whole into memory
            sims = qb @ np.ascontiguousarray(refs[rs : rs + ref_chunk], dtype=np.float32).T
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


def default_nlist(n: int) -> int:
    """Inverted lists of the approximate index for ``n`` references: about ``sqrt(n)``."""
    return int(max(1, min(n // 39, round(np.sqrt(n)))))


class SearchIndex:
    """Top-k inner-product search over fixed references, built once and queried many times.

    Below ``min_approximate`` references (or with ``approximate=False``, or without faiss) the
    search is exact (:func:`exact_topk`). Above it, an IVF index with 8-bit scalar quantization
    (``faiss.IndexIVFScalarQuantizer``, inner product) proposes ``rerank * k`` candidates per query
    from ``nprobe`` of its ``nlist`` lists, and those are re-scored exactly against ``refs``; the
    similarities returned are therefore exact, only the candidate set is approximate.

    Args:
        refs: ``(N, D)`` float32 reference features; may be a read-only ``np.memmap``.
        approximate: ``None``: approximate above ``min_approximate`` when faiss is installed;
            ``True``: always (needs faiss); ``False``: never.
        min_approximate: Reference count above which the approximate index is used by default.
        nlist: Inverted lists (default :func:`default_nlist`).
        nprobe: Lists searched per query (default ``max(16, nlist // 16)``).
        rerank: Candidates per wanted neighbour re-scored exactly.
        train_size: Most references sampled to train the coarse quantizer.
        seed: Sampling seed.

    Raises:
        ValueError: empty ``refs``, bad sizes, or ``approximate=True`` without faiss.
    """

    def __init__(
        self,
        refs: np.ndarray,
        approximate: bool | None = None,
        min_approximate: int = FAISS_MIN_REFERENCES,
        nlist: int | None = None,
        nprobe: int | None = None,
        rerank: int = 4,
        train_size: int = 65_536,
        seed: int = 0,
    ) -> None:
        if refs.ndim != 2 or len(refs) == 0:
            raise ValueError(f"refs must be a non-empty (N, D) array, got shape {refs.shape}")
        if rerank < 1:
            raise ValueError(f"rerank must be >= 1, got {rerank}")
        if approximate and not faiss_available():
            raise ValueError("approximate=True but faiss is not installed (pip install faiss-cpu)")
        self.refs = refs
        self.rerank = int(rerank)
        use = (len(refs) > min_approximate and faiss_available()) if approximate is None else bool(approximate)
        self.approximate = use
        self.nlist = default_nlist(len(refs)) if nlist is None else int(nlist)
        if self.nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {nlist}")
        self.nprobe = max(16, self.nlist // 16) if nprobe is None else int(nprobe)
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self._ann = None
        if use:
            import faiss  # optional dependency

            d = refs.shape[1]
            quantizer = faiss.IndexFlatIP(d)
            ann = faiss.IndexIVFScalarQuantizer(
                quantizer, d, self.nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
            rng = np.random.default_rng(seed)
            m = min(len(refs), max(train_size, 39 * self.nlist))
            sample = np.sort(rng.choice(len(refs), size=m, replace=False))
            ann.train(np.ascontiguousarray(refs[sample], dtype=np.float32))
            for start in range(0, len(refs), 65_536):
                ann.add(np.ascontiguousarray(refs[start : start + 65_536], dtype=np.float32))
            ann.nprobe = min(self.nprobe, self.nlist)
            self._ann = ann

    def __len__(self) -> int:
        return int(len(self.refs))

    def search(self, queries: np.ndarray, k: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` references of each query by inner product.

        Args:
            queries: ``(Q, D)`` float32 features.
            k: Neighbours per query (clipped to ``N``).
            progress: Show progress for the exact search.

        Returns:
            ``(sims, idx)``, both ``(Q, min(k, N))``, sorted by decreasing similarity; similarities
            are exact inner products.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if queries.ndim != 2 or queries.shape[1] != self.refs.shape[1]:
            raise ValueError(f"queries have {queries.shape[-1]} features but refs have {self.refs.shape[1]}")
        k = int(min(k, len(self.refs)))
        if self._ann is None:
            return exact_topk(queries, self.refs, k, progress=progress)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        kc = int(min(len(self.refs), self.rerank * k))
        out_s = np.empty((len(queries), k), dtype=np.float32)
        out_i = np.empty((len(queries), k), dtype=np.int64)
        for qs in range(0, len(queries), 1024):  # bounds the (B, rerank*k, D) gather to ~64 MiB at k=32
            qb = queries[qs : qs + 1024]
            _, cand = self._ann.search(qb, kc)  # (B, kc), -1 where a list ran short
            cand = cand.astype(np.int64)
            valid = cand >= 0
            flat = np.unique(cand[valid])
            pos = np.searchsorted(flat, np.where(valid, cand, flat[0] if len(flat) else 0))
            rows = np.ascontiguousarray(self.refs[flat], dtype=np.float32)  # sorted gather (mmap-friendly)
            sims = np.einsum("bd,bcd->bc", qb, rows[pos])
            sims = np.where(valid, sims, -np.inf).astype(np.float32)
            order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            out_s[qs : qs + len(qb)] = np.take_along_axis(sims, order, axis=1)
            out_i[qs : qs + len(qb)] = np.where(
                np.isfinite(out_s[qs : qs + len(qb)]), np.take_along_axis(cand, order, axis=1), -1
            )
        return out_s, out_i


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
        backend: ``"auto"`` (an approximate :class:`SearchIndex` above ``FAISS_MIN_REFERENCES``
            references when faiss is installed), ``"exact"``, ``"faiss"`` (exact flat FAISS index)
            or ``"ivf"`` (approximate, always). Build a :class:`SearchIndex` once instead when the
            same references are searched repeatedly.
        progress: Show progress for the exact search.

    Returns:
        ``(sims, idx)``, both ``(Q, min(k, N))``, sorted by decreasing similarity.

    Raises:
        ValueError: unknown ``backend``, ``k < 1``, empty references or mismatched feature sizes;
            ``backend="faiss"`` without faiss installed.
    """
    if backend not in ("auto", "exact", "faiss", "ivf"):
        raise ValueError(f"backend must be 'auto', 'exact', 'faiss' or 'ivf', got {backend!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(refs) == 0:
        raise ValueError("refs is empty: the reference index holds no images")
    if queries.shape[1] != refs.shape[1]:
        raise ValueError(
            f"queries have {queries.shape[1]} features but refs have {refs.shape[1]}"
        )
    if backend in ("faiss", "ivf") and not faiss_available():
        raise ValueError(f"backend={backend!r} but faiss is not installed (pip install faiss-cpu)")
    if backend == "faiss":
        return faiss_topk(queries, refs, k)
    if backend == "ivf" or (backend == "auto" and len(refs) > FAISS_MIN_REFERENCES and faiss_available()):
        return SearchIndex(refs, approximate=True).search(queries, k, progress=progress)
    return exact_topk(queries, refs, k, progress=progress)
