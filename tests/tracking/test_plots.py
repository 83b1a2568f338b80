"""Plots: what each figure draws, and that training runs land them in MLflow as image artifacts."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
from mlflow import MlflowClient

from recsys.tracking.plots import (
    MAX_LABELS,
    at_k_table,
    embedding_map,
    item_labels,
    log_training_curves,
    metric_at_k,
    modality_ablation,
    project_2d,
    training_curves,
)
from recsys.tracking.store import start_run
from tests.plot_artifacts import PNG


def test_training_curves_put_losses_and_metrics_on_separate_panels() -> None:
    figure = training_curves(
        {"train_loss": [(0, 2.0), (1, 1.0)], "val_loss": [(0, 2.2), (1, 1.5)], "val_ndcg_10": [(0, 0.1), (1, 0.2)]}
    )
    loss_ax, metric_ax = figure.axes
    assert sorted(line.get_label() for line in loss_ax.get_lines()) == ["train_loss", "val_loss"]
    (ndcg,) = metric_ax.get_lines()
    assert list(ndcg.get_ydata()) == [0.1, 0.2]


def test_metric_at_k_has_one_panel_per_metric_and_one_line_per_model() -> None:
    table = pl.DataFrame(
        {
            "model": ["two-tower"] * 4 + ["popularity"] * 4,
            "metric": ["NDCG", "NDCG", "HR", "HR"] * 2,
            "k": [10, 20, 10, 20] * 2,
            "value": [0.2, 0.25, 0.3, 0.4, 0.05, 0.07, 0.1, 0.15],
        }
    )
    figure = metric_at_k(table)
    assert [ax.get_title() for ax in figure.axes] == ["NDCG", "HR"]
    lines = {line.get_label(): list(line.get_ydata()) for line in figure.axes[1].get_lines()}
    assert lines == {"two-tower": [0.3, 0.4], "popularity": [0.1, 0.15]}
    with pytest.raises(ValueError, match="missing \\['k'\\]"):
        metric_at_k(table.drop("k"))


def test_at_k_table_keeps_only_the_metrics_at_k_of_an_evaluation_table() -> None:
    table = pl.DataFrame({"model": ["mf", "popularity"], "hr@10": [0.3, 0.1], "ndcg@10": [0.2, 0.05],
                          "hr@20": [0.4, 0.2], "cold_ndcg@10": [0.0, 0.0], "ndcg@10/oracle": [0.5, 0.1],
                          "cases": [60, 60]})
    long = at_k_table(table, ("hr", "ndcg"))
    assert long.columns == ["model", "metric", "k", "value"] and long.height == 6
    assert long.filter(pl.col("model") == "mf", pl.col("metric") == "HR").sort("k").rows() == [
        ("mf", "HR", 10, 0.3), ("mf", "HR", 20, 0.4)]
    assert [ax.get_title() for ax in metric_at_k(long).axes] == ["HR", "NDCG"]


def test_modality_ablation_highlights_the_best() -> None:
    figure = modality_ablation({"frames": 0.1, "audio": 0.08, "fused": 0.2})
    colours = [patch.get_facecolor() for patch in figure.axes[0].patches]
    assert colours[2] != colours[0] and colours[0] == colours[1]


def test_embedding_map_separates_clusters_and_caps_labels() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 16)) * 10
    labels = [f"topic{i % 12}" for i in range(240)]
    x = centres[[i % 12 for i in range(240)]] + rng.normal(size=(240, 16))  # (240, 16)
    points = project_2d(x)
    # points of one cluster lie closer to each other than to the other clusters
    same = np.linalg.norm(points[0] - points[12])
    other = np.linalg.norm(points[0] - points[1:12], axis=1).min()
    assert same < other
    figure = embedding_map(x, labels)
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert len(legend) == MAX_LABELS + 1 and legend[0] == "other"
    with pytest.raises(ValueError, match="3 labels for 240 embeddings"):
        embedding_map(x, labels[:3])


def test_log_training_curves_stores_a_png_in_the_run() -> None:
    with start_run("plots-test", "train", {"lr": 0.1}, inputs={}) as run:
        for epoch in range(3):
            mlflow.log_metrics({"train_loss": 1.0 / (epoch + 1), "val_ndcg_10": 0.1 * epoch}, step=epoch)
        mlflow.log_metric("test_ndcg_10", 0.3)  # single value: not a curve
    log_training_curves(run.info.run_id)
    client = MlflowClient()
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert artifacts == ["plots/training_curves.png"]
    local = client.download_artifacts(run.info.run_id, "plots/training_curves.png")
    assert open(local, "rb").read(8) == PNG


def test_item_labels_prefer_the_synthetic_topic_then_the_first_genre(tmp_path: Path) -> None:
    items = pl.DataFrame({"item_id": ["b", "a", "c"], "genres": [["Drama", "War"], [], ["Comedy"]]})
    assert item_labels(items) == ["Drama", "none", "Comedy"]
    truth = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": ["a", "b"], "topic": [3, 1]}).write_parquet(truth)
    assert item_labels(items, truth) == ["topic 1", "topic 3", "unknown"]
    assert item_labels(items, tmp_path / "missing.parquet") == ["Drama", "none", "Comedy"]
