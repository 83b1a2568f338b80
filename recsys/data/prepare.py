"""`recsys data prepare`: raw interactions → filtered, indexed, split training data.

Implicit feedback, unknown-item and duplicate removal, iterative k-core filtering, contiguous
index maps, a time-ordered split and item popularity. The raw log is read once (polars,
streaming) into integer codes, four numbers per view; the filtering, indexing and splitting then
run on those arrays.
Every input row is accounted for: rows read = rows kept + rows rejected, by reason, in meta.json.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from recsys.config import PrepareConfig, to_dict
from recsys.data.datasets import load_raw
from recsys.data.paths import PreparedPaths
from recsys.files import write_json, write_parquet
from recsys.tracking.inputs import log_frame
from recsys.tracking.store import fingerprint_files, start_run

SPLITS = ("train", "valid", "test")


def _natural_order(column: str) -> list[pl.Expr]:
    """Sort keys that put "2" before "10" for numeric-looking IDs and stay total for any string."""
    return [pl.col(column).str.len_chars(), pl.col(column)]


# The log is coded once (users by natural order, videos by catalogue order) and everything after
# runs on integer arrays: on 10M views (2 cores) a hash group-by or unique over the string IDs
# costs seconds per pass, np.bincount and a sort of packed 64-bit keys a fraction of one.


def _sort_positions(major: np.ndarray, n_minor: int) -> np.ndarray:
    """Positions 0..n-1 ordered by (major, position): one sort of packed keys, ties kept in order."""
    shift = max(int(n_minor - 1).bit_length(), 1)
    if major.size and int(major.max()) >= 1 << (64 - shift):
        return np.argsort(major, kind="stable")
    keys = (major.astype(np.uint64) << np.uint64(shift)) | np.arange(major.size, dtype=np.uint64)
    keys.sort()
    return (keys & np.uint64((1 << shift) - 1)).astype(np.int64)


def _time_order(frame: pl.DataFrame) -> np.ndarray | None:
    """The permutation putting rows in (timestamp, line) order, nulls first; None when they already are."""
    ts, line = frame.get_column("timestamp"), frame.get_column("line")
    if frame.height < 2:
        return None
    if ts.null_count() == 0 and line.null_count() == 0:
        t0, l0 = int(ts.min()), int(line.min())  # type: ignore[arg-type]
        t_span, l_span = int(ts.max()) - t0 + 1, int(line.max()) - l0 + 1  # type: ignore[arg-type]
        if t_span * l_span < 1 << 63:  # one packed key: (timestamp, line) in 64 bits
            key = (ts.to_numpy() - t0).astype(np.uint64) * np.uint64(l_span) + (line.to_numpy() - l0).astype(np.uint64)
            if bool((key[1:] >= key[:-1]).all()):
                return None
            return np.argsort(key, kind="stable")
    order = frame.select(pl.int_range(pl.len(), dtype=pl.Int64).sort_by("timestamp", "line", maintain_order=True))
    return order.to_series().to_numpy()


def _first_of_pairs(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Positions of each (user, item) pair's first row, in order."""
    pair = users.astype(np.uint64) * np.uint64(n_items) + items.astype(np.uint64)
    shift = max(int(users.size - 1).bit_length(), 1)
    if users.size == 0 or int(pair.max()) >= 1 << (64 - shift):
        return pl.Series(pair).is_first_distinct().arg_true().to_numpy()
    keys = (pair << np.uint64(shift)) | np.arange(users.size, dtype=np.uint64)
    keys.sort()
    pairs = keys >> np.uint64(shift)
    first = np.ones(keys.size, dtype=bool)
    first[1:] = pairs[1:] != pairs[:-1]
    return np.sort((keys[first] & np.uint64((1 << shift) - 1)).astype(np.int64))


def k_core(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> tuple[np.ndarray, int]:
    """Drop users and items below their minimum interaction counts until none is left; (kept positions, rounds).

    `users` and `items` are integer codes, one per interaction. A round counts every user and
    item (np.bincount) and keeps the interactions whose user and item both reach their minimum;
    the last round is the one that removes nothing.
    """
    kept = np.arange(users.size)
    n_users, n_items = (int(codes.max()) + 1 if codes.size else 0 for codes in (users, items))
    rounds = 0
    while True:
        rounds += 1
        keep = (np.bincount(users, minlength=n_users)[users] >= min_user) & (
            np.bincount(items, minlength=n_items)[items] >= min_item)
        if keep.all():
            return kept, rounds
        kept, users, items = kept[keep], users[keep], items[keep]


def assign_splits(indexed: pl.DataFrame, config: PrepareConfig) -> pl.DataFrame:
    """Add a `split` column to interactions in (timestamp, line) order: per-user leave-one-out, or a global time cut.

    Leave-one-out returns the rows in (user_idx, timestamp, line) order, the temporal split in time order.
    """
    if config.split == "leave-one-out":
        users = indexed.get_column("user_idx").to_numpy()
        indexed = indexed[_sort_positions(users, indexed.height)]
        users = indexed.get_column("user_idx").to_numpy()
        counts = np.bincount(users)
        starts = np.cumsum(counts) - counts
        n = counts[users]
        from_end = n - 1 - (np.arange(users.size) - starts[users])
        ranked = indexed.with_columns(pl.Series("_from_end", from_end), pl.Series("_n", n))
        # Users with fewer than three interactions cannot give train, valid and test: all train.
        split = (
            pl.when((pl.col("_n") >= 3) & (pl.col("_from_end") == 0)).then(pl.lit("test"))
            .when((pl.col("_n") >= 3) & (pl.col("_from_end") == 1)).then(pl.lit("valid"))
            .otherwise(pl.lit("train"))
        )
        return ranked.with_columns(split.alias("split")).drop("_from_end", "_n")
    ranked = indexed.with_columns(
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

    catalogue = raw.items.with_row_index("_order").collect()
    duplicate_items = catalogue.height - catalogue.get_column("item_id").n_unique()
    catalogue = catalogue.unique("item_id", keep="first", maintain_order=True)
    video_ids = catalogue.get_column("item_id").drop_nulls()

    # Users are coded by their place in the natural order, videos by their place in the catalogue
    # (null: not in it), so the codes sort as the indexes will.
    events = raw.interactions
    user_ids = events.select(pl.col("user_id").unique()).collect(engine="streaming").to_series()
    user_ids = user_ids.drop_nulls().to_frame().sort(_natural_order("user_id")).to_series()
    no_user = user_ids.len()  # the code of a missing user ID
    coded = events.select(
        pl.col("user_id").cast(pl.Enum(user_ids)).to_physical().fill_null(no_user).cast(pl.UInt32).alias("user"),
        pl.col("item_id").cast(pl.Enum(video_ids), strict=False).to_physical().cast(pl.UInt32).alias("item"),
        "timestamp", "line", *(["weight"] if config.min_weight is not None else []),
    ).collect(engine="streaming")
    rows_read = coded.height

    in_catalogue = coded.filter(pl.col("item").is_not_null())
    rejected["names a video missing from the items table"] = rows_read - in_catalogue.height
    ever_watched = np.bincount(in_catalogue.get_column("item").to_numpy(), minlength=video_ids.len()) > 0
    coded = in_catalogue
    if config.min_weight is not None:
        coded = coded.filter(pl.col("weight") >= config.min_weight)
        rejected[f"weight below min_weight={config.min_weight:g}"] = in_catalogue.height - coded.height
    before = coded.height

    order = _time_order(coded)
    if order is not None:
        coded = coded[order]
    users, items = coded.get_column("user").to_numpy(), coded.get_column("item").to_numpy()
    first = _first_of_pairs(users, items, video_ids.len())
    rejected["repeats an earlier (user, video) pair"] = before - first.size
    before = first.size
    known = first[users[first] != no_user]  # a view without a user is never kept (k-core drops it)
    kept, rounds = k_core(users[known], items[known], config.min_user_interactions, config.min_item_interactions)
    kept = known[kept]
    rejected[
        f"removed by k-core filtering (users >= {config.min_user_interactions}, "
        f"items >= {config.min_item_interactions})"
    ] = before - kept.size

    kept_users, kept_items = users[kept], items[kept]
    has_user = np.bincount(kept_users, minlength=no_user) > 0
    user_df = pl.DataFrame({
        "user_idx": np.arange(int(has_user.sum()), dtype=np.int64),
        "user_id": user_ids.gather(np.flatnonzero(has_user)),
    })
    user_idx = np.cumsum(has_user) - 1
    indexed_videos = np.bincount(kept_items, minlength=video_ids.len()) > 0
    if config.keep_unwatched_items:
        indexed_videos |= ~ever_watched
    # The catalogue row without an ID (at most one) is never watched, so it is indexed with the unwatched ones.
    in_index = np.full(catalogue.height, config.keep_unwatched_items)
    video_rows = np.flatnonzero(catalogue.get_column("item_id").is_not_null().to_numpy())
    in_index[video_rows] = indexed_videos
    item_df = (
        catalogue.filter(pl.Series(in_index)).sort("_order").drop("_order")
        .with_row_index("item_idx").with_columns(pl.col("item_idx").cast(pl.Int64))
    )
    item_idx = (np.cumsum(in_index) - 1)[video_rows]  # by video code
    indexed = pl.DataFrame({
        "user_idx": user_idx[kept_users].astype(np.int64),
        "item_idx": item_idx[kept_items].astype(np.int64),
    }).with_columns(coded.get_column("timestamp").gather(kept))
    kept_count = indexed.height
    split_df = assign_splits(indexed, config)

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
            "interactions": kept_count,
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

        # The indexed watch log with its split column (unknown videos, repeats and k-core removed): what the
        # splits are cut from.
        log_frame(split_df, config.dataset, "interactions", config.raw_dir / config.dataset)
        mlflow.log_metrics({f"count.{k}": v for k, v in meta["counts"].items()})
        mlflow.log_metrics({"rejected.total": sum(rejected.values())})
        mlflow.log_artifact(str(paths.meta))
    return {**meta, "output_dir": str(paths.root), "mlflow_run_id": run.info.run_id}
