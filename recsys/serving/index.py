"""Item index: the top-k items by inner product for a batch of query vectors, with per-query exclusions.

One interface, two implementations:

- `ExactIndex`: a batched matrix product and top-k in torch; exact, and fast enough for
  catalogues up to a few hundred thousand items.
- `FaissIndex`: approximate FAISS search with inner-product metric, for large catalogues, of kind
  - "pq": a product quantizer with 4-bit codes, one sub-quantizer per two dimensions, searched
    by FAISS's SIMD "fast scan"; its best `k x rerank_factor` candidates are then re-ranked
    exactly against the stored float vectors. The scan reads 16 bytes per 64-d item instead of
    256, and the re-ranking repairs its coarse scores. It is the only kind that reaches recall@10
    0.95 at 10x less latency than exact search on 1M uniform random 64-d vectors, where every
    item is about equally far from a query (HNSW gets 1.4x, IVF-PQ tops out near recall 0.87;
    see `benchmarks/retrieval.py`), and it builds in seconds. The quantizer trains on at most
    `PQ_MAX_TRAIN_ROWS` items, sampled with the index's seed. A catalogue too small to train 16
    centroids per sub-quantizer (fewer than `PQ_MIN_TRAIN_ROWS` items) gets an exact flat FAISS
    index instead: at that size exact search costs nothing.
  - "hnsw" (graph) or "ivf" (inverted lists), tuned by `ef_search` / `nprobe`: fine on clustered,
    embedding-like vectors, but HNSW takes ~40 min to build over 1M items on 2 threads and IVF
    needs to probe most lists on unstructured ones.

`make_index` picks exact or "pq" by catalogue size unless told. Excluded items (what a user has
already watched) are never returned: the exact index masks them before top-k, the FAISS index
fetches enough extra neighbours to drop them afterwards. When fewer than k items remain, the
missing places hold id -1 and score -inf.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import faiss
import numpy as np
import torch

from recsys.config import ConfigError
from recsys.metrics import mask_excluded

IndexKind = Literal["auto", "exact", "pq", "hnsw", "ivf"]

FAISS_MIN_ITEMS = 200_000
"""With `kind="auto"`, catalogues at least this large get a FAISS "pq" index, smaller ones the exact index."""

PQ_MAX_TRAIN_ROWS = 200_000
"""The product quantizer trains on a seeded sample of at most this many items (more adds time, not recall)."""

PQ_MIN_TRAIN_ROWS = 39 * 16
"""Fewer items than this (FAISS's 39 points per centroid, 16 centroids per 4-bit sub-quantizer): exact flat index."""


class ItemIndex(ABC):
    """Top-k inner-product search over item embeddings."""

    n_items: int = 0

    @abstractmethod
    def build(self, item_embeddings: np.ndarray) -> ItemIndex:
        """Index item vectors (N, D); row i is item_idx i. Returns self."""

    @abstractmethod
    def add(self, item_embeddings: np.ndarray) -> ItemIndex:
        """Append item vectors (M, D) as items n_items .. n_items + M - 1, without rebuilding. Returns self."""

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None) -> tuple[
        np.ndarray, np.ndarray
    ]: ...

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores (B, k) float32, ids (B, k) int64) of each query's best items, best first.

        exclude: one array of item indices per query that must not be returned, or None.
        """
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        if self.n_items == 0:
            raise ValueError("the index is empty: call build() with the item embeddings first")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # (B, D)
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
        return self._search(queries, k, exclude)


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen (B, k') results to (B, k) with score -inf and id -1."""
    missing = k - ids.shape[1]
    if missing <= 0:
        return scores[:, :k], ids[:, :k]
    return (
        np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf),
        np.pad(ids, ((0, 0), (0, missing)), constant_values=-1),
    )


class ExactIndex(ItemIndex):
    """Exact search: query batches times the item matrix, then top-k."""

    def __init__(self, batch_size: int = 1024) -> None:
        self.batch_size = batch_size
        self.items = torch.empty(0, 0)

    def build(self, item_embeddings: np.ndarray) -> ExactIndex:
        self.items = torch.from_numpy(np.ascontiguousarray(item_embeddings, dtype=np.float32))  # (N, D)
        self.n_items = self.items.shape[0]
        return self

    def add(self, item_embeddings: np.ndarray) -> ExactIndex:
        more = torch.from_numpy(np.ascontiguousarray(np.atleast_2d(item_embeddings), dtype=np.float32))  # (M, D)
        self.items = torch.cat([self.items, more]) if self.n_items else more
        self.n_items = self.items.shape[0]
        return self

    def _search(
        self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        width = min(k, self.n_items)
        all_scores, all_ids = [], []
        for start in range(0, len(queries), self.batch_size):
            batch = torch.from_numpy(queries[start : start + self.batch_size])  # (B, D)
            scores = batch @ self.items.T  # (B, N)
            if exclude is not None:
                mask_excluded(scores, exclude[start : start + self.batch_size])
            top = torch.topk(scores, width, dim=1)  # (B, k)
            ids = torch.where(torch.isneginf(top.values), -1, top.indices)  # excluded items never come back
            all_scores.append(top.values.numpy())
            all_ids.append(ids.numpy())
        return _pad(np.concatenate(all_scores), np.concatenate(all_ids).astype(np.int64), k)


class FaissIndex(ItemIndex):
    """Approximate search with FAISS, inner-product metric: re-ranked 4-bit PQ fast scan, HNSW graph or IVF lists.

    rerank_factor ("pq"): candidates re-ranked exactly per result wanted. Recall@10 0.96 takes 40 on
    1M uniform random 64-d items and 15 on clustered ones (`benchmarks/retrieval.py`); the default 50
    leaves a margin and costs well under 0.1 ms more per query than 40.
    """

    def __init__(
        self,
        kind: Literal["pq", "hnsw", "ivf"] = "pq",
        rerank_factor: int = 50,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        nlist: int | None = None,
        nprobe: int = 32,
        seed: int = 0,
    ) -> None:
        self.kind = kind
        self.rerank_factor = rerank_factor
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.nlist, self.nprobe, self.seed = nlist, nprobe, seed
        self.index: faiss.Index | None = None
        self.pad_dim = False

    def build(self, item_embeddings: np.ndarray) -> FaissIndex:
        items = np.ascontiguousarray(item_embeddings, dtype=np.float32)  # (N, D)
        n, dim = items.shape
        if self.kind == "pq":
            self.index, self.n_items = self._build_pq(items), n
            return self
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
        else:
            # About 4·sqrt(N) lists is FAISS's usual advice; k-means needs ~39 points per list.
            nlist = self.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = self.seed
            index.train(items)
        index.add(items)
        self.index, self.n_items = index, n
        return self

    def _build_pq(self, items: np.ndarray) -> faiss.Index:
        """4-bit PQ fast scan over 2-d sub-vectors with an exact re-ranking stage, trained and filled."""
        n, dim = items.shape
        # An odd dimension gets one zero column (queries too): inner products are unchanged and
        # every sub-quantizer still sees 2 dimensions, where the largest M dividing a prime
        # dimension would be 1.
        self.pad_dim = n >= PQ_MIN_TRAIN_ROWS and dim % 2 == 1
        if n < PQ_MIN_TRAIN_ROWS:
            index = faiss.IndexFlatIP(dim)
            index.add(items)
            return index
        items = self._padded(items)  # (N, D'), D' even
        base = faiss.IndexPQFastScan(items.shape[1], items.shape[1] // 2, 4, faiss.METRIC_INNER_PRODUCT)
        base.pq.cp.seed = self.seed
        index = faiss.IndexRefineFlat(base)  # keeps the float vectors for re-ranking
        rows = np.random.default_rng(self.seed).choice(n, min(n, PQ_MAX_TRAIN_ROWS), replace=False)
        # Training runs 2-d k-means, thousands of tiny parallel loops: on one thread 200k rows take
        # 0.3 s, while with more OpenMP threads than idle cores the barriers make it 10-40x slower.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index.train(items[np.sort(rows)])
        finally:
            faiss.omp_set_num_threads(threads)
        index.add(items)
        return index

    def add(self, item_embeddings: np.ndarray) -> FaissIndex:
        """Append items to the trained index: PQ codes (and the float copy re-ranking reads), graph nodes or list
        entries; the quantizer, graph and lists already there are kept as they are."""
        if self.index is None:
            return self.build(item_embeddings)
        more = np.ascontiguousarray(np.atleast_2d(item_embeddings), dtype=np.float32)  # (M, D)
        self.index.add(self._padded(more) if self.kind == "pq" else more)
        self.n_items += len(more)
        return self

    def _padded(self, vectors: np.ndarray) -> np.ndarray:
        """(B, D) vectors with a zero column appended when the index pads an odd dimension."""
        return np.pad(vectors, ((0, 0), (0, 1))) if self.pad_dim else vectors

    def _search(
        self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.index is not None
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        fetch = min(k + extra, self.n_items)
        params: faiss.SearchParameters | None
        if self.kind == "pq":
            exact_flat = isinstance(self.index, faiss.IndexFlat)  # a tiny catalogue's fallback
            params = None if exact_flat else faiss.IndexRefineSearchParameters(k_factor=self.rerank_factor)
            queries = self._padded(queries)
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, fetch))
        else:
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        scores, ids = self.index.search(queries, fetch, params=params)  # (B, fetch) each
        if exclude is not None and extra:
            return _drop_excluded(scores, ids, exclude, k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return _pad(scores, ids.astype(np.int64), k)


def _drop_excluded(
    scores: np.ndarray, ids: np.ndarray, exclude: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's excluded ids (and FAISS's -1 fillers), keep the first k survivors in order."""
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    for row, banned in enumerate(exclude):
        keep = (ids[row] >= 0) & ~np.isin(ids[row], banned)
        kept_ids, kept_scores = ids[row][keep][:k], scores[row][keep][:k]
        out_ids[row, : len(kept_ids)] = kept_ids
        out_scores[row, : len(kept_ids)] = kept_scores
    return out_scores, out_ids


def auto_kind(n_items: int, faiss_min_items: int = FAISS_MIN_ITEMS) -> Literal["exact", "pq"]:
    """The kind `make_index(kind="auto")` builds for a catalogue of n_items."""
    return "pq" if n_items >= faiss_min_items else "exact"


def make_index(
    item_embeddings: np.ndarray, kind: IndexKind = "auto", faiss_min_items: int = FAISS_MIN_ITEMS
) -> ItemIndex:
    """Build the index for a catalogue: exact below `faiss_min_items` items (with kind="auto"), else FAISS "pq"."""
    if kind == "auto":
        kind = auto_kind(len(item_embeddings), faiss_min_items)
    if kind == "exact":
        return ExactIndex().build(item_embeddings)
    return FaissIndex(kind=kind).build(item_embeddings)
