"""Item index: FAISS against exact search on random vectors, exclusions, padding, choice by size."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.config import ConfigError
from recsys.serving.index import ExactIndex, FaissIndex, make_index


def _random(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def items() -> np.ndarray:
    return _random(4000, 32, seed=0)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return _random(50, 32, seed=1)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def test_exact_index_matches_brute_force(items: np.ndarray, queries: np.ndarray) -> None:
    scores, ids = ExactIndex(batch_size=16).build(items).search(queries, 10)
    brute = queries @ items.T  # (B, N)
    expected = np.argsort(-brute, axis=1)[:, :10]
    assert np.array_equal(ids, expected)
    assert np.allclose(scores, np.take_along_axis(brute, expected, axis=1), atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_faiss_recall_against_exact(items: np.ndarray, queries: np.ndarray, kind: str) -> None:
    _, exact = ExactIndex().build(items).search(queries, 10)
    # Uniform random vectors have no cluster structure: IVF must probe about half of its 102 lists.
    index = FaissIndex(kind, ef_search=128, nprobe=50).build(items)
    scores, ids = index.search(queries, 10)
    assert _recall(ids, exact) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


@pytest.mark.parametrize("n_items, dim", [(20_000, 64), (3000, 33)])  # 33: an odd dimension is padded
def test_pq_recall_against_exact_with_exact_scores(n_items: int, dim: int) -> None:
    items, queries = _random(n_items, dim, seed=4), _random(100, dim, seed=5)
    _, exact = ExactIndex().build(items).search(queries, 10)
    scores, ids = FaissIndex("pq").build(items).search(queries, 10)
    assert _recall(ids, exact) >= 0.9
    # Re-ranking scores the candidates with the float vectors: the scores are exact inner products.
    assert np.allclose(scores, np.einsum("bd,bkd->bk", queries, items[ids]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_pq_on_a_catalogue_too_small_to_train_is_exact() -> None:
    items, queries = _random(50, 64, seed=8), _random(20, 64, seed=9)
    exclude = [np.array([q, q + 1]) for q in range(20)]
    expected_scores, expected = ExactIndex().build(items).search(queries, 10, exclude=exclude)
    scores, ids = FaissIndex("pq").build(items).search(queries, 10, exclude=exclude)
    assert np.array_equal(ids, expected)
    assert np.allclose(scores, expected_scores, atol=1e-5)


def test_ivf_probing_every_list_is_exact(items: np.ndarray, queries: np.ndarray) -> None:
    _, exact = ExactIndex().build(items).search(queries, 10)
    index = FaissIndex("ivf", nlist=20, nprobe=20).build(items)
    assert _recall(index.search(queries, 10)[1], exact) == 1.0


@pytest.mark.parametrize(
    "index", [ExactIndex(), FaissIndex("pq"), FaissIndex("hnsw"), FaissIndex("ivf", nlist=20, nprobe=20)]
)
def test_excluded_items_are_never_returned(items: np.ndarray, queries: np.ndarray, index) -> None:
    index.build(items)
    _, exact = ExactIndex().build(items).search(queries, 15)
    exclude = [row[:5] for row in exact]  # ban each query's 5 best items
    scores, ids = index.search(queries, 10, exclude=exclude)
    for row, banned in zip(ids, exclude, strict=True):
        assert not set(row) & set(banned)
    assert _recall(ids, exact[:, 5:15]) >= 0.9  # the next 10 take their places
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("index", [ExactIndex(), FaissIndex("pq"), FaissIndex("hnsw")])
def test_fewer_items_than_k_pads_with_minus_one(index) -> None:
    index.build(_random(6, 8, seed=2))
    scores, ids = index.search(_random(2, 8, seed=3), 10, exclude=[np.array([0, 1]), np.array([], dtype=np.int64)])
    assert ids.shape == (2, 10)
    assert sorted(ids[0][:4]) == [2, 3, 4, 5] and (ids[0][4:] == -1).all() and np.isneginf(scores[0][4:]).all()
    assert sorted(ids[1][:6]) == [0, 1, 2, 3, 4, 5] and (ids[1][6:] == -1).all()


def test_invalid_k_and_mismatched_exclusions_are_clear_errors(items: np.ndarray) -> None:
    index = ExactIndex().build(items)
    with pytest.raises(ConfigError, match="k must be at least 1"):
        index.search(items[:1], 0)
    with pytest.raises(ValueError, match="exclude has 2 entries for 1 queries"):
        index.search(items[:1], 5, exclude=[np.array([1]), np.array([2])])


def test_make_index_picks_faiss_pq_for_large_catalogues(items: np.ndarray) -> None:
    assert isinstance(make_index(items), ExactIndex)
    auto = make_index(items, faiss_min_items=1000)
    assert isinstance(auto, FaissIndex) and auto.kind == "pq"
    assert isinstance(make_index(items, kind="ivf"), FaissIndex)
    assert isinstance(make_index(items, kind="exact", faiss_min_items=10), ExactIndex)


@pytest.mark.parametrize("index", [ExactIndex(), FaissIndex("pq"), FaissIndex("hnsw"), FaissIndex("ivf")],
                         ids=["exact", "pq", "hnsw", "ivf"])
def test_added_items_are_found_without_a_rebuild(items: np.ndarray, queries: np.ndarray, index) -> None:
    index.build(items)
    before = index.search(queries, 5)
    added = queries[:2]  # unit vectors: each is its own query's best match
    index.add(added)
    assert index.n_items == len(items) + 2
    scores, ids = index.search(queries[:2], 5)
    assert ids[:, 0].tolist() == [len(items), len(items) + 1]
    # The other queries still find what they found before, besides the new items (nothing rebuilt, nothing lost).
    after = index.search(queries[2:], 7)[1]
    kept = [[i for i in row if i < len(items)][:5] for row in after]
    assert _recall(np.array(kept), before[1][2:]) > 0.95
