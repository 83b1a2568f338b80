"""`recsys evaluate`: one table for trained runs, baselines and the oracle, logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from recsys.cli import main
from recsys.config import ConfigError, EvaluateConfig
from recsys.data.paths import PreparedPaths
from recsys.errors import MissingInputError
from recsys.evaluation.evaluate import TIMINGS, SkippedModelWarning, evaluate, metric_key
from recsys.twotower.datamodule import RetrievalDataModule
from recsys.twotower.trained_model import load_trained
from recsys.twotower.validation import VAL_METRIC, validate
from tests.evaluation.grouped_data import USERS, build_prepared
from tests.tiny_model import DATASET, TinyModel


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> PreparedPaths:
    return build_prepared(tmp_path_factory.mktemp("grouped"))


def test_baselines_are_evaluated_and_logged_without_a_trained_model(paths: PreparedPaths) -> None:
    config = EvaluateConfig(processed_dir=paths.root.parent, mf_factors=8, mf_reg=(1.0,))
    with pytest.warns(UserWarning, match="no trained two-tower model.*recsys train retrieval movielens-100k"):
        table = evaluate(config)
    assert table["model"].to_list() == ["popularity", "itemknn", "mf", "ease", "transitions"]
    assert set(table["cases"]) == {USERS}
    ndcg = dict(zip(table["model"], table["ndcg@10"], strict=True))
    assert ndcg["itemknn"] > ndcg["popularity"] and ndcg["mf"] > ndcg["popularity"]
    assert "cold_ndcg@10" in table.columns and "ndcg@10/oracle" not in table.columns
    assert table["rank_s"].min() > 0 and table["fit_s"].min() > 0  # what each baseline cost, all fitted here

    run = mlflow.get_run(table["mlflow_run_id"][0])
    assert run.data.metrics["ease/fit_s"] == pytest.approx(table["fit_s"][3])
    assert run.data.tags["recsys.step"] == "evaluate" and run.data.tags["recsys.split"] == "test"
    assert run.data.metrics[metric_key("itemknn", "ndcg@10")] == pytest.approx(ndcg["itemknn"])
    assert run.data.metrics["mf/cold_hr_at_50"] == pytest.approx(table["cold_hr@50"][2])
    client = mlflow.MlflowClient()
    assert {"evaluation.json", "config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # no two-tower model, so no modality ablation: only the baselines' metric@K curves
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/metrics_at_k.png"]


def test_a_sample_of_cases_is_seeded(paths: PreparedPaths) -> None:
    config = EvaluateConfig(processed_dir=paths.root.parent, baselines=("popularity",), max_cases=20, seed=3)
    with pytest.warns(UserWarning):
        first, second = evaluate(config), evaluate(config)
    assert first["cases"][0] == 20
    assert first.drop("mlflow_run_id", *TIMINGS).equals(second.drop("mlflow_run_id", *TIMINGS))


def test_requested_run_that_does_not_exist_is_an_error(paths: PreparedPaths) -> None:
    with pytest.raises(MissingInputError, match="no trained model 'nope'"):
        evaluate(EvaluateConfig(processed_dir=paths.root.parent, run_ids=("nope",)))


def test_config_rejects_bad_cut_offs() -> None:
    with pytest.raises(ConfigError, match="ks must be"):
        EvaluateConfig(ks=(0, 10))


def test_cli_prints_the_table(paths: PreparedPaths, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", "movielens-100k", "--processed-dir", str(paths.root.parent),
                 "--baselines", "popularity", "itemknn", "--ks", "5", "10"])
    out = capsys.readouterr().out
    assert code == 0
    assert "ndcg@5" in out and "itemknn" in out and "popularity" in out and "mf" not in out.split()
    assert f"{USERS} held-out interactions" in out


@pytest.mark.slow
def test_oracle_on_the_synthetic_corpus_is_the_ceiling(tmp_path: Path) -> None:
    from recsys.config import PrepareConfig, SynthConfig
    from recsys.data.prepare import prepare
    from recsys.synthetic.generator import synthesize

    synthesize(SynthConfig(preset="small", raw_dir=tmp_path / "raw", workers=1))
    prepare(PrepareConfig(dataset="synth", raw_dir=tmp_path / "raw", processed_dir=tmp_path / "processed"))
    with pytest.warns(UserWarning, match="no trained two-tower model"):
        table = evaluate(EvaluateConfig(dataset="synth", processed_dir=tmp_path / "processed",
                                        raw_dir=tmp_path / "raw", baselines=("popularity", "itemknn")))
    rows = {row["model"]: row for row in table.iter_rows(named=True)}
    assert rows["oracle"]["ndcg@10/oracle"] == pytest.approx(1.0)
    for name in ("popularity", "itemknn"):
        assert rows[name]["ndcg@10"] < rows["oracle"]["ndcg@10"]
        assert rows[name]["ndcg@10/oracle"] == pytest.approx(rows[name]["ndcg@10"] / rows["oracle"]["ndcg@10"])
    # Cold videos have no training history, but the truth knows their topic.
    assert rows["oracle"]["cold_ndcg@10"] > rows["popularity"]["cold_ndcg@10"]
    # Without the raw corpus the oracle is left out with a note; the rest is still evaluated.
    with pytest.warns(SkippedModelWarning, match="oracle skipped .*recsys data synth"):
        table = evaluate(EvaluateConfig(dataset="synth", processed_dir=tmp_path / "processed",
                                        raw_dir=tmp_path / "elsewhere", baselines=("popularity",)))
    assert table["model"].to_list() == ["popularity"] and "ndcg@10/oracle" not in table.columns


@pytest.mark.slow
def test_trained_two_tower_run_is_evaluated_beside_the_baselines(trained_tiny_model: TinyModel) -> None:
    processed_dir, result = trained_tiny_model.processed_dir, trained_tiny_model.result
    table = evaluate(EvaluateConfig(processed_dir=processed_dir, run_ids=(result.run_id,), split="valid",
                                    baselines=("popularity",)))
    rows = {row["model"]: row for row in table.iter_rows(named=True)}
    assert set(rows) == {"two-tower no-content", "popularity"}
    # The same protocol as the model's own validation: the same NDCG@10 on the validation split as the
    # validation ranking over every validation user, with the fitted scoring (fresh views before each target).
    scorer = load_trained(processed_dir, DATASET, result.run_id)
    data = RetrievalDataModule(PreparedPaths.of(processed_dir, DATASET), validation_users=0)
    data.setup("fit")
    batch = data.eval_batch(data.fresh_users, data.fresh_items, data.fresh_times)
    scored = validate(scorer.model, [batch], scorer.new_video_scoring)[VAL_METRIC]
    assert rows["two-tower no-content"]["ndcg@10"] == pytest.approx(scored, abs=1e-4)
    assert rows["two-tower no-content"]["ndcg@10"] > rows["popularity"]["ndcg@10"]
    run = mlflow.get_run(table["mlflow_run_id"][0])
    assert run.data.tags["recsys.input.model.two-tower-no-content"] == result.run_id
    # One trained model: the evaluation and the training run carry its figures under the stable names
    assert run.info.run_name == "evaluate valid gru none d16 s0"
    trained = mlflow.get_run(result.run_id)
    for name, column in (("valid_ndcg_10", "ndcg@10"), ("valid_hr_10", "hr@10"), ("valid_mrr_10", "mrr@10"),
                         ("valid_coverage_10", "coverage@10")):
        assert run.data.metrics[name] == pytest.approx(rows["two-tower no-content"][column])
        assert trained.data.metrics[name] == pytest.approx(rows["two-tower no-content"][column])
    assert "popularity/ndcg_at_10" in run.data.metrics and "valid_ndcg_10" not in trained.data.params
    logged = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert logged == {"movielens-100k/train", "movielens-100k/valid", "movielens-100k/catalogue"}


def test_two_tower_variants_are_compared_in_a_modality_ablation_plot(tmp_path: Path) -> None:
    from recsys.twotower.train import train_retrieval
    from tests.twotower.test_module import quick_config, write_topic_dataset

    paths = write_topic_dataset(tmp_path)  # with a title embedding that knows each video's topic
    runs = [train_retrieval(quick_config(paths, max_epochs=1, content=content)).run_id for content in ("title", "none")]
    table = evaluate(EvaluateConfig(processed_dir=paths.root.parent, run_ids=tuple(runs), baselines=("popularity",),
                                    ks=(5, 10)))
    assert table["model"].to_list() == ["two-tower (title)", "two-tower no-content", "popularity"]
    client = mlflow.MlflowClient()
    run_id = table["mlflow_run_id"][0]
    # Two trained models: each one's test figures go to its own training run, none to the evaluation run
    for run, model in zip(runs, ("two-tower (title)", "two-tower no-content"), strict=True):
        ndcg = table.filter(table["model"] == model)["ndcg@10"][0]
        assert client.get_run(run).data.metrics["test_ndcg_10"] == pytest.approx(ndcg)
    assert "test_ndcg_10" not in client.get_run(run_id).data.metrics
    assert client.get_run(run_id).info.run_name.startswith("evaluate test ")
    plots = sorted(a.path for a in client.list_artifacts(run_id, "plots"))
    assert plots == ["plots/metrics_at_k.png", "plots/modality_ablation.png"]
    for path in plots:
        assert open(client.download_artifacts(run_id, path), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_takes_the_baseline_grids_and_prints_the_chosen_settings(
    paths: PreparedPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["evaluate", "movielens-100k", "--processed-dir", str(paths.root.parent),
                 "--baselines", "ease", "transitions", "--ease-lambdas", "1", "100",
                 "--transition-windows", "1", "5", "--transition-decays", "0.5"])
    out = capsys.readouterr().out
    assert code == 0
    # Both grids differ on validation here: lambda 1 overfits, one video of a random group order is too few.
    assert "lambda=100" in out and "window=5 decay=0.5" in out
