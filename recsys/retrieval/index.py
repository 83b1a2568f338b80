"""Item index: the top-k items by inner product for a batch of query vectors, with per-query exclusions.

One interface, two implementations:

- `ExactIndex`: a batched matrix product and top-k in torch; exact, and fast enough for
  catalogues up to a few hundred thousand items.
- `FaissIndex`: FAISS HNSW (graph) or IVF (inverted lists) with inner-product metric, for large
  catalogues; approximate, tuned by `ef_search` / `nprobe`.

`make_index` picks one by catalogue size unless told. Excluded items (what a user has already
watched) are never returned: the exact index masks them before top-k, the FAISS index fetches
enough extra neighbours to drop them afterwards. When fewer than k items remain, the missing
places hold id -1 and score -inf.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import faiss
import numpy as np
import torch

from recsys.config import ConfigError
from recsys.evaluation.metrics import mask_excluded

IndexKind = Literal["auto", "exact", "hnsw", "ivf"]

FAISS_MIN_ITEMS = 200_000
"""With `kind="auto"`, catalogues at least this large get a FAISS HNSW index, smaller ones the exact index."""


class ItemIndex(ABC):
    """Top-k inner-product search over item embeddings."""

    n_items: int = 0

    @abstractmethod
    def build(self, item_embeddings: np.ndarray) -> ItemIndex:
        """Index item vectors (N, D); row i is item_idx i. Returns self."""

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
    """Approximate search with FAISS: HNSW graph or IVF inverted lists, inner-product metric."""

    def __init__(
        self,
        kind: Literal["hnsw", "ivf"] = "hnsw",
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        nlist: int | None = None,
        nprobe: int = 32,
        seed: int = 0,
    ) -> None:
        self.kind = kind
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.nlist, self.nprobe, self.seed = nlist, nprobe, seed
        self.index: faiss.Index | None = None

    def build(self, item_embeddings: np.ndarray) -> FaissIndex:
        items = np.ascontiguousarray(item_embeddings, dtype=np.float32)  # (N, D)
        n, dim = items.shape
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

    def _search(
        self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.index is not None
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        fetch = min(k + extra, self.n_items)
        if self.kind == "hnsw":
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


def make_index(
    item_embeddings: np.ndarray, kind: IndexKind = "auto", faiss_min_items: int = FAISS_MIN_ITEMS
) -> ItemIndex:
    """Build the index for a catalogue: exact below `faiss_min_items` items (with kind="auto"), else FAISS HNSW."""
    if kind == "auto":
        kind = "hnsw" if len(item_embeddings) >= faiss_min_items else "exact"
    if kind == "exact":
        return ExactIndex().build(item_embeddings)
    return FaissIndex(kind=kind).build(item_embeddings)
