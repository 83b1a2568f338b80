"""EASE and the transition baseline rank what their data says, and every tuned baseline picks its setting
on the validation split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

import recsys.evaluation.evaluate as evaluate_module
from recsys.config import EvaluateConfig, PrepareConfig
from recsys.data.histories import train_counts
from recsys.data.paths import PreparedPaths
from recsys.data.prepare import prepare
from recsys.evaluation.baselines import EASE, Transitions, train_matrix, transition_counts
from recsys.evaluation.evaluate import SkippedModelWarning, evaluate, fit_baselines
from recsys.evaluation.protocol import EvalCases, evaluate_scorer, load_cases
from recsys.files import read_json
from tests.evaluation.grouped_data import build_prepared
from tests.movielens_files import write_ml100k


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> PreparedPaths:
    return build_prepared(tmp_path_factory.mktemp("grouped"))


def top_item(scores: np.ndarray, history: Sequence[int]) -> int:
    """The best-scored item outside the history."""
    row = np.array(scores, dtype=np.float64)
    row[list(history)] = -np.inf
    return int(np.argmax(row))


def binary(rows: Sequence[Sequence[int]], n_items: int) -> sp.csr_matrix:
    """(users, items) binary matrix with row u marking the items in rows[u]."""
    matrix = sp.lil_matrix((len(rows), n_items), dtype=np.float32)
    for user, items in enumerate(rows):
        matrix[user, list(items)] = 1.0
    return matrix.tocsr()


def test_ease_ranks_the_co_watched_item_first_not_the_popular_one() -> None:
    # 0 and 1 are watched together; 0 and 4 a few times; 5 is the most watched video but never with 0.
    rows = [[0, 1]] * 8 + [[0, 4]] * 2 + [[2, 3, 5]] * 8 + [[5]] * 6
    ease = EASE.fit(binary(rows, 6), lam=1.0)
    scores = ease.score(np.array([-1, -1]), [np.array([0]), np.array([2])])
    assert top_item(scores[0], [0]) == 1
    assert top_item(scores[1], [2]) == 3
    assert np.all(np.diag(ease.weights) == 0.0)  # an item never predicts itself


def test_ease_is_each_items_ridge_regression_on_the_others() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((40, 7)) < 0.4).astype(np.float64)  # (users, items)
    lam = 3.0
    weights = EASE.fit(sp.csr_matrix(x.astype(np.float32)), lam).weights
    for j in range(x.shape[1]):
        others = np.delete(np.arange(x.shape[1]), j)
        a = x[:, others]
        expected = np.linalg.solve(a.T @ a + lam * np.eye(len(others)), a.T @ x[:, j])
        np.testing.assert_allclose(weights[others, j], expected, rtol=1e-3, atol=1e-4)


def test_tuned_baselines_pick_the_validation_best_setting_and_never_read_test(
    grouped: PreparedPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[str] = []

    def recording_load_cases(paths: PreparedPaths, split: str = "test") -> EvalCases:
        read.append(split)
        return load_cases(paths, split)  # type: ignore[arg-type]

    monkeypatch.setattr(evaluate_module, "load_cases", recording_load_cases)
    config = EvaluateConfig(processed_dir=grouped.root.parent, baselines=("ease", "transitions"))
    _, tuning, notes, fit_seconds = fit_baselines(config, grouped)
    assert read == ["valid"] and notes == []
    assert set(fit_seconds) == {"ease", "transitions"} and min(fit_seconds.values()) > 0

    valid = load_cases(grouped, "valid")
    matrix = train_matrix(grouped, read_json(grouped.meta)["n_users"], valid.n_items)
    by_lambda = {lam: evaluate_scorer(EASE.fit(matrix, lam), valid)["ndcg@10"] for lam in config.ease_lambdas}
    best = max(by_lambda, key=by_lambda.__getitem__)  # the first of equal ones, as the grid is walked
    assert best != config.ease_lambdas[0]  # on this data small lambdas overfit: the pick is not a default
    assert tuning["ease"].setting == f"lambda={best:g}"
    assert tuning["ease"].valid == pytest.approx({f"lambda={lam:g}": v for lam, v in by_lambda.items()})

    counts, popularity = transition_counts(grouped, valid.n_items), train_counts(grouped)
    by_setting = {(w, d): evaluate_scorer(Transitions(counts, popularity, w, d), valid)["ndcg@10"]
                  for w in config.transition_windows for d in config.transition_decays}
    window, decay = max(by_setting, key=by_setting.__getitem__)
    assert window != config.transition_windows[0]  # videos of a group come in random order: one is not enough
    assert tuning["transitions"].setting == f"window={window} decay={decay:g}"


def successor_log(raw_dir: Path) -> PreparedPaths:
    """A prepared log whose train split (each user's first three videos; the last two are held out)
    has video 1 followed by video 2 five times and by video 3 twice, while 3 is the most watched
    video; nothing follows video 9."""
    sequences = [[1, 2, 4]] * 5 + [[1, 3, 4]] * 2 + [[3, 5, 6]] * 6 + [[7, 8, 9]]
    events = [(user, item, 4, 880000000 + 100 * user + step)
              for user, items in enumerate(sequences, start=1) for step, item in enumerate([*items, 10, 11])]
    write_ml100k(raw_dir / "movielens-100k", events, {item: f"Video {item} (1995)" for item in range(1, 12)})
    prepare(PrepareConfig(raw_dir=raw_dir, processed_dir=raw_dir.parent / "processed",
                          min_user_interactions=1, min_item_interactions=1))
    return PreparedPaths.of(raw_dir.parent / "processed", "movielens-100k")


def test_transitions_rank_the_most_frequent_successor_of_the_last_video_first(tmp_path: Path) -> None:
    paths = successor_log(tmp_path / "raw")
    items = pl.read_parquet(paths.item_map)
    idx = {int(i): int(j) for i, j in zip(items["item_id"], items["item_idx"], strict=True)}
    n_items = items.height
    counts = transition_counts(paths, n_items)
    assert counts[idx[1], idx[2]] == 5 and counts[idx[1], idx[3]] == 2 and counts[idx[9]].nnz == 0
    assert counts[idx[4], idx[10]] == 0  # the held-out events are not counted
    popularity = train_counts(paths)
    assert int(np.argmax(popularity)) == idx[3]

    model = Transitions.fit(paths, n_items, window=1)
    scores = model.score(np.array([-1, -1, -1]), [np.array([idx[6], idx[1]]), np.array([idx[9]]), np.array([])])
    assert top_item(scores[0], [idx[6], idx[1]]) == idx[2]  # 5 times after 1, though 3 is more popular
    # Nothing ever followed 9, and a user without history: both get the popularity ranking.
    assert top_item(scores[1], [idx[9]]) == idx[3]
    by_popularity = np.argsort(-popularity, kind="stable")
    assert np.array_equal(np.argsort(-scores[2], kind="stable"), by_popularity)
    # Two videos read: the newer one leads. After 1 then 3 comes 5 (3's successor); after 3 then 1 comes 2.
    two = Transitions.fit(paths, n_items, window=2)
    scores = two.score(np.array([-1, -1]), [np.array([idx[1], idx[3]]), np.array([idx[3], idx[1]])])
    assert top_item(scores[0], [idx[1], idx[3]]) == idx[5]
    assert top_item(scores[1], [idx[3], idx[1]]) == idx[2]


def test_ease_is_skipped_with_a_reason_on_a_large_catalogue(grouped: PreparedPaths) -> None:
    config = EvaluateConfig(processed_dir=grouped.root.parent, baselines=("popularity", "ease"), ease_max_items=10)
    with pytest.warns(SkippedModelWarning, match=r"ease skipped: 42 items is above ease_max_items=10"):
        table = evaluate(config)
    assert table["model"].to_list() == ["popularity"]
