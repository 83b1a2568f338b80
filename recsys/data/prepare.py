"""`recsys data prepare`: raw interactions → filtered, indexed, split training data.

Implicit feedback, unknown-item and duplicate removal, iterative k-core filtering, contiguous
index maps, a time-ordered split and item popularity. The raw log is read once (polars,
streaming) into integer codes, four numbers per view; the filtering, indexing and splitting then
run on those arrays.
Every input row is accounted for: rows read = rows kept + rows rejected, by reason, in meta.json.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import PrepareConfig, to_dict
from recsys.data.datasets import load_raw
from recsys.data.paths import PreparedPaths
from recsys.data.schema import RawDataset
from recsys.files import write_json, write_parquet
from recsys.tracking.inputs import log_frame
from recsys.tracking.store import fingerprint_files, open_store, start_run

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


def _natural_positions(ids: pl.Series) -> np.ndarray:
    """Positions of `ids` in natural order (`_natural_order`, nulls first): by string, then stably by length."""
    by_string = ids.arg_sort().to_numpy()  # nulls first
    lengths = ids.str.len_chars().fill_null(0).to_numpy()[by_string]
    return by_string[np.argsort(lengths, kind="stable")].astype(np.int64)


def _factorize(values: pl.Series, hashes: np.ndarray | None = None) -> tuple[np.ndarray, pl.Series]:
    """(each value's code, the distinct values, null among them when present): codes index the distinct values.

    Grouped by hash, then checked value by value. The rows are put in hash order by one numpy
    sort of packed keys (the hash's high bits above the row's position; on 10M IDs several times
    faster than an argsort of the hashes or a hash table of the strings), each run of equal
    high bits a group, its first row the group's value. A row whose value is not its group's
    (two IDs sharing those bits: on 1M distinct IDs about one pair a run) is coded apart, by
    an exact unique over those few rows. `hashes` (uint64, one per value) replaces `Series.hash`:
    tests give colliding ones.
    """
    if values.is_empty():
        return np.zeros(0, dtype=np.int64), values.clear()
    shift = np.uint64(max(int(values.len() - 1).bit_length(), 1))
    keys = (values.hash().to_numpy() if hashes is None else hashes) >> shift
    keys <<= shift
    keys |= np.arange(values.len(), dtype=np.uint64)
    keys.sort()
    order = (keys & ((np.uint64(1) << shift) - np.uint64(1))).view(np.int64)
    keys >>= shift
    starts = np.empty(keys.size, dtype=bool)
    starts[0] = True
    np.not_equal(keys[1:], keys[:-1], out=starts[1:])
    del keys
    codes = np.empty(order.size, dtype=np.int64)
    codes[order] = np.cumsum(starts) - 1
    distinct = values.gather(order[starts])
    apart = (~distinct.gather(codes).eq_missing(values)).arg_true()
    if apart.len():
        # Equal IDs have equal hashes, so an ID coded apart equals no group's value: new codes after theirs.
        extra_codes, extra = _exact_factorize(values.gather(apart))
        codes[apart.to_numpy()] = distinct.len() + extra_codes
        distinct = distinct.append(extra)
    return codes, distinct


def _exact_factorize(values: pl.Series) -> tuple[np.ndarray, pl.Series]:
    """`_factorize` by polars' exact unique (a hash table of the values): codes in first-seen order, null last."""
    distinct = values.unique(maintain_order=True)
    codes = values.cast(pl.Enum(distinct.drop_nulls())).to_physical().cast(pl.Int64)
    return codes.fill_null(distinct.len() - 1).to_numpy(), distinct.drop_nulls().extend_constant(
        None, distinct.null_count())


def _time_order(frame: pl.DataFrame) -> np.ndarray | None:
    """The permutation putting rows in (timestamp, line) order, nulls first; None when they already are."""
    ts, line = frame.get_column("timestamp"), frame.get_column("line")
    if frame.height < 2:
        return None
    if ts.null_count() == 0 and line.null_count() == 0:
        t0, l0 = int(ts.min()), int(line.min())  # type: ignore[arg-type]
        t_span, l_span = int(ts.max()) - t0 + 1, int(line.max()) - l0 + 1  # type: ignore[arg-type]
        if t_span * l_span < 1 << 63:  # one packed key: (timestamp, line) in 64 bits
            key = (ts.to_numpy() - t0) * l_span  # int64: the span check keeps it below 2^63
            key += line.to_numpy() - l0
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
    keep = np.zeros(keys.size, dtype=bool)
    keep[keys[first] & np.uint64((1 << shift) - 1)] = True
    return np.flatnonzero(keep)


def k_core(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> tuple[np.ndarray, int]:
    """Drop users and items below their minimum interaction counts until none is left; (kept positions, rounds).

    `users` and `items` are integer codes, one per interaction. A round drops the interactions of
    every user and item below its minimum (counted once by np.bincount, then lowered by what each
    round drops); the last round is the one that removes nothing.
    """
    users, items = users.astype(np.intp, copy=False), items.astype(np.intp, copy=False)  # no cast per gather
    n_users, n_items = (int(codes.max()) + 1 if codes.size else 0 for codes in (users, items))
    user_count, item_count = np.bincount(users, minlength=n_users), np.bincount(items, minlength=n_items)
    alive = np.ones(users.size, dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        # Rows are marked dead, not compressed away: after the first round a round drops few rows.
        drop = np.flatnonzero((user_count < min_user)[users] | (item_count < min_item)[items])
        drop = drop[alive[drop]]
        if drop.size == 0:
            return np.flatnonzero(alive), rounds
        alive[drop] = False
        user_count -= np.bincount(users[drop], minlength=n_users)
        item_count -= np.bincount(items[drop], minlength=n_items)


def assign_splits(indexed: pl.DataFrame, config: PrepareConfig) -> pl.DataFrame:
    """Add `split` (the index of the row's split in SPLITS): per-user leave-one-out, or a global time cut.

    The rows come in the split's order: (user_idx, timestamp, line) for leave-one-out, where each
    user's last interaction is test and the one before valid (users with fewer than three
    interactions cannot give train, valid and test: all train); (timestamp, line) for temporal.
    """
    train, valid, test = (SPLITS.index(name) for name in ("train", "valid", "test"))
    if config.split == "leave-one-out":
        users = indexed.get_column("user_idx").to_numpy()
        split = np.full(users.size, train, dtype=np.uint8)
        if users.size:
            last = np.flatnonzero(np.append(users[1:] != users[:-1], True))  # each user's last row
            last = last[np.diff(last, prepend=-1) >= 3]
            split[last] = test
            split[last - 1] = valid
        return indexed.with_columns(pl.Series("split", split))
    quantile = pl.int_range(pl.len()) / pl.len()
    test_start = 1.0 - config.test_fraction
    valid_start = test_start - config.valid_fraction
    split = (
        pl.when(quantile >= test_start).then(pl.lit(test, pl.UInt8))
        .when(quantile >= valid_start).then(pl.lit(valid, pl.UInt8))
        .otherwise(pl.lit(train, pl.UInt8))
    )
    return indexed.with_columns(split.alias("split"))


def _write_tables(tables: dict[Path, pl.DataFrame]) -> None:
    for path, table in tables.items():
        write_parquet(table, path)


def run_name(config: PrepareConfig) -> str:
    """The prepare run's name: its split and filters (`prepare leave-one-out u5 i5`)."""
    name = f"prepare {config.split} u{config.min_user_interactions} i{config.min_item_interactions}"
    return name + (f" w{config.min_weight:g}" if config.min_weight is not None else "")


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Prepare one dataset; returns the meta written beside the outputs (plus the MLflow run ID)."""
    raw = load_raw(config.dataset, config.raw_dir, config.on_bad_lines)
    # Independent steps run on a second core: the inputs' hash and the MLflow store's opening (file reads
    # and sqlite waits) beside the work, the video IDs' coding beside the users', the tables' writing
    # beside the run's logging. numpy and polars release the GIL.
    with ThreadPoolExecutor(4) as background:
        return _prepare(config, raw, background)


def _prepare(config: PrepareConfig, raw: RawDataset, background: ThreadPoolExecutor) -> dict[str, Any]:
    fingerprint = background.submit(fingerprint_files, raw.files)
    store = background.submit(open_store)
    paths = PreparedPaths.of(config.processed_dir, config.dataset)
    rejected: dict[str, int] = {}

    catalogue = raw.items.with_row_index("_order").collect()
    duplicate_items = catalogue.height - catalogue.get_column("item_id").n_unique()
    catalogue = catalogue.unique("item_id", keep="first", maintain_order=True)
    video_ids = catalogue.get_column("item_id").drop_nulls()

    # Users are coded by their place in the natural order, videos by their place in the catalogue
    # (null: not in it), so the codes sort as the indexes will.
    events = raw.interactions.select(
        "user_id", "item_id", "timestamp", "line", *(["weight"] if config.min_weight is not None else []),
    ).collect(engine="streaming")
    coding_items = background.submit(_factorize, events.get_column("item_id"))
    # A log in time order (as exports usually are) stays in order when rows are dropped: checked meanwhile.
    ordering = background.submit(_time_order, events.select("timestamp", "line"))
    user_codes, user_ids = _factorize(events.get_column("user_id"))
    natural = _natural_positions(user_ids)
    user_ids = user_ids.gather(natural)  # a missing ID (null) sorts first
    rank = np.empty(natural.size, dtype=np.int64)
    rank[natural] = np.arange(natural.size) - user_ids.null_count()
    if user_ids.null_count():
        user_ids = user_ids.drop_nulls()
        rank[natural[0]] = user_ids.len()  # the code of a missing user ID, after every real one
    no_user = user_ids.len()
    # Each distinct video ID is looked up in the catalogue once, not once per view.
    item_codes, item_values = coding_items.result()
    video_codes = item_values.cast(pl.Enum(video_ids), strict=False).to_physical().cast(pl.Int64)
    coded = events.select(
        pl.Series("user", rank[user_codes]),  # int64 codes: numpy indexes with them without a cast
        video_codes.gather(item_codes).alias("item"),
        "timestamp", "line", *(["weight"] if config.min_weight is not None else []),
    )
    del events, user_codes, item_codes
    rows_read = coded.height

    # (a filter copies every column, even when it keeps every row)
    in_catalogue = coded.filter(pl.col("item").is_not_null()) if coded.get_column("item").null_count() else coded
    rejected["names a video missing from the items table"] = rows_read - in_catalogue.height
    ever_watched = np.bincount(in_catalogue.get_column("item").to_numpy(), minlength=video_ids.len()) > 0
    coded = in_catalogue
    if config.min_weight is not None:
        coded = coded.filter(pl.col("weight") >= config.min_weight)
        rejected[f"weight below min_weight={config.min_weight:g}"] = in_catalogue.height - coded.height
    before = coded.height

    order = None if ordering.result() is None else _time_order(coded)
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

    if config.split == "leave-one-out":  # each user's interactions together, still in time order
        kept = kept[_sort_positions(users[kept], kept.size)]
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

    del coded, users, items
    tables = {name: split_df.filter(pl.col("split") == index).drop("split") for index, name in enumerate(SPLITS)}
    del split_df
    train_count = np.bincount(tables["train"].get_column("item_idx").to_numpy(), minlength=item_df.height)
    popularity = pl.DataFrame({"item_idx": np.arange(item_df.height, dtype=np.int64), "count": train_count})
    items_out = item_df.with_columns(popularity.get_column("count").alias("train_count"))

    store.result()
    with start_run(config.dataset, "prepare", to_dict(config), {"raw_files": fingerprint.result()},
                   run_name=run_name(config)) as run:
        import mlflow

        # The tables are written on the other threads (train alone: the largest) while the run logs the
        # indexed watch log with its split column (unknown videos, repeats and k-core removed): what the
        # splits are cut from. meta.json, written last, says the outputs are complete.
        writes = [background.submit(write_parquet, tables["train"], paths.train),
                  background.submit(_write_tables, {paths.valid: tables["valid"], paths.test: tables["test"]}),
                  background.submit(_write_tables, {
                      paths.user_map: user_df, paths.item_map: item_df.select("item_idx", "item_id"),
                      paths.items: items_out, paths.popularity: popularity})]
        indexed_log = pl.concat([table.with_columns(pl.lit(name).alias("split")) for name, table in tables.items()])
        log_frame(indexed_log, config.dataset, "interactions", config.raw_dir / config.dataset)
        del indexed_log
        for write in writes:
            write.result()

        cold_test = int((train_count[tables["test"].get_column("item_idx").to_numpy()] == 0).sum())
        meta: dict[str, Any] = {
            "dataset": config.dataset,
            "n_users": user_df.height,
            "n_items": item_df.height,
            "counts": {
                "rows_read": rows_read,
                "interactions": kept_count,
                "users": user_df.height,
                "items": item_df.height,
                "items_without_train_interactions": int((train_count == 0).sum()),
                **{name: table.height for name, table in tables.items()},
                "cold_start_test_targets": cold_test,
            },
            "rejected": rejected,
            "skipped_lines": raw.rejected,
            "items_without_title": item_df.filter(pl.col("title") == "").height,
            "duplicate_item_rows": duplicate_items,
            "k_core_rounds": rounds,
            "config": to_dict(config),
            "input_fingerprint": fingerprint.result(),
        }
        write_json(paths.meta, meta)
        mlflow.log_metrics({f"count.{k}": v for k, v in meta["counts"].items()})
        mlflow.log_metrics({"rejected.total": sum(rejected.values())})
        mlflow.log_artifact(str(paths.meta))
    return {**meta, "output_dir": str(paths.root), "mlflow_run_id": run.info.run_id}
