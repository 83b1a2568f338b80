"""What the MLflow UI is given to show: experiment kind and description, nested pipeline runs,
run names, datasets with digests, and the labels that tell runs apart."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient

from recsys.cli import main
from recsys.tracking.inputs import input_digests, log_tables
from recsys.tracking.runs import compare_runs, run_labels, runs_table, summary
from recsys.tracking.store import (
    DESCRIPTION_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_RUN_ENV,
    experiment_id,
    pipeline_run,
    start_run,
)


def _name() -> str:
    return f"ui-{uuid.uuid4().hex[:8]}"


def _splits(folder: Path, users: int) -> dict[str, Path]:
    """A train split and a catalogue as parquet files; `users` changes the train split's content."""
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"user_idx": list(range(users)), "item_idx": [u % 3 for u in range(users)],
                  "timestamp": list(range(users))}).write_parquet(folder / "train.parquet")
    pl.DataFrame({"item_idx": [0, 1, 2], "item_id": ["a", "b", "c"], "title": ["x", "y", ""]}).write_parquet(
        folder / "items.parquet")
    return {"train": folder / "train.parquet", "catalogue": folder / "items.parquet"}


def test_experiment_is_a_model_training_experiment_with_a_description() -> None:
    name = _name()
    experiment = MlflowClient().get_experiment(experiment_id(name))
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    assert name in experiment.tags[DESCRIPTION_TAG] and "train_retrieval" in experiment.tags[DESCRIPTION_TAG]


def test_an_experiment_made_before_the_tags_gets_them_and_keeps_its_own() -> None:
    name = _name()
    mlflow.create_experiment(name, tags={DESCRIPTION_TAG: "my own words"})
    experiment = MlflowClient().get_experiment(experiment_id(name))
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert experiment.tags[DESCRIPTION_TAG] == "my own words"


def test_runs_inside_a_pipeline_run_nest_under_it_and_single_steps_stay_top_level() -> None:
    name = _name()
    with pipeline_run(name, "demo", {"preset": "small"}, inputs={}, run_name="demo small s0") as parent:
        assert os.environ[PARENT_RUN_ENV] == parent.info.run_id
        with start_run(name, "prepare", {}, inputs={}, run_name="prepare leave-one-out u5 i5") as first:
            pass
        with start_run(name, "train_retrieval", {"dim": 64}, inputs={}, run_name="train_retrieval gru fused d64 s0"):
            mlflow.log_metric("val_ndcg_10", 0.2)  # goes to the child, not the parent
        mlflow.log_metric("seconds.total", 12.0)  # the parent is the active run again
    assert PARENT_RUN_ENV not in os.environ
    with start_run(name, "evaluate", {}, inputs={}) as alone:
        pass

    table = runs_table(name)
    parents = dict(zip(table.get_column("run_name"), table.get_column("parent_run_id"), strict=True))
    assert parents == {"demo small s0": None, "prepare leave-one-out u5 i5": parent.info.run_id,
                       "train_retrieval gru fused d64 s0": parent.info.run_id, "evaluate": None}
    client = MlflowClient()
    assert client.get_run(parent.info.run_id).data.metrics == {"seconds.total": 12.0}
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert client.get_run(first.info.run_id).info.status == "FINISHED"
    assert alone.info.run_id in table.get_column("run_id").to_list()


def test_a_failing_step_fails_its_run_and_the_pipeline_run() -> None:
    name = _name()
    with pytest.raises(RuntimeError), pipeline_run(name, "demo", {}, inputs={}) as parent:
        with start_run(name, "ingest", {}, inputs={}) as child:
            raise RuntimeError("decoder crashed")
    client = MlflowClient()
    assert client.get_run(child.info.run_id).info.status == "FAILED"
    assert client.get_run(parent.info.run_id).info.status == "FAILED"
    assert PARENT_RUN_ENV not in os.environ


def test_tables_are_logged_as_datasets_with_digest_source_and_context(tmp_path: Path) -> None:
    name = _name()
    tables = _splits(tmp_path / "a", users=6)
    with start_run(name, "train_retrieval", {}, inputs={}) as run:
        digests = log_tables(name, tables)
    logged = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    by_name = {d.dataset.name: d for d in logged}
    assert set(by_name) == {f"{name}/train", f"{name}/catalogue"}
    train = by_name[f"{name}/train"]
    assert train.dataset.digest == digests["train"]
    assert str(tables["train"].resolve()) in train.dataset.source
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"
    assert '"num_rows": 6' in train.dataset.profile
    assert input_digests(MlflowClient().get_run(run.info.run_id)) == digests


def test_two_corpora_differing_only_by_folder_are_told_apart_by_their_data(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    name = _name()
    ids = []
    for folder, users in (("first", 6), ("second", 9), ("second", 9)):
        tables = _splits(tmp_path / folder, users)
        config = {"processed_dir": str(tmp_path / folder), "dim": 64, "seed": 0}
        with start_run(name, "train_retrieval", config, inputs={}, run_name="train_retrieval gru fused d64 s0") as run:
            log_tables(name, tables)
            mlflow.log_metric("test_ndcg_10", 0.1 + users / 100)
        ids.append(run.info.run_id)
    table = runs_table(name).sort("start_time")
    digest = table.get_column("datasets.train").to_list()
    assert digest[0] != digest[1] == digest[2]  # same content, same digest, wherever the file is
    assert table.get_column("datasets.catalogue").n_unique() == 1

    labels = run_labels(table)
    # processed_dir is the only param that differs: the labels use the data's digest instead,
    # and two runs on equal data and params get their run-ID prefix
    assert labels[0] == f"train {digest[0][:6]}"
    assert labels[1] == f"train {digest[1][:6]} [{ids[1][:6]}]" and labels[2].endswith(f"[{ids[2][:6]}]")
    assert "data:train" in summary(table).columns and "data:catalogue" not in summary(table).columns

    comparison = compare_runs(ids[0], ids[1])
    assert comparison.names == ("train_retrieval gru fused d64 s0",) * 2
    catalogue = table.get_column("datasets.catalogue")[0]
    assert comparison.datasets.rows() == [("catalogue", catalogue, catalogue), ("train", digest[0], digest[1])]
    assert comparison.params.get_column("param").to_list() == ["processed_dir"]
    assert main(["runs", "compare", ids[0], ids[1]]) == 0
    out = capsys.readouterr().out
    assert f"a = {ids[0]} (train_retrieval gru fused d64 s0)" in out
    assert "datasets (digests):" in out and digest[1] in out
    assert "test_ndcg_10" in out and "0.03" in out  # the same figure the UI's compare view shows


def test_run_names_say_what_differs() -> None:
    from recsys.config import ContentConfig, PrepareConfig, RetrievalConfig
    from recsys.content.train import run_name as content_name
    from recsys.data.prepare import run_name as prepare_name
    from recsys.twotower.build import run_name as retrieval_name

    assert retrieval_name(RetrievalConfig(dataset="synth"), "fused") == "train_retrieval gru fused d64 s0"
    assert (retrieval_name(RetrievalConfig(dataset="synth", encoder="attention", dim=32, seed=3, ids=False), "title")
            == "train_retrieval attention title no-ids d32 s3")
    assert content_name(ContentConfig(temporal="mean", seed=1)) == "content small mean gated d64 s1"
    assert content_name(ContentConfig(distill_weight=0.5)) == "content small gru gated d64 distill s0"
    assert prepare_name(PrepareConfig(split="temporal", min_weight=0.5)) == "prepare temporal u5 i5 w0.5"
