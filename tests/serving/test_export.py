"""The exported pyfunc ranking model: bundle, registry and champion rule, requests, fresh-process loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
from mlflow import MlflowClient

from recsys.config import ExportConfig
from recsys.serving.export import ExportResult, export
from recsys.serving.pyfunc_model import Ranker, RequestError, RequestTimeout, RequestTooLarge, parse_requests
from recsys.serving.recommend import UnknownUserWarning, recommend
from recsys.serving.registry import CHAMPION, DECISION_TAG, VAL_NDCG_TAG, champion_uri, decide, model_name
from tests import tiny_model
from tests.tiny_model import TinyModel

DATASET = tiny_model.DATASET


@pytest.fixture(scope="module")
def exported(trained_tiny_model: TinyModel, exported_tiny_model: ExportResult) -> tuple[Path, ExportResult]:
    """The session's tiny model and its first export (the registered model's champion): (processed_dir, result)."""
    return trained_tiny_model.processed_dir, exported_tiny_model


@pytest.fixture(scope="module")
def ranker(exported: tuple[Path, ExportResult]) -> Ranker:
    """The champion's ranker, read from the bundle inside the MLflow artifact store."""
    local = mlflow.artifacts.download_artifacts(f"{champion_uri(DATASET)}")
    return Ranker(Path(local) / "artifacts" / "bundle")


def test_first_export_becomes_champion_with_lineage(exported: tuple[Path, ExportResult]) -> None:
    _, result = exported
    assert result.decision.promoted and result.decision.previous_version is None
    client = MlflowClient()
    version = client.get_model_version_by_alias(model_name(DATASET), CHAMPION)
    assert str(version.version) == result.version
    assert float(version.tags[VAL_NDCG_TAG]) == pytest.approx(result.val_metrics["val_ndcg_10"])
    assert version.tags["recsys.export_run"] == result.run_id
    run = client.get_run(result.run_id)
    assert run.data.tags["recsys.step"] == "export"
    assert run.data.tags["recsys.input.train_retrieval"] == version.tags["recsys.train_run"]
    assert run.data.metrics["val_ndcg_10"] == pytest.approx(result.val_metrics["val_ndcg_10"])
    assert [a.path for a in client.list_artifacts(result.run_id, "plots")] == ["plots/item_embeddings.png"]
    # What the registry and the UI show: names, datasets, the version's description and metrics
    assert run.info.run_name == f"export v{result.version} gru none d16 s0"
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {f"{DATASET}/{t}" for t in
                                                                   ("train", "valid", "catalogue")}
    assert f"val_ndcg_10 {result.val_metrics['val_ndcg_10']:.4f}" in version.description
    assert version.tags["recsys.train_run"] in version.description and "first champion" in version.description
    assert champion_uri(DATASET) in client.get_registered_model(model_name(DATASET)).description
    logged_model = mlflow.get_logged_model(result.model_uri.removeprefix("models:/"))
    assert {m.key for m in logged_model.metrics} >= {"val_ndcg_10", "val_hr_10"}
    # the trained model learnt the groups: well above a random ranking (about 0.1 here)
    assert result.val_metrics["val_ndcg_10"] > 0.25


def test_champion_moves_only_when_the_new_version_is_better(exported: tuple[Path, ExportResult]) -> None:
    processed_dir, first = exported
    client = MlflowClient()
    name = model_name(DATASET)
    # the same model again scores the same: not better, so the champion stays
    same = export(ExportConfig(dataset=DATASET, processed_dir=processed_dir))
    assert not same.decision.promoted
    assert "does not beat champion" in same.decision.reason
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == first.version
    assert client.get_model_version(name, same.version).tags[DECISION_TAG] == same.decision.reason
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=same.run_id, artifact_path="champion_decision.json")).read_text())
    assert logged["promoted"] is False and logged["previous_version"] == first.version
    # a champion whose recorded score is lower is beaten by the next export
    client.set_model_version_tag(name, first.version, VAL_NDCG_TAG, "0.01")
    better = export(ExportConfig(dataset=DATASET, processed_dir=processed_dir))
    assert better.decision.promoted and "beats champion" in better.decision.reason
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == better.version
    client.set_registered_model_alias(name, CHAMPION, first.version)  # leave the module's champion as it was
    client.set_model_version_tag(name, first.version, VAL_NDCG_TAG, repr(first.val_metrics["val_ndcg_10"]))


def test_decision_rule() -> None:
    assert decide("m", "1", 0.2, None, None).promoted
    assert decide("m", "2", 0.3, "1", 0.2).promoted
    assert not decide("m", "2", 0.2, "1", 0.2).promoted  # a tie does not move the alias
    assert not decide("m", "2", 0.1, "1", 0.2).promoted
    assert not decide("m", "1", float("nan"), None, None).promoted


def test_logged_model_is_code_plus_safetensors_without_pickle(exported: tuple[Path, ExportResult]) -> None:
    _, result = exported
    local = Path(mlflow.artifacts.download_artifacts(result.model_uri))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".ckpt"))]
    assert any(f.endswith("weights.safetensors") for f in files)
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel
    info = mlflow.models.get_model_info(result.model_uri)
    assert [c.name for c in info.signature.inputs.inputs] == ["user_id", "k", "history", "query"]
    assert [c.name for c in info.signature.outputs.inputs] == ["user_id", "rank", "item_id", "score", "title", "query",
                                                              "content_score", "lexical_score", "taste_score",
                                                              "start_s", "end_s"]
    example = json.loads((local / "input_example.json").read_text())
    assert example["columns"] == ["user_id", "k"]


def test_ranker_excludes_watched_and_ranks_the_users_group_first(ranker: Ranker) -> None:
    answer = ranker.rank(pl.DataFrame({"user_id": ["4", "5"], "k": [5, 3]}))
    assert answer.columns == ["user_id", "rank", "item_id", "score", "title"]
    assert answer.group_by("user_id").len().sort("user_id").rows() == [("4", 5), ("5", 3)]
    user4 = answer.filter(pl.col("user_id") == "4")
    assert user4.get_column("rank").to_list() == [1, 2, 3, 4, 5]
    scores = user4.get_column("score").to_numpy()
    assert (np.diff(scores) <= 0).all()
    recommender = ranker.recommender
    watched = set(recommender.item_ids[recommender.histories[recommender.user_lookup["4"]]])
    assert watched.isdisjoint(user4.get_column("item_id").to_list())
    # Each user watched 9 of the 12 videos of their group: the 3 left are 3 of 39 unwatched videos, so
    # a random top-3 holds about 8% of them; the trained model puts far more of them first.
    users = [str(u) for u in range(1, tiny_model.USERS + 1)]
    top3 = ranker.rank(pl.DataFrame({"user_id": users, "k": [3] * len(users)}))
    own_group = (pl.col("item_id").cast(pl.Int64) - 1) // tiny_model.ITEMS_PER_GROUP == (
        pl.col("user_id").cast(pl.Int64) % tiny_model.GROUPS)
    assert top3.select(own_group.mean()).item() > 0.3


def test_unknown_user_gets_popularity_and_history_is_used(ranker: Ranker) -> None:
    answer = ranker.rank(pd.DataFrame({"user_id": ["nobody"], "k": [4]}))
    counts = ranker.recommender.popularity
    assert answer.get_column("score").to_list() == sorted(counts.tolist(), reverse=True)[:4]
    with_history = ranker.rank(pd.DataFrame({"user_id": ["nobody"], "k": [4], "history": [["13", "14", "15"]]}))
    assert {"13", "14", "15"}.isdisjoint(with_history.get_column("item_id").to_list())
    assert with_history.get_column("score").to_list() != answer.get_column("score").to_list()


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"k": [3]}), "no user_id column"),
        (pd.DataFrame({"user_id": [""]}), "row 0: user_id must be a non-empty string"),
        (pd.DataFrame({"user_id": ["1", None]}), "row 1: user_id must be a non-empty string"),
        (pd.DataFrame({"user_id": [7]}), "user_id must be a non-empty string, got 7"),
        (pd.DataFrame({"user_id": ["1"], "k": [0]}), "k must be a whole number from 1 to 48, got 0"),
        (pd.DataFrame({"user_id": ["1"], "k": [10**9]}), "from 1 to 48"),
        (pd.DataFrame({"user_id": ["1"], "k": ["ten"]}), "got 'ten'"),
        (pd.DataFrame({"user_id": ["1"], "history": ["1,2"]}), "history must be a list of item IDs"),
        (pd.DataFrame({"user_id": ["1"], "history": [["1", "no-such-video"]]}), "unknown history video ID"),
        (pd.DataFrame({"user_id": []}), "no rows"),
    ],
)
def test_malformed_requests_say_what_is_wrong(ranker: Ranker, frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        ranker.rank(frame)


def test_parse_requests_defaults() -> None:
    (request,) = parse_requests(pd.DataFrame({"user_id": [" 12 "]}), max_k=100)
    assert (request.user_id, request.k, request.history) == ("12", 10, None)


@pytest.mark.slow
def test_champion_in_a_fresh_process_equals_recommend(exported: tuple[Path, ExportResult], mlflow_store: str) -> None:
    processed_dir, _ = exported
    users = ["1", "2", "3", "nobody"]
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model({champion_uri(DATASET)!r})\n"
        f"out = model.predict(pd.DataFrame({{'user_id': {users!r}, 'k': [10] * {len(users)}}}))\n"
        "sys.stdout.write('RESULT' + out.to_json(orient='records'))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = pl.DataFrame(json.loads(done.stdout.split("RESULT", 1)[1]))
    for user in users:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnknownUserWarning)  # "nobody" gets the popularity fallback
            expected = recommend(DATASET, user, k=10, processed_dir=processed_dir)
        served = fresh.filter(pl.col("user_id") == user)
        assert served.select("rank", "item_id", "title").rows() == expected.select("rank", "item_id", "title").rows()
        # the served rows are embedded as one batch: float32 rounding differs from one user alone
        np.testing.assert_allclose(served.get_column("score").to_numpy(), expected.get_column("score").to_numpy(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("k", "shown"),
    [([2.5], "2.5"), ([3.0], "3.0"), ([True], "True"), (["5"], "'5'"), ([1, True], "True"), ([1, "5"], "'5'")],
)
def test_k_must_be_an_integer_never_a_bool_float_or_string(ranker: Ranker, k: list[object], shown: str) -> None:
    frame = pd.DataFrame({"user_id": [str(u + 1) for u in range(len(k))], "k": k})
    with pytest.raises(RequestError, match=f"row {len(k) - 1}: k must be a whole number from 1 to 48, got {shown}"):
        ranker.rank(frame)
    # JSON integers beside rows without k reach pandas as floats (NaN for the missing ones): still integers
    answer = ranker.rank(pd.DataFrame({"user_id": ["1", "2"], "k": [5, None]}))
    assert answer.group_by("user_id").len().sort("user_id").rows() == [("1", 5), ("2", 10)]


def test_too_many_rows_are_refused_with_the_limit(ranker: Ranker) -> None:
    frame = pd.DataFrame({"user_id": [str(u) for u in range(1, 8)]})
    with pytest.raises(RequestTooLarge, match="the request has 7 rows; at most 6 rows"):
        parse_requests(frame, max_k=10, max_rows=6)
    assert len(parse_requests(frame, max_k=10, max_rows=7)) == 7


def test_the_rows_of_a_request_are_scored_as_one_batch(ranker: Ranker, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = pd.DataFrame({"user_id": ["1", "2", "3", "someone-new", "4"], "k": [5, 3, 5, 4, 5],
                         "history": [None, None, None, ["1", "2"], ["20"]]})
    scorer = ranker.recommender.model
    batches: list[int] = []
    user_vectors = scorer.user_vectors

    def counted(users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        batches.append(len(users))
        return user_vectors(users, histories)

    monkeypatch.setattr(scorer, "user_vectors", counted)
    answer = ranker.rank(rows)
    assert batches == [5]  # every row in one call of the one scorer
    for row in rows.itertuples():
        one = ranker.recommender.recommend(row.user_id, row.k, True, row.history or ())
        served = answer.filter(pl.col("user_id") == row.user_id)
        assert served.get_column("item_id").to_list() == one.get_column("item_id").to_list()
        np.testing.assert_allclose(served.get_column("score").to_numpy(), one.get_column("score").to_numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_a_request_past_its_deadline_stops_before_scoring(ranker: Ranker, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object) -> np.ndarray:
        raise AssertionError("scored after the deadline")

    monkeypatch.setattr(ranker.recommender.model, "user_vectors", never)
    with pytest.raises(RequestTimeout, match="time ran out"):
        ranker.rank(pd.DataFrame({"user_id": ["1"]}), deadline=time.monotonic() - 1)


def test_the_served_ranking_is_the_evaluated_one(ranker: Ranker, monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys.serving.served_check import served_mismatches

    users = [str(u) for u in range(1, 81, 7)]
    assert served_mismatches(ranker, users) == []
    scored = ranker.scorer.score
    # a scorer that no longer ranks what the index serves: every user is named
    monkeypatch.setattr(ranker.scorer, "score", lambda user_idx, histories: -scored(user_idx, histories))
    assert served_mismatches(ranker, users) == users
