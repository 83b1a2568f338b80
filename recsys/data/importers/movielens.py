"""MovieLens 100k and 1M: ratings with timestamps, titles and genres (latin-1 text files)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    BadLines,
    RawDataset,
    scan_lines,
    split_fields,
)

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
"""Order of the 19 genre flags at the end of each `u.item` line (as listed in `u.genre`)."""


def _ratings(path: Path, separator: str, on_bad_lines: BadLines, rejected: dict[str, int]) -> pl.LazyFrame:
    fields = split_fields(
        scan_lines(path),
        path,
        separator,
        ["user_id", "item_id", "rating", "timestamp"],
        integer_fields=["user_id", "item_id", "rating", "timestamp"],
        on_bad_lines=on_bad_lines,
        rejected=rejected,
    )
    return fields.select(
        pl.col("user_id"),
        pl.col("item_id"),
        pl.col("timestamp").cast(pl.Int64),
        pl.col("rating").cast(pl.Float32).alias("weight"),
        pl.col("line"),
    ).match_to_schema(INTERACTIONS_SCHEMA)


def load_movielens_100k(folder: Path, on_bad_lines: BadLines = "error") -> RawDataset:
    """`u.data` (user, item, rating, unix time; tab-separated) and `u.item` (pipe-separated, latin-1)."""
    folder = Path(folder)
    rejected: dict[str, int] = {}
    interactions = _ratings(folder / "u.data", "\t", on_bad_lines, rejected)
    item_fields = split_fields(
        scan_lines(folder / "u.item", encoding="latin-1"),
        folder / "u.item",
        "|",
        ["item_id", "title", "release", "video_release", "url", *ML100K_GENRES],
        integer_fields=["item_id"],
        on_bad_lines=on_bad_lines,
        rejected=rejected,
    )
    genre_flags = pl.concat_list(
        pl.when(pl.col(name) == "1").then(pl.lit(name)).otherwise(None) for name in ML100K_GENRES
    )
    items = item_fields.select(
        pl.col("item_id"),
        pl.col("title").fill_null(""),
        pl.lit("").alias("text"),
        genre_flags.list.drop_nulls().alias("genres"),
        pl.lit(None, dtype=pl.String).alias("video_path"),
    ).match_to_schema(ITEMS_SCHEMA)
    return RawDataset("movielens-100k", interactions, items, [folder / "u.data", folder / "u.item"], rejected)


def load_movielens_1m(folder: Path, on_bad_lines: BadLines = "error") -> RawDataset:
    """`ratings.dat` and `movies.dat`: `::`-separated, latin-1 titles, genres joined by `|`."""
    folder = Path(folder)
    rejected: dict[str, int] = {}
    interactions = _ratings(folder / "ratings.dat", "::", on_bad_lines, rejected)
    movie_fields = split_fields(
        scan_lines(folder / "movies.dat", encoding="latin-1"),
        folder / "movies.dat",
        "::",
        ["item_id", "title", "genres"],
        integer_fields=["item_id"],
        on_bad_lines=on_bad_lines,
        rejected=rejected,
    )
    items = movie_fields.select(
        pl.col("item_id"),
        pl.col("title").fill_null(""),
        pl.lit("").alias("text"),
        pl.col("genres").str.split("|"),
        pl.lit(None, dtype=pl.String).alias("video_path"),
    ).match_to_schema(ITEMS_SCHEMA)
    return RawDataset(
        "movielens-1m", interactions, items, [folder / "ratings.dat", folder / "movies.dat"], rejected
    )
