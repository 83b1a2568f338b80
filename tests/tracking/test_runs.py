"""Run tables and comparisons over runs logged into the test session's temporary MLflow store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid

import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient

from recsys.cli import main
from recsys.config import ConfigError, RunsConfig
from recsys.errors import MissingInputError
from recsys.tracking.runs import compare_runs, key_metrics, key_params, lineage, runs_table, summary
from recsys.tracking.store import KILLED_TAG, OWNER_TAG, mark_dead_runs, owner_is_alive, process_owner, start_run


def _log(experiment: str, lr: float, dim: int, ndcg: float, loss: list[float], step: str = "train") -> str:
    config = {"lr": lr, "dim": dim, "seed": 0}
    with start_run(experiment, step, config, inputs={"prepare": "abc"}) as run:
        for epoch, value in enumerate(loss):
            mlflow.log_metric("train_loss", value, step=epoch)
        mlflow.log_metric("val_ndcg_10", ndcg)
        return run.info.run_id


@pytest.fixture
def experiment() -> tuple[str, list[str]]:
    """A fresh experiment with three training runs of known params and metrics."""
    name = f"runs-{uuid.uuid4().hex[:8]}"
    ids = [
        _log(name, lr=0.01, dim=32, ndcg=0.20, loss=[1.0, 0.8]),
        _log(name, lr=0.001, dim=64, ndcg=0.35, loss=[1.0, 0.5]),
        _log(name, lr=0.001, dim=32, ndcg=0.10, loss=[1.0, 0.9]),
    ]
    return name, ids


def test_runs_table_sorted_by_metric(experiment: tuple[str, list[str]]) -> None:
    name, ids = experiment
    table = runs_table(name, sort_by="val_ndcg_10")
    assert table.get_column("run_id").to_list() == [ids[1], ids[0], ids[2]]
    assert table.get_column("metrics.val_ndcg_10").to_list() == pytest.approx([0.35, 0.20, 0.10])
    # the final value of a per-epoch metric
    assert table.get_column("metrics.train_loss").to_list() == pytest.approx([0.5, 0.8, 0.9])
    assert set(table.get_column("step")) == {"train"}
    ascending = runs_table(name, sort_by="metrics.train_loss", ascending=True)
    assert ascending.get_column("run_id").to_list() == [ids[1], ids[0], ids[2]]


def test_runs_table_default_order_is_newest_first(experiment: tuple[str, list[str]]) -> None:
    name, ids = experiment
    assert runs_table(name).get_column("run_id").to_list() == ids[::-1]
    assert runs_table(name, limit=2).height == 2


def test_key_params_are_those_that_vary(experiment: tuple[str, list[str]]) -> None:
    name, _ = experiment
    table = runs_table(name)
    assert set(key_params(table)) == {"params.lr", "params.dim"}
    shown = summary(table, ["val_ndcg_10"])
    assert shown.columns == ["run_id", "experiment", "step", "status", "dim", "lr", "val_ndcg_10"]
    assert "seed" not in shown.columns  # constant across runs, so not a key param


def test_step_filter_and_key_metrics_of_mixed_steps(experiment: tuple[str, list[str]]) -> None:
    name, ids = experiment
    with start_run(name, "prepare", {"min_rating": 4}, inputs={}) as prepare_run:
        mlflow.log_metric("count.users", 100)
    assert runs_table(name, step="train").get_column("run_id").to_list() == ids[::-1]
    mixed = runs_table(name)
    assert mixed.get_column("run_id").to_list()[0] == prepare_run.info.run_id
    # NDCG@10 first, then what most runs have; min_rating is set by one run only, so it is no key param
    assert key_metrics(mixed)[:2] == ["metrics.val_ndcg_10", "metrics.train_loss"]
    assert "params.min_rating" not in key_params(mixed)


def test_unknown_metric_and_experiment_are_clear_errors(experiment: tuple[str, list[str]]) -> None:
    name, _ = experiment
    with pytest.raises(ConfigError, match="no listed run has that metric; metrics logged: train_loss, val_ndcg_10"):
        runs_table(name, sort_by="recall@5")
    with pytest.raises(MissingInputError, match="no experiment 'no-such-dataset'"):
        runs_table("no-such-dataset")


def test_compare_runs_params_that_differ_and_deltas(experiment: tuple[str, list[str]]) -> None:
    _, ids = experiment
    comparison = compare_runs(ids[0], ids[1])
    assert comparison.params.rows() == [("dim", "32", "64"), ("lr", "0.01", "0.001")]
    deltas = {row["metric"]: row["delta"] for row in comparison.metrics.iter_rows(named=True)}
    assert deltas == pytest.approx({"train_loss": -0.3, "val_ndcg_10": 0.15})
    with pytest.raises(MissingInputError, match="no run 'feedbeef'"):
        compare_runs(ids[0], "feedbeef")


def test_cli_lists_and_compares(experiment: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    name, ids = experiment
    assert main(["runs", "--experiment", name, "--sort-by", "val_ndcg_10"]) == 0
    out = capsys.readouterr().out
    # best run first, full run IDs printed
    assert out.index(ids[1]) < out.index(ids[0]) < out.index(ids[2])
    assert main(["runs", "compare", ids[2], ids[1]]) == 0
    out = capsys.readouterr().out
    params_part, metrics_part = out.split("params that differ:")[1].split("metrics (delta")
    assert "dim" in params_part and "lr" not in params_part  # both runs used lr 0.001
    assert "0.25" in metrics_part  # val_ndcg_10: 0.35 - 0.10
    assert main(["runs", "compare", ids[0], "nope"]) == 1
    assert "no run 'nope'" in capsys.readouterr().err


def test_runs_config_checks_run_ids() -> None:
    with pytest.raises(ConfigError, match="needs two run IDs"):
        RunsConfig(action="compare", run_a="x")
    with pytest.raises(ConfigError, match="takes no run IDs"):
        RunsConfig(run_a="x")


def test_lineage_follows_input_run_ids() -> None:
    name = f"lineage-{uuid.uuid4().hex[:8]}"
    with start_run(name, "prepare", {}, inputs={"raw": "f" * 64}) as prepare_run:
        pass
    with start_run(name, "train_retrieval", {}, inputs={"prepare_run": prepare_run.info.run_id}) as train_run:
        pass
    with start_run(name, "export", {}, inputs={"train_retrieval": train_run.info.run_id,
                                               "prepared": "0" * 64}) as export_run:
        pass
    table = lineage(export_run.info.run_id)
    assert table.select("depth", "step", "via").rows() == [
        (0, "export", ""), (1, "train_retrieval", "train_retrieval"), (2, "prepare", "prepare_run")]
    assert table.get_column("run_id").to_list()[2] == prepare_run.info.run_id
    with pytest.raises(MissingInputError, match="no run 'nope'"):
        lineage("nope")


def test_a_run_whose_process_was_killed_is_listed_as_killed(capsys: pytest.CaptureFixture[str]) -> None:
    name = f"killed-{uuid.uuid4().hex[:8]}"
    # A real process opens a run and is SIGKILLed inside it: nothing of it can end the run.
    script = (f"import os, signal; from recsys.tracking.store import start_run\n"
              f"with start_run({name!r}, 'train_retrieval', {{}}, inputs={{}}):\n"
              f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    process = subprocess.run([sys.executable, "-c", script], env=os.environ.copy(), timeout=120)
    assert process.returncode == -signal.SIGKILL
    with start_run(name, "evaluate", {}, inputs={}) as alive:  # this process is alive: its run stays RUNNING
        assert main(["runs", "--experiment", name]) == 0
        out = capsys.readouterr().out
        table = runs_table(name)
    status = dict(zip(table.get_column("step").to_list(), table.get_column("status").to_list(), strict=True))
    assert status == {"train_retrieval": "KILLED", "evaluate": "RUNNING"}
    assert "KILLED" in out and "RUNNING" in out
    killed = table.filter(pl.col("step") == "train_retrieval").get_column("run_id").item()
    assert "was gone" in MlflowClient().get_run(killed).data.tags[KILLED_TAG]
    assert MlflowClient().get_run(alive.info.run_id).info.status == "FINISHED"


def test_dead_owners_are_told_from_live_ones_and_reused_pids() -> None:
    host = socket.gethostname()
    assert owner_is_alive(process_owner()) is True
    _, pid, start = process_owner().rsplit(":", 2)
    assert owner_is_alive(f"{host}:{pid}:{int(start) + 1}") is False  # the same PID, started later: reused
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert owner_is_alive(f"{host}:{finished.stdout.strip()}:1") is False
    assert owner_is_alive(f"elsewhere.example:{pid}:{start}") is None  # cannot tell: left RUNNING
    with start_run(f"owner-{uuid.uuid4().hex[:8]}", "train", {}, inputs={}) as run:
        assert run.data.tags[OWNER_TAG] == process_owner()
        assert run.info.run_id not in mark_dead_runs()
