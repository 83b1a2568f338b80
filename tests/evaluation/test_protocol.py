"""The leave-one-out protocol and the baselines on a tiny dataset with known structure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data.paths import PreparedPaths
from recsys.evaluation.baselines import ALSSettings, ImplicitALS, ItemKNN, Popularity, train_matrix
from recsys.evaluation.protocol import EvalCases, chance_metrics, evaluate_scorer, load_cases
from tests.evaluation.grouped_data import COLD_ITEM, COLD_USERS, USERS, build_prepared, cold_users


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> PreparedPaths:
    return build_prepared(tmp_path_factory.mktemp("grouped"))


def _ids(paths: PreparedPaths) -> tuple[dict[int, str], dict[int, str]]:
    users = pl.read_parquet(paths.user_map)
    items = pl.read_parquet(paths.item_map)
    return dict(zip(users["user_idx"], users["user_id"], strict=True)), dict(
        zip(items["item_idx"], items["item_id"], strict=True)
    )


class HistoryFirst:
    """A cheating scorer: ranks the user's own history above everything, the target next."""

    def __init__(self, targets: dict[int, int], n_items: int) -> None:
        self.targets, self.n_items = targets, n_items

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        scores = np.zeros((len(user_idx), self.n_items), dtype=np.float32)
        for row, (user, history) in enumerate(zip(user_idx, histories, strict=True)):
            scores[row, history] = 10.0
            scores[row, self.targets[int(user)]] = 5.0
        return scores


def test_test_cases_see_train_and_valid_and_exclude_all_of_it(paths: PreparedPaths) -> None:
    cases = load_cases(paths, "test")
    train = pl.read_parquet(paths.train)
    valid = pl.read_parquet(paths.valid)
    assert len(cases) == USERS
    for user, target, history in zip(cases.user_idx, cases.targets, cases.histories, strict=True):
        seen = train.filter(pl.col("user_idx") == user).sort("timestamp")["item_idx"].to_list()
        seen += valid.filter(pl.col("user_idx") == user)["item_idx"].to_list()
        assert history.tolist() == seen  # chronological: train, then the valid item last
        assert target not in seen
    # Were the history not excluded, the history would take the top places; it is, so every target is first.
    result = evaluate_scorer(HistoryFirst(dict(zip(cases.user_idx, cases.targets, strict=True)), cases.n_items), cases)
    assert result["hr@10"] == 1.0 and result["mrr@10"] == 1.0 and result["ndcg@10"] == 1.0


def test_valid_cases_see_only_train_and_do_not_exclude_the_future(paths: PreparedPaths) -> None:
    valid_cases = load_cases(paths, "valid")
    test_cases = load_cases(paths, "test")
    for history, test_target in zip(valid_cases.histories, test_cases.targets, strict=True):
        assert test_target not in history  # the test event lies in the future: it stays rankable
    assert all(len(v) + 1 == len(t) for v, t in zip(valid_cases.histories, test_cases.histories, strict=True))


def test_cold_slice_is_the_targets_never_seen_in_training(paths: PreparedPaths) -> None:
    cases = load_cases(paths, "test")
    user_ids, item_ids = _ids(paths)
    cold_targets = {item_ids[int(t)] for t in cases.targets[cases.cold]}
    cold_case_users = sorted(int(user_ids[int(u)]) for u in cases.user_idx[cases.cold])
    assert cold_targets == {COLD_ITEM}
    assert cold_case_users == cold_users()
    result = evaluate_scorer(Popularity.fit(paths), cases)
    assert result["cold_cases"] == COLD_USERS and result["cases"] == USERS
    # Never watched in training, the cold video sits at the bottom of the popularity ranking.
    assert result["cold_hr@20"] == 0.0 and result["cold_mrr@50"] < 0.05
    assert result["hr@20"] > 0.5


def test_itemknn_and_mf_beat_popularity_where_co_occurrence_is_strong(paths: PreparedPaths) -> None:
    cases = load_cases(paths, "test")
    warm = cases.subset(np.flatnonzero(~cases.cold))
    matrix = train_matrix(paths, USERS, cases.n_items)
    results = {
        name: evaluate_scorer(scorer, warm, ks=(1, 3, 10))
        for name, scorer in {
            "popularity": Popularity.fit(paths),
            "itemknn": ItemKNN.fit(matrix, neighbours=20),
            "mf": ImplicitALS.fit(matrix, ALSSettings(factors=8, reg=1.0, alpha=3.0, iterations=10)),
        }.items()
    }
    # Each user's 2 remaining videos of the own group are all that co-occur with the history.
    assert results["itemknn"]["hr@3"] == 1.0
    assert results["mf"]["hr@3"] >= 0.9
    # Popularity shows group 0 to everyone: right for group 0's users only.
    assert results["popularity"]["hr@3"] < 0.6
    for name in ("itemknn", "mf"):
        assert results[name]["ndcg@10"] > results["popularity"]["ndcg@10"] + 0.3
    # Personal lists cover far more of the catalogue than one list for all.
    assert results["itemknn"]["coverage@3"] > 2 * results["popularity"]["coverage@3"]


def test_mf_is_deterministic_by_seed(paths: PreparedPaths) -> None:
    matrix = train_matrix(paths, USERS, 42)
    a = ImplicitALS.fit(matrix, ALSSettings(factors=8, iterations=3, seed=1)).item_embeddings()
    b = ImplicitALS.fit(matrix, ALSSettings(factors=8, iterations=3, seed=1)).item_embeddings()
    c = ImplicitALS.fit(matrix, ALSSettings(factors=8, iterations=3, seed=2)).item_embeddings()
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_missing_prepared_dataset_says_what_to_run(tmp_path: Path) -> None:
    from recsys.errors import MissingInputError

    with pytest.raises(MissingInputError, match="recsys data prepare movielens-100k"):
        load_cases(PreparedPaths.of(tmp_path, "movielens-100k"), "test")


def test_chance_metrics_are_the_exact_expectation_over_each_cases_candidates() -> None:
    cases = EvalCases(
        split="test",
        user_idx=np.array([0, 1]),
        targets=np.array([2, 3]),
        # Candidates: 5 items less {0, 1} = 3; less {0} (the re-watched target 3 stays one) = 4.
        histories=[np.array([0, 1, 1]), np.array([0, 3])],
        cold=np.array([False, True]),
        n_items=5,
    )
    result = chance_metrics(cases, ks=(1, 2, 10))
    three = (1 + 1 / np.log2(3) + 1 / 2) / 3
    four = (1 + 1 / np.log2(3) + 1 / 2 + 1 / np.log2(5)) / 4
    assert result["ndcg@10"] == pytest.approx((three + four) / 2)
    assert result["cold_ndcg@10"] == pytest.approx(four)
    assert result["hr@2"] == pytest.approx((2 / 3 + 2 / 4) / 2)
    assert result["cold_mrr@2"] == pytest.approx((1 + 1 / 2) / 4)
    assert result["hr@10"] == 1.0 and result["cold_hr@1"] == pytest.approx(1 / 4)
    assert result["cases"] == 2 and result["cold_cases"] == 1


class RandomScores:
    """Uniformly random scores: the ranker `chance_metrics` takes the expectation of."""

    def __init__(self, n_items: int, seed: int) -> None:
        self.n_items, self.rng = n_items, np.random.default_rng(seed)

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        return self.rng.random((len(user_idx), self.n_items))


def test_chance_metrics_match_the_mean_of_random_rankings(paths: PreparedPaths) -> None:
    cases = load_cases(paths, "test")
    expected = chance_metrics(cases)
    draws = [evaluate_scorer(RandomScores(cases.n_items, seed), cases) for seed in range(300)]  # seeded: fixed means
    for name in ("hr@10", "ndcg@10", "mrr@20", "cold_hr@10", "cold_ndcg@50"):
        assert np.mean([d[name] for d in draws]) == pytest.approx(expected[name], rel=0.05), name
    # Far below the scorer that knows the answers (1.0 everywhere), and above popularity on the cold slice.
    assert expected["ndcg@10"] < 0.5 and expected["cold_ndcg@10"] > evaluate_scorer(
        Popularity.fit(paths), cases)["cold_ndcg@10"]


class BrokenScores:
    """Ranks by a fixed row in which some scores are NaN or infinite."""

    def __init__(self, n_items: int, bad: dict[int, float]) -> None:
        self.row = np.zeros(n_items, dtype=np.float32)
        for item, value in bad.items():
            self.row[item] = value

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.tile(self.row, (len(user_idx), 1))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_nan_or_infinite_score_is_an_error_not_the_top_of_a_ranking(paths: PreparedPaths, value: float) -> None:
    from recsys.errors import InvalidScoreError

    cases = load_cases(paths, "test")
    scorer = BrokenScores(cases.n_items, {int(cases.targets[0]): value, 3: value})
    # 60 users in one batch, 2 bad items each; the target's own score among them, so it is not ranked first.
    message = (r"scorer 'broken' scored a batch: 120 NaN or infinite values in 60 rows x \d+ "
               r"\(the first: user_idx \d+, column \d+, value (nan|-?inf)\); a ranking is never made from them")
    with pytest.raises(InvalidScoreError, match=message):
        evaluate_scorer(scorer, cases, batch_size=256, name="broken")
    with pytest.raises(InvalidScoreError, match=r"scorer 'BrokenScores' scored a batch: "):
        evaluate_scorer(scorer, cases)


class TimedScorer:
    """Ranks by a fixed order, and records the times it was asked to rank at."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self.asked: list[int] = []

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        raise AssertionError("a scorer that reads other users' views must be asked as of a time")

    def score_before(self, user_idx: np.ndarray, histories: Sequence[np.ndarray], before: np.ndarray | None
                     ) -> np.ndarray:
        assert before is not None
        self.asked.extend(before.tolist())
        return np.tile(-np.arange(self.n_items, dtype=np.float32), (len(user_idx), 1))


def test_a_scorer_reading_other_users_views_ranks_each_test_case_as_of_its_target_time(paths: PreparedPaths) -> None:
    cases = load_cases(paths, "test")
    scorer = TimedScorer(cases.n_items)
    evaluate_scorer(scorer, cases, batch_size=7)
    test = pl.read_parquet(paths.test)
    assert scorer.asked == test["timestamp"].to_list()  # each case at its own target's time, in case order
    assert len(set(scorer.asked)) > 1
