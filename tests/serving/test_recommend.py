"""recommend / similar: the Python functions with a fitted MF model, and the CLI end to end."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.cli import main
from recsys.config import ConfigError
from recsys.data.paths import PreparedPaths
from recsys.evaluation.baselines import ALSSettings, ImplicitALS, train_matrix
from recsys.serving.export import ExportResult
from recsys.serving.recommend import Recommender, UnknownUserWarning
from tests.evaluation.grouped_data import COLD_ITEM, USERS, build_prepared, group_of_item, group_of_user
from tests.tiny_model import TinyModel


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> PreparedPaths:
    return build_prepared(tmp_path_factory.mktemp("grouped"))


@pytest.fixture(scope="module")
def recommender(paths: PreparedPaths) -> Recommender:
    n_items = pl.read_parquet(paths.items).height
    model = ImplicitALS.fit(train_matrix(paths, USERS, n_items), ALSSettings(factors=8, reg=1.0, alpha=3.0))
    return Recommender(paths, model=model)


def _groups(ranking: pl.DataFrame) -> set[int]:
    return {group_of_item(int(i)) for i in ranking["item_id"]}


def _watched(paths: PreparedPaths, user_id: str) -> set[str]:
    user_map = pl.read_parquet(paths.user_map)
    item_map = pl.read_parquet(paths.item_map)
    user_idx = user_map.filter(pl.col("user_id") == user_id)["user_idx"][0]
    events = pl.concat([pl.read_parquet(p) for p in (paths.train, paths.valid, paths.test)])
    items = events.filter(pl.col("user_idx") == user_idx).join(item_map, on="item_idx")
    return set(items["item_id"].to_list())


def test_known_user_gets_unseen_videos_of_their_own_group(paths: PreparedPaths, recommender: Recommender) -> None:
    user = "3"  # group 1
    ranking = recommender.recommend(user, k=2)
    assert ranking.columns == ["rank", "item_id", "title", "score"]
    assert ranking["rank"].to_list() == [1, 2]
    assert _groups(ranking) == {group_of_user(3)}
    assert not set(ranking["item_id"]) & _watched(paths, user)
    assert all(t.startswith(f"Video {i} of group") for i, t in zip(ranking["item_id"], ranking["title"], strict=True))
    assert ranking["score"].is_sorted(descending=True)


def test_include_seen_brings_watched_videos_back(paths: PreparedPaths, recommender: Recommender) -> None:
    ranking = recommender.recommend("3", k=5, exclude_seen=False)
    assert set(ranking["item_id"]) & _watched(paths, "3")


def test_unknown_user_warns_and_gets_the_popularity_ranking(paths: PreparedPaths, recommender: Recommender) -> None:
    with pytest.warns(UnknownUserWarning, match="'nobody' is not known.*most popular"):
        ranking = recommender.recommend("nobody", k=5)
    popularity = pl.read_parquet(paths.items).sort(["train_count", "item_idx"], descending=[True, False])
    assert ranking["item_id"].to_list() == popularity["item_id"].head(5).to_list()
    assert ranking["score"].to_list() == popularity["train_count"].head(5).cast(pl.Float32).to_list()


def test_unknown_user_with_a_history_gets_that_history_s_group(recommender: Recommender) -> None:
    with pytest.warns(UnknownUserWarning, match="ranking from the given history"):
        ranking = recommender.recommend("nobody", k=3, history=["31", "32", "33"])  # group 3
    assert _groups(ranking) == {3}
    assert not {"31", "32", "33"} & set(ranking["item_id"])
    anonymous = recommender.recommend(None, k=3, history=["31", "32", "33"])  # no user ID, no warning
    assert anonymous["item_id"].to_list() == ranking["item_id"].to_list()


def test_bad_requests_are_clear_errors(recommender: Recommender) -> None:
    with pytest.raises(ConfigError, match="k must be at least 1, got 0"):
        recommender.recommend("3", k=0)
    with pytest.raises(ConfigError, match="unknown history video ID.*'nope'"):
        recommender.recommend("3", history=["1", "nope"])
    with pytest.raises(ConfigError, match="unknown video ID.*'nope'.*catalogue"):
        recommender.similar("nope")
    with pytest.raises(ConfigError, match="give a user ID"):
        recommender.recommend(None)


def test_similar_finds_videos_of_the_same_group_and_accepts_cold_videos(recommender: Recommender) -> None:
    ranking = recommender.similar("12", k=5)  # group 1
    assert "12" not in ranking["item_id"].to_list()
    assert _groups(ranking) == {1}
    cold = recommender.similar(COLD_ITEM, k=3)  # never trained on, still in the index
    assert cold.height == 3 and COLD_ITEM not in cold["item_id"].to_list()


def test_k_larger_than_the_catalogue_lists_every_unseen_video(recommender: Recommender) -> None:
    ranking = recommender.recommend("3", k=1000)
    assert ranking.height == 42 - len(recommender.histories[recommender.user_lookup["3"]])
    assert ranking["rank"].to_list() == list(range(1, ranking.height + 1))


# --------------------------------------------------------------------------------------------
# CLI


@pytest.mark.slow
def test_cli_unknown_user_message_and_popularity_fallback(
    trained_tiny_model: TinyModel, exported_tiny_model: ExportResult, capsys: pytest.CaptureFixture[str]
) -> None:
    processed_dir = trained_tiny_model.processed_dir
    code = main(["recommend", "--user-id", "nobody", "-k", "3", "--processed-dir", str(processed_dir),
                 "--version", exported_tiny_model.version])
    out, err = capsys.readouterr()
    assert code == 0
    assert "user 'nobody' is not known" in err and "most popular videos" in err
    assert f"models:/recsys-movielens-100k/{exported_tiny_model.version}" in err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["rank", "video", "score", "title"] and len(lines) == 4
    items = pl.read_parquet(PreparedPaths.of(processed_dir, "movielens-100k").items)
    top = items.sort(["train_count", "item_idx"], descending=[True, False]).row(0, named=True)
    assert lines[1].split()[:2] == ["1", top["item_id"]] and top["title"] in lines[1]


def test_cli_invalid_k_is_a_clear_error(paths: PreparedPaths, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["recommend", "--user-id", "3", "-k", "0", "--processed-dir", str(paths.root.parent)])
    assert exit_info.value.code == 2
    assert "k must be at least 1, got 0" in capsys.readouterr().err


def test_cli_without_a_registered_model_says_how_to_make_one(
    paths: PreparedPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["recommend", "--dataset", "never-exported", "--user-id", "3", "--processed-dir",
                 str(paths.root.parent)])
    assert code == 1
    err = capsys.readouterr().err
    assert "no registered model recsys-never-exported with alias 'champion'" in err
    assert "recsys export never-exported" in err and "--run-id" in err and "Traceback" not in err


def test_cli_without_a_trained_model_says_how_to_train(
    paths: PreparedPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["recommend", "--user-id", "3", "--processed-dir", str(paths.root.parent), "--run-id", "r0"])
    assert code == 1
    assert "no trained model 'r0'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_recommend_and_similar_with_a_trained_model(
    trained_tiny_model: TinyModel, exported_tiny_model: ExportResult, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.tiny_model import DATASET

    processed_dir, result = trained_tiny_model.processed_dir, trained_tiny_model.result
    capsys.readouterr()  # drop any earlier output
    code = main(["recommend", "--user-id", "6", "-k", "3", "--processed-dir", str(processed_dir),
                 "--run-id", result.run_id])
    out, err = capsys.readouterr()
    assert code == 0 and "not known" not in err and f"trained run {result.run_id}" in err
    lines = out.strip().splitlines()[1:]
    expected = Recommender.load(DATASET, processed_dir, result.run_id).recommend("6", k=3)
    watched = _watched(PreparedPaths.of(processed_dir, DATASET), "6")
    for line, row in zip(lines, expected.iter_rows(named=True), strict=True):
        rank, video, score = line.split()[:3]
        # External video IDs (MovieLens item numbers) with their own titles, never internal indices.
        assert (int(rank), video) == (row["rank"], row["item_id"])
        assert line.endswith(f"Video {video} of group {(int(video) - 1) // 12} (1995)")
        assert float(score) == pytest.approx(row["score"], abs=1e-4)
        assert video not in watched
    code = main(["similar", "--item-id", "1", "-k", "3", "--processed-dir", str(processed_dir),
                 "--version", exported_tiny_model.version])
    out, _ = capsys.readouterr()
    assert code == 0
    similar = [line.split()[1] for line in out.strip().splitlines()[1:]]
    assert len(similar) == 3 and "1" not in similar
    code = main(["similar", "--item-id", "nope", "--processed-dir", str(processed_dir),
                 "--version", exported_tiny_model.version])
    err = capsys.readouterr().err
    assert code == 1 and "recsys: error: unknown video ID(s) 'nope'" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_and_rest_model_rank_alike_in_every_format(
    trained_tiny_model: TinyModel, exported_tiny_model: ExportResult, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """`recommend` without --run-id ranks with the registered version `serve` serves: the same rows."""
    import mlflow
    import pandas as pd

    processed_dir, version = trained_tiny_model.processed_dir, exported_tiny_model.version
    served = mlflow.pyfunc.load_model(f"models:/recsys-movielens-100k/{version}")
    users = ["6", "41", "nobody"]
    rest = pl.from_pandas(served.predict(pd.DataFrame({"user_id": users, "k": [4, 4, 4]})))
    base = ["recommend", "-k", "4", "--processed-dir", str(processed_dir), "--version", version]
    for user in users:
        assert main([*base, "--user-id", user, "--format", "csv"]) == 0
        cli = pl.read_csv(io.StringIO(capsys.readouterr().out), schema_overrides={"item_id": pl.String})
        expected = rest.filter(pl.col("user_id") == user)
        assert cli["item_id"].to_list() == expected["item_id"].to_list()
        np.testing.assert_allclose(cli["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert main([*base, "--user-id", "6", "--format", "json"]) == 0
    assert [row["item_id"] for row in json.loads(capsys.readouterr().out)] == rest.filter(
        pl.col("user_id") == "6")["item_id"].to_list()
    # Every user at once, streamed in batches of 7 users: the same rankings as one request each.
    out = tmp_path / "top.parquet"
    assert main([*base, "--all-users", "--out", str(out), "--batch-size", "7"]) == 0
    every = pl.read_parquet(out)
    n_users = pl.read_parquet(PreparedPaths.of(processed_dir, "movielens-100k").user_map).height
    assert every["user_id"].n_unique() == n_users and every.height == 4 * n_users
    assert every.columns == ["user_id", "rank", "item_id", "title", "score"]
    for user in ("6", "41"):
        assert every.filter(pl.col("user_id") == user)["item_id"].to_list() == rest.filter(
            pl.col("user_id") == user)["item_id"].to_list()


def test_all_users_needs_an_output_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["recommend", "--all-users"])
    assert "--all-users writes a Parquet file: give it with --out FILE" in capsys.readouterr().err


def test_a_nan_score_is_an_error_never_the_top_of_a_ranking(paths: PreparedPaths, recommender: Recommender) -> None:
    from recsys.errors import InvalidScoreError

    class Broken:
        """The fitted model, but one user's vector is NaN (a diverged model, a corrupt weight)."""

        def item_embeddings(self) -> np.ndarray:
            return recommender.model.item_embeddings()

        def item_vectors(self) -> np.ndarray:
            return recommender.model.item_vectors()

        def user_vectors(self, user_idx: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
            vectors = recommender.model.user_vectors(user_idx, histories).copy()
            vectors[-1, 0] = np.nan
            return vectors

    broken = Recommender(paths, model=Broken())
    message = (r"the model's user vectors: 1 NaN or infinite values in 2 rows x \d+ "
               r"\(the first: user_idx \d+, column 0, value nan\); its scores would rank nothing")
    with pytest.raises(InvalidScoreError, match=message):
        broken.recommend_many(["3", "4"], [5, 5], [(), ()])
