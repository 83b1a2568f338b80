"""Runs in the MLflow store as polars tables: list them with key params and metrics, compare two.

`runs_table` and `compare_runs` are what notebooks call; `recsys runs` and `recsys runs compare`
print the same tables. Experiments are named after datasets (see `recsys.tracking.store`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import polars as pl

from recsys.config import ConfigError
from recsys.errors import MissingInputError
from recsys.tracking.inputs import input_digests
from recsys.tracking.store import PIPELINE_TAG, configure, mark_dead_runs

MAX_KEY_PARAMS = 6
"""Params shown in a printed run table at most: those that vary most across the listed runs come first."""
MAX_KEY_METRICS = 6
"""Metrics shown in a printed run table at most (unless chosen by name)."""
PARENT_RUN_TAG = "mlflow.parentRunId"
"""MLflow's tag on a nested run naming its parent (`mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID`)."""


def _search(experiment: str | None, step: str | None, limit: int) -> list[Any]:
    import mlflow

    uri = configure()
    mark_dead_runs()  # a run whose process was killed is listed as KILLED, not RUNNING
    if experiment is not None:
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in mlflow.search_experiments())
            raise MissingInputError(
                f"no experiment {experiment!r} in the MLflow store {uri}; "
                f"experiments there: {', '.join(names) or 'none (run a pipeline step first)'}"
            )
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in mlflow.search_experiments()]
    if not ids:
        return []
    where = f"tags.`recsys.step` = '{step}'" if step else ""
    return mlflow.search_runs(
        ids, filter_string=where, order_by=["attributes.start_time DESC"], max_results=limit, output_format="list"
    )


def _row(run: Any, experiments: dict[str, str]) -> dict[str, Any]:
    info, data = run.info, run.data
    start = datetime.fromtimestamp(info.start_time / 1000, tz=UTC) if info.start_time else None
    duration = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    return {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "experiment": experiments.get(info.experiment_id, info.experiment_id),
        "step": data.tags.get("recsys.step"),
        "pipeline": data.tags.get(PIPELINE_TAG),
        "parent_run_id": data.tags.get(PARENT_RUN_TAG),
        "status": info.status,
        "start_time": start,
        "duration_s": duration,
        **{f"datasets.{role}": digest for role, digest in input_digests(run).items()},
        **{f"params.{k}": v for k, v in data.params.items()},
        **{f"metrics.{k}": float(v) for k, v in data.metrics.items()},
    }


def runs_table(
    experiment: str | None = None,
    sort_by: str | None = None,
    ascending: bool = False,
    limit: int = 100,
    step: str | None = None,
) -> pl.DataFrame:
    """One row per run: id, name, experiment, step, pipeline, parent run, status, times, `datasets.*`
    (the digest of each logged table: `datasets.train`, `datasets.catalogue`, ...), `params.*`, `metrics.*`.

    `experiment` is a dataset name (None: every experiment); `step` keeps the runs of one pipeline
    step (`train_retrieval`, `evaluate`, ...). `sort_by` names a metric (with or without the
    `metrics.` prefix); runs without it come last. Without it the newest run is first.
    """
    import mlflow

    runs = _search(experiment, step, limit)
    experiments = {e.experiment_id: e.name for e in mlflow.search_experiments()}
    rows = [_row(run, experiments) for run in runs]
    if not rows:
        return pl.DataFrame(
            schema={"run_id": pl.String, "run_name": pl.String, "experiment": pl.String, "step": pl.String,
                    "pipeline": pl.String, "parent_run_id": pl.String, "status": pl.String,
                    "start_time": pl.Datetime("us", "UTC"), "duration_s": pl.Float64}
        )
    table = pl.from_dicts(rows, infer_schema_length=None)
    fixed = [c for c in table.columns if not c.startswith(("datasets.", "params.", "metrics."))]
    datasets = sorted(c for c in table.columns if c.startswith("datasets."))
    params = sorted(c for c in table.columns if c.startswith("params."))
    metrics = sorted(c for c in table.columns if c.startswith("metrics."))
    table = table.select(fixed + datasets + params + metrics)
    if sort_by is not None:
        column = sort_by if sort_by.startswith("metrics.") else f"metrics.{sort_by}"
        if column not in table.columns:
            known = ", ".join(c.removeprefix("metrics.") for c in metrics) or "none"
            raise ConfigError(f"--sort-by {sort_by}: no listed run has that metric; metrics logged: {known}")
        table = table.sort(column, descending=not ascending, nulls_last=True)
    return table


def key_params(table: pl.DataFrame, limit: int = MAX_KEY_PARAMS) -> list[str]:
    """The `params.*` columns whose values differ between the runs that set them (most distinct first)."""
    params = [c for c in table.columns if c.startswith("params.")]
    distinct = {c: table.get_column(c).drop_nulls().n_unique() for c in params}
    varying = [c for c in params if distinct[c] > 1]
    return sorted(varying, key=lambda c: (-distinct[c], c))[:limit]


def key_datasets(table: pl.DataFrame) -> list[str]:
    """The `datasets.*` columns whose digests differ between the runs that logged them."""
    columns = [c for c in table.columns if c.startswith("datasets.")]
    return [c for c in columns if table.get_column(c).drop_nulls().n_unique() > 1]


def run_labels(table: pl.DataFrame, data: str = "train", width: int = 6) -> list[str]:
    """A short label per run that says what tells it from the other runs of the table.

    The params that vary (folders left out: they say where, not what) as `name=value`, and the
    first `width` characters of the digest of the run's `data` table: two corpora made with other
    settings differ there even when every param but the folder is equal. A run whose params and
    data equal another's is told apart by its run-ID prefix.
    """
    varying = [c for c in key_params(table, limit=len(table.columns)) if not c.endswith(("_dir", "_path"))]
    digests = table.get_column(f"datasets.{data}") if f"datasets.{data}" in table.columns else None
    labels = []
    for i, row in enumerate(table.iter_rows(named=True)):
        parts = [f"{c.removeprefix('params.')}={row[c]}" for c in varying if row[c] is not None]
        if digests is not None and digests[i] is not None:
            parts.append(f"{data} {digests[i][:width]}")
        labels.append(" ".join(parts) or row["run_name"] or row["run_id"][:8])
    repeated = {label for label in labels if labels.count(label) > 1}
    return [f"{label} [{run_id[:6]}]" if label in repeated else label
            for label, run_id in zip(labels, table.get_column("run_id"), strict=True)]


def key_metrics(table: pl.DataFrame, limit: int = MAX_KEY_METRICS) -> list[str]:
    """The `metrics.*` columns most runs of a table have, NDCG@10 first."""
    metrics = [c for c in table.columns if c.startswith("metrics.")]
    present = {c: table.height - table.get_column(c).null_count() for c in metrics}
    return sorted(metrics, key=lambda c: ("ndcg_10" not in c, "cold" in c, -present[c], c))[:limit]


def summary(table: pl.DataFrame, metrics: list[str] | None = None) -> pl.DataFrame:
    """A run table cut down for printing: identity columns, key params and the chosen (or key) metrics."""
    if metrics is None:
        chosen = key_metrics(table)
    else:
        chosen = [m if m.startswith("metrics.") else f"metrics.{m}" for m in metrics]
        chosen = [c for c in chosen if c in table.columns]
    identity = ["run_id", "experiment", "step"]
    if table.filter(pl.col("run_name") != pl.col("step")).height:
        identity.append("run_name")
    identity.append("status")
    if table.get_column("pipeline").null_count() < table.height:
        identity.append("pipeline")
    shown = table.select(identity + key_datasets(table) + key_params(table) + chosen)
    return shown.rename({c: c.replace("datasets.", "data:") if c.startswith("datasets.") else c.split(".", 1)[1]
                         for c in shown.columns if "." in c})


@dataclass
class RunComparison:
    """What differs between two runs."""

    run_a: str
    run_b: str
    params: pl.DataFrame
    """param, a, b: only params whose values differ (missing on one side shows as null)."""
    metrics: pl.DataFrame
    """metric, a, b, delta (b - a): every metric either run logged (final values)."""
    datasets: pl.DataFrame
    """dataset, a, b: the digest of each table either run logged (`train`, `valid`, `catalogue`, ...)."""
    names: tuple[str, str] = ("", "")
    """The two runs' names (what the MLflow UI lists them by)."""


def _get_run(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise MissingInputError(
            f"no run {run_id!r} in the MLflow store {configure()}; list runs with `recsys runs`"
        ) from None


def compare_runs(run_a: str, run_b: str) -> RunComparison:
    """Params that differ between two runs, and each metric's values and delta (b minus a)."""
    from mlflow import MlflowClient

    configure()
    client = MlflowClient()
    run_objects = _get_run(client, run_a), _get_run(client, run_b)
    a, b = (run.data for run in run_objects)
    data_a, data_b = (input_digests(run) for run in run_objects)
    roles = sorted(set(data_a) | set(data_b))
    datasets = pl.DataFrame(
        {"dataset": roles, "a": [data_a.get(r) for r in roles], "b": [data_b.get(r) for r in roles]},
        schema={"dataset": pl.String, "a": pl.String, "b": pl.String},
    )
    param_names = sorted(set(a.params) | set(b.params))
    differing = [n for n in param_names if a.params.get(n) != b.params.get(n)]
    params = pl.DataFrame(
        {"param": differing, "a": [a.params.get(n) for n in differing], "b": [b.params.get(n) for n in differing]},
        schema={"param": pl.String, "a": pl.String, "b": pl.String},
    )
    metric_names = sorted(set(a.metrics) | set(b.metrics))
    metrics = pl.DataFrame(
        {
            "metric": metric_names,
            "a": [a.metrics.get(n) for n in metric_names],
            "b": [b.metrics.get(n) for n in metric_names],
        },
        schema={"metric": pl.String, "a": pl.Float64, "b": pl.Float64},
    ).with_columns((pl.col("b") - pl.col("a")).alias("delta"))
    names = tuple(run.info.run_name or "" for run in run_objects)
    return RunComparison(run_a, run_b, params, metrics, datasets, (names[0], names[1]))


def format_table(frame: pl.DataFrame) -> str:
    """A whole table as text (no row/column elision, full run IDs), for the terminal."""
    with pl.Config(
        tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=40, tbl_width_chars=250,
        tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, float_precision=4,
    ):
        return str(frame)


def lineage(run_id: str) -> pl.DataFrame:
    """A run and, recursively, the upstream runs named by its `recsys.input.*` tags (breadth first).

    Columns: depth (0 = the run itself), run_id, step, via (the input name that led here, "" at
    depth 0), status, start_time. Inputs that are file fingerprints rather than run IDs are skipped.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure()
    client = MlflowClient()
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    frontier: list[tuple[int, str, str]] = [(0, run_id, "")]
    while frontier:
        depth, current, via = frontier.pop(0)
        if current in seen:
            continue
        try:
            run = client.get_run(current) if depth else _get_run(client, current)
        except MlflowException:
            continue  # a fingerprint, or a run deleted since
        seen.add(current)
        start = datetime.fromtimestamp(run.info.start_time / 1000, tz=UTC) if run.info.start_time else None
        rows.append({"depth": depth, "run_id": current, "step": run.data.tags.get("recsys.step"), "via": via,
                     "status": run.info.status, "start_time": start})
        for tag, value in sorted(run.data.tags.items()):
            if tag.startswith("recsys.input.") and _looks_like_run_id(value):
                frontier.append((depth + 1, value, tag.removeprefix("recsys.input.")))
    return pl.DataFrame(rows, schema={"depth": pl.Int64, "run_id": pl.String, "step": pl.String, "via": pl.String,
                                      "status": pl.String, "start_time": pl.Datetime("us", "UTC")})


def _looks_like_run_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)
