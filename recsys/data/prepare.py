"""`recsys data prepare`: raw interactions → filtered, indexed, split training data.

A lazy polars pipeline: implicit feedback, unknown-item and duplicate removal, iterative k-core
filtering, contiguous index maps, a time-ordered split and item popularity.
Only small results (counts, the ID sets of each k-core round) are collected before the end.
Every input row is accounted for: rows read = rows kept + rows rejected, by reason, in meta.json.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from recsys.config import PrepareConfig, to_dict
from recsys.data.datasets import load_raw
from recsys.data.paths import PreparedPaths
from recsys.files import write_json, write_parquet
from recsys.tracking.inputs import log_frame
from recsys.tracking.store import fingerprint_files, start_run

SPLITS = ("train", "valid", "test")


def _count(frame: pl.LazyFrame) -> int:
    return frame.select(pl.len()).collect().item()


def _natural_order(column: str) -> list[pl.Expr]:
    """Sort keys that put "2" before "10" for numeric-looking IDs and stay total for any string."""
    return [pl.col(column).str.len_chars(), pl.col(column)]


def k_core(
    interactions: pl.LazyFrame, min_user: int, min_item: int
) -> tuple[pl.LazyFrame, int]:
    """Drop users and items below their minimum interaction counts until none is left; (result, rounds).

    Each round collects only the surviving ID sets and re-filters the original frame by them,
    so the query plan stays one filter deep however many rounds it takes.
    """
    users = interactions.select(pl.col("user_id").unique()).collect().to_series()
    items = interactions.select(pl.col("item_id").unique()).collect().to_series()
    rounds = 0
    while True:
        current = interactions.filter(
            pl.col("user_id").is_in(users.implode()) & pl.col("item_id").is_in(items.implode())
        )
        user_counts, item_counts = pl.collect_all(
            [current.group_by("user_id").len(), current.group_by("item_id").len()]
        )
        kept_users = user_counts.filter(pl.col("len") >= min_user).get_column("user_id")
        kept_items = item_counts.filter(pl.col("len") >= min_item).get_column("item_id")
        rounds += 1
        if kept_users.len() == user_counts.height and kept_items.len() == item_counts.height:
            return current, rounds
        users, items = kept_users, kept_items


def assign_splits(indexed: pl.LazyFrame, config: PrepareConfig) -> pl.LazyFrame:
    """Add a `split` column: per-user leave-one-out by time, or a global temporal cut."""
    order = ["timestamp", "line"]
    if config.split == "leave-one-out":
        ranked = indexed.sort(["user_idx", *order]).with_columns(
            (pl.len().over("user_idx") - 1 - pl.int_range(pl.len()).over("user_idx")).alias("_from_end"),
            pl.len().over("user_idx").alias("_n"),
        )
        # Users with fewer than three interactions cannot give train, valid and test: all train.
        split = (
            pl.when((pl.col("_n") >= 3) & (pl.col("_from_end") == 0)).then(pl.lit("test"))
            .when((pl.col("_n") >= 3) & (pl.col("_from_end") == 1)).then(pl.lit("valid"))
            .otherwise(pl.lit("train"))
        )
        return ranked.with_columns(split.alias("split")).drop("_from_end", "_n")
    ranked = indexed.sort(order).with_columns(
        (pl.int_range(pl.len()) / pl.len()).alias("_quantile")
    )
    test_start = 1.0 - config.test_fraction
    valid_start = test_start - config.valid_fraction
    split = (
        pl.when(pl.col("_quantile") >= test_start).then(pl.lit("test"))
        .when(pl.col("_quantile") >= valid_start).then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )
    return ranked.with_columns(split.alias("split")).drop("_quantile")


def run_name(config: PrepareConfig) -> str:
    """The prepare run's name: its split and filters (`prepare leave-one-out u5 i5`)."""
    name = f"prepare {config.split} u{config.min_user_interactions} i{config.min_item_interactions}"
    return name + (f" w{config.min_weight:g}" if config.min_weight is not None else "")


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Prepare one dataset; returns the meta written beside the outputs (plus the MLflow run ID)."""
    raw = load_raw(config.dataset, config.raw_dir, config.on_bad_lines)
    paths = PreparedPaths.of(config.processed_dir, config.dataset)
    rejected: dict[str, int] = {}

    catalogue = raw.items.with_row_index("_order")
    duplicate_items = _count(catalogue) - _count(catalogue.unique("item_id"))
    catalogue = catalogue.unique("item_id", keep="first", maintain_order=True)

    events = raw.interactions
    rows_read = _count(events)
    steps: list[tuple[str, pl.LazyFrame]] = [
        ("names a video missing from the items table", events.join(catalogue, on="item_id", how="semi")),
    ]
    if config.min_weight is not None:
        steps.append(
            (f"weight below min_weight={config.min_weight:g}",
             steps[-1][1].filter(pl.col("weight") >= config.min_weight))
        )
    steps.append(
        (
            "repeats an earlier (user, video) pair",
            steps[-1][1].sort("timestamp", "line").unique(["user_id", "item_id"], keep="first", maintain_order=True),
        )
    )
    # The cleaned log is materialised once here: the k-core rounds and the counts below each scan
    # it again, and re-parsing the raw text for every scan costs far more than holding 4 columns.
    cleaned = steps[-1][1].collect().lazy()
    step_counts = pl.collect_all([frame.select(pl.len()) for _, frame in steps[:-1]] + [cleaned.select(pl.len())])
    before = rows_read
    for (reason, _), counted in zip(steps, step_counts, strict=True):
        rejected[reason] = before - counted.item()
        before = counted.item()
    filtered, rounds = k_core(cleaned, config.min_user_interactions, config.min_item_interactions)
    kept = _count(filtered)
    rejected[
        f"removed by k-core filtering (users >= {config.min_user_interactions}, "
        f"items >= {config.min_item_interactions})"
    ] = before - kept

    user_map = (
        filtered.select("user_id").unique().sort(_natural_order("user_id"))
        .with_row_index("user_idx").with_columns(pl.col("user_idx").cast(pl.Int64))
    )
    watched = filtered.select("item_id").unique()
    indexed_items = catalogue.join(watched, on="item_id", how="semi")
    if config.keep_unwatched_items:
        ever_watched = steps[0][1].select("item_id").unique()
        indexed_items = pl.concat([indexed_items, catalogue.join(ever_watched, on="item_id", how="anti")])
    item_table = (
        indexed_items.sort("_order").drop("_order")
        .with_row_index("item_idx").with_columns(pl.col("item_idx").cast(pl.Int64))
    )
    indexed = (
        filtered.join(user_map, on="user_id").join(item_table.select("item_id", "item_idx"), on="item_id")
        .select("user_idx", "item_idx", "timestamp", "line")
    )
    split = assign_splits(indexed, config)

    # Collect once: everything written below is a small derivation of these frames.
    split_df, user_df, item_df = pl.collect_all([split, user_map, item_table])
    tables = {name: split_df.filter(pl.col("split") == name).select("user_idx", "item_idx", "timestamp")
              for name in SPLITS}
    popularity = (
        item_df.select("item_idx")
        .join(tables["train"].group_by("item_idx").len("count"), on="item_idx", how="left")
        .with_columns(pl.col("count").fill_null(0).cast(pl.Int64))
        .sort("item_idx")
    )
    items_out = item_df.join(popularity.rename({"count": "train_count"}), on="item_idx").sort("item_idx")

    for name, table in tables.items():
        write_parquet(table, getattr(paths, name))
    write_parquet(user_df, paths.user_map)
    write_parquet(item_df.select("item_idx", "item_id"), paths.item_map)
    write_parquet(items_out, paths.items)
    write_parquet(popularity, paths.popularity)

    train_items = set(tables["train"].get_column("item_idx").unique().to_list())
    cold_test = tables["test"].filter(~pl.col("item_idx").is_in(list(train_items))).height
    meta: dict[str, Any] = {
        "dataset": config.dataset,
        "n_users": user_df.height,
        "n_items": item_df.height,
        "counts": {
            "rows_read": rows_read,
            "interactions": kept,
            "users": user_df.height,
            "items": item_df.height,
            "items_without_train_interactions": int((popularity.get_column("count") == 0).sum()),
            **{name: table.height for name, table in tables.items()},
            "cold_start_test_targets": cold_test,
        },
        "rejected": rejected,
        "skipped_lines": raw.rejected,
        "items_without_title": item_df.filter(pl.col("title") == "").height,
        "duplicate_item_rows": duplicate_items,
        "k_core_rounds": rounds,
        "config": to_dict(config),
        "input_fingerprint": fingerprint_files(raw.files),
    }
    write_json(paths.meta, meta)

    with start_run(config.dataset, "prepare", to_dict(config), {"raw_files": meta["input_fingerprint"]},
                   run_name=run_name(config)) as run:
        import mlflow

        # The cleaned watch log (unknown videos and repeats removed, before k-core): what the splits come from.
        log_frame(cleaned.collect(), config.dataset, "interactions", config.raw_dir / config.dataset)
        mlflow.log_metrics({f"count.{k}": v for k, v in meta["counts"].items()})
        mlflow.log_metrics({"rejected.total": sum(rejected.values())})
        mlflow.log_artifact(str(paths.meta))
    return {**meta, "output_dir": str(paths.root), "mlflow_run_id": run.info.run_id}
