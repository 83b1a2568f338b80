"""What users watched, read from the canonical tables: each user's history, each item's training views.

A user's history is their interactions oldest first; `in_watch_order` is the one definition of
that order (by user, then timestamp; a stable sort, so ties keep the order of the frames given
and of their rows: train before valid, then the order `prepare` wrote). Two-tower training reads
it as flat sorted arrays, evaluation and serving as one item_idx array per user.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from recsys.data.paths import PreparedPaths

UNKNOWN_USER = -1
"""User index of a user not in the dataset's user map (or not in a model's user table): known by a history alone."""


def in_watch_order(frames: Sequence[pl.LazyFrame]) -> pl.LazyFrame:
    """user_idx, item_idx, timestamp of interaction frames (given in time order), by user and then time."""
    return (
        pl.concat([f.select("user_idx", "item_idx", "timestamp") for f in frames])
        .sort("user_idx", "timestamp", maintain_order=True)
    )


def user_histories(frames: Sequence[pl.LazyFrame]) -> pl.LazyFrame:
    """user_idx, history (list of item_idx oldest first) from interaction frames given in time order."""
    return in_watch_order(frames).group_by("user_idx", maintain_order=True).agg(pl.col("item_idx").alias("history"))


def split_lists(lists: pl.Series) -> list[np.ndarray]:
    """A polars list column of int64 as one numpy array per row (empty for null rows)."""
    if lists.len() == 0:
        return []
    lengths = lists.list.len().fill_null(0).to_numpy()
    flat = lists.explode().drop_nulls().to_numpy().astype(np.int64)
    return np.split(flat, np.cumsum(lengths)[:-1])


def histories_by_user(frames: Sequence[pl.LazyFrame], n_users: int) -> list[np.ndarray]:
    """Every user's history from interaction frames given in time order, indexed by user_idx 0..n_users-1
    (an empty array for a user without interactions there)."""
    table = (
        pl.DataFrame({"user_idx": np.arange(n_users, dtype=np.int64)})
        .join(user_histories(frames).collect(), on="user_idx", how="left")
        .sort("user_idx")
    )
    return split_lists(table["history"])


def train_counts(paths: PreparedPaths) -> np.ndarray:
    """(n_items,) int64 train interactions per item (0 for cold-start items)."""
    popularity = pl.read_parquet(paths.popularity).sort("item_idx")
    return popularity["count"].to_numpy().astype(np.int64)
