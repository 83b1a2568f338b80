"""Figures that pipeline steps log to MLflow as image artifacts, and notebooks show inline.

Each function returns a matplotlib `Figure` built with the object-oriented API (no pyplot state,
so it works headless and inside a training loop); `log_figure` stores one in the active (or a given) run.

- `training_curves`: per-epoch metrics of a run (losses and validation metrics).
- `metric_at_k`: HR/NDCG/MRR against K, one line per model (`at_k_table` reshapes an evaluation table for it).
- `modality_ablation`: one metric per modality set (bars).
- `embedding_map`: a 2-D projection of item embeddings coloured by topic or genre.

The figures take arrays and tables, never a model: the stage that owns what is drawn computes
it (e.g. `recsys.twotower.plots` embeds the catalogue, then calls `embedding_map`), so this module
imports no pipeline stage.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MAX_LABELS = 10
"""Labels coloured individually in an embedding map; rarer ones are drawn grey as 'other'."""


def training_curves(history: Mapping[str, Sequence[tuple[int, float]]], title: str = "training") -> Figure:
    """Per-epoch curves: `history` maps a metric name to (step, value) pairs.

    Losses go on the left panel and every other metric on the right, since their scales differ.
    """
    losses = {name: points for name, points in history.items() if "loss" in name}
    others = {name: points for name, points in history.items() if "loss" not in name}
    panels = [(group, label) for group, label in ((losses, "loss"), (others, "metric")) if group]
    figure = Figure(figsize=(5.5 * max(len(panels), 1), 4), layout="constrained")
    axes = figure.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (group, label) in zip(axes, panels, strict=False):
        for name, points in sorted(group.items()):
            steps, values = zip(*sorted(points), strict=True) if points else ((), ())
            ax.plot(steps, values, marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title)
    return figure


def run_history(run_id: str, metrics: Sequence[str] | None = None) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of a run's metrics logged at more than one step (or of the named ones)."""
    from mlflow import MlflowClient

    from recsys.tracking.store import configure

    configure()
    client = MlflowClient()
    names = metrics if metrics is not None else sorted(client.get_run(run_id).data.metrics)
    history = {name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)] for name in names}
    if metrics is not None:
        return history
    return {name: points for name, points in history.items() if len({step for step, _ in points}) > 1}


def metric_at_k(table: pl.DataFrame, title: str = "ranking quality at K") -> Figure:
    """One panel per metric (columns: model, metric, k, value), value against K, one line per model."""
    missing = {"model", "metric", "k", "value"} - set(table.columns)
    if missing:
        raise ValueError(f"metric_at_k needs columns model, metric, k, value; missing {sorted(missing)}")
    metric_names = table.get_column("metric").unique(maintain_order=True).to_list()
    figure = Figure(figsize=(4.5 * len(metric_names), 4), layout="constrained")
    axes = figure.subplots(1, len(metric_names), squeeze=False)[0]
    for ax, name in zip(axes, metric_names, strict=True):
        rows = table.filter(pl.col("metric") == name).sort("k")
        for (model,), group in rows.group_by("model", maintain_order=True):
            ax.plot(group.get_column("k"), group.get_column("value"), marker="o", label=str(model))
        ax.set_title(name)
        ax.set_xlabel("K")
        ax.set_xticks(sorted(rows.get_column("k").unique().to_list()))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="best")
    figure.suptitle(title)
    return figure


def at_k_table(table: pl.DataFrame, metrics: Sequence[str] = ("hr", "ndcg", "mrr")) -> pl.DataFrame:
    """An evaluation table (one row per model, columns such as `ndcg@10`) as `metric_at_k` rows:
    model, metric (upper case), k, value. Other columns (`cold_ndcg@10`, `ndcg@10/oracle`...) are left out."""
    pattern = rf"({'|'.join(map(re.escape, metrics))})@(\d+)"
    columns = [c for c in table.columns if re.fullmatch(pattern, c)]
    long = table.unpivot(index="model", on=columns, variable_name="column")
    return long.select(
        "model",
        pl.col("column").str.extract(r"^(.+)@").str.to_uppercase().alias("metric"),
        pl.col("column").str.extract(r"@(\d+)$").cast(pl.Int64).alias("k"),
        pl.col("value").cast(pl.Float64),
    )


def modality_ablation(scores: Mapping[str, float], metric: str = "NDCG@10", title: str = "modality ablation") -> Figure:
    """Bars of one metric per modality set (e.g. frames, audio, title, fused), best highlighted."""
    names = list(scores)
    values = np.array([scores[n] for n in names], dtype=np.float64)
    figure = Figure(figsize=(max(4.0, 1.1 * len(names) + 1), 4), layout="constrained")
    ax = figure.subplots()
    colours = ["tab:orange" if v == values.max() else "tab:blue" for v in values]
    bars = ax.bar(names, values, color=colours)
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, values.max() * 1.15 if values.size and values.max() > 0 else 1)
    ax.tick_params(axis="x", rotation=30)
    ax.set_title(title)
    return figure


def project_2d(embeddings: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates of (N, D) embeddings by PCA or t-SNE (seeded)."""
    x = np.asarray(embeddings, dtype=np.float32)  # (N, D)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)  # (N, 2)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(x)
    raise ValueError(f"unknown projection {method!r}: use 'pca' or 'tsne'")


def embedding_map(
    embeddings: np.ndarray,
    labels: Sequence[str] | None = None,
    title: str = "item embeddings",
    method: str = "pca",
    seed: int = 0,
) -> Figure:
    """A 2-D map of item embeddings, each point coloured by its label (topic, first genre...)."""
    points = project_2d(embeddings, method, seed)  # (N, 2)
    figure = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = figure.subplots()
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.7)
    else:
        if len(labels) != len(points):
            raise ValueError(f"{len(labels)} labels for {len(points)} embeddings")
        common = sorted(label for label, _ in Counter(labels).most_common(MAX_LABELS))
        names = np.array([label if label in common else "other" for label in labels])
        if "other" in names:
            shown = names == "other"
            ax.scatter(points[shown, 0], points[shown, 1], s=5, c="lightgrey", label="other")
        for label in common:
            shown = names == label
            ax.scatter(points[shown, 0], points[shown, 1], s=8, alpha=0.8, label=label)
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_title(f"{title} ({method.upper()})")
    ax.set_xticks([])
    ax.set_yticks([])
    return figure


def item_labels(items: pl.DataFrame, truth_items: Path | None = None) -> list[str]:
    """A label per row of a prepared `items` table: the latent topic from the synthetic corpus' truth
    (`<raw>/synth/truth/items.parquet`, see `recsys.synthetic.truth.truth_items`) when given and present,
    else the first genre ("none" without one)."""
    if truth_items is not None and Path(truth_items).exists():
        topics = pl.read_parquet(truth_items, columns=["item_id", "topic"])
        joined = items.select("item_id").join(topics, on="item_id", how="left", maintain_order="left")
        return [f"topic {t}" if t is not None else "unknown" for t in joined.get_column("topic").to_list()]
    return [genres[0] if genres else "none" for genres in items.get_column("genres").to_list()]


def log_figure(figure: Figure, name: str, run_id: str | None = None) -> None:
    """Store a figure as `plots/<name>.png` in run `run_id`, or in the active MLflow run without one."""
    import mlflow

    if run_id is None:
        mlflow.log_figure(figure, f"plots/{name}.png")
    else:
        mlflow.MlflowClient().log_figure(run_id, figure, f"plots/{name}.png")


def log_training_curves(run_id: str, title: str = "training") -> None:
    """Plot every per-epoch metric of a run and log it to that run as `plots/training_curves.png`."""
    from mlflow import MlflowClient

    history = run_history(run_id)
    if history:
        MlflowClient().log_figure(run_id, training_curves(history, title), "plots/training_curves.png")
