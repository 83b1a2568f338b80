"""MicroLens-50k: chronological user→video sequences (no clock time) and video titles."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    BadLines,
    RawDataset,
    check_utf8,
    scan_lines,
    split_fields,
)
from recsys.errors import DataFormatError

PAIRS_FILE = "MicroLens-50k_pairs.tsv"
TITLES_FILE = "MicroLens-50k_titles.csv"


def load_microlens_50k(folder: Path, on_bad_lines: BadLines = "error") -> RawDataset:
    """`pairs.tsv` is `user<TAB>v1 v2 ...` oldest first: the position in the sequence is the timestamp.

    Raw videos, where present, are `videos/<item>.mp4` beside the tables.
    """
    folder = Path(folder)
    rejected: dict[str, int] = {}
    pairs = split_fields(
        scan_lines(folder / PAIRS_FILE),
        folder / PAIRS_FILE,
        "\t",
        ["user_id", "sequence"],
        integer_fields=["user_id"],
        on_bad_lines=on_bad_lines,
        rejected=rejected,
    )
    events = (
        pairs.with_columns(pl.col("sequence").str.split(" "))
        .explode("sequence")
        .rename({"sequence": "item_id"})
        .filter(pl.col("item_id") != "")
        .with_columns(pl.int_range(pl.len()).over("user_id").cast(pl.Int64).alias("timestamp"))
    )
    bad_items = events.filter(~pl.col("item_id").str.contains(r"^\d+$")).select("line", "item_id").collect()
    if bad_items.height:
        first = bad_items.row(0, named=True)
        if on_bad_lines == "error":
            raise DataFormatError(
                f"{folder / PAIRS_FILE}:{first['line']}: video ID {first['item_id'][:40]!r} is not a whole number "
                "(expected `user<TAB>video video ...` with single spaces)"
            )
        rejected[f"malformed video ID in {PAIRS_FILE}"] = bad_items.height
        events = events.filter(pl.col("item_id").str.contains(r"^\d+$"))
    interactions = events.select(
        "user_id", "item_id", "timestamp", pl.lit(None, dtype=pl.Float32).alias("weight"), "line"
    ).match_to_schema(INTERACTIONS_SCHEMA)

    check_utf8(folder / TITLES_FILE)
    titles = pl.scan_csv(folder / TITLES_FILE, schema={"item": pl.String, "title": pl.String})
    bad_titles = titles.with_row_index("line", offset=2).filter(
        pl.col("item").is_null() | ~pl.col("item").str.contains(r"^\d+$")
    ).collect()
    if bad_titles.height:
        first = bad_titles.row(0, named=True)
        if on_bad_lines == "error":
            raise DataFormatError(
                f"{folder / TITLES_FILE}:{first['line']}: expected `item,title` with a whole-number item ID"
            )
        rejected[f"malformed line in {TITLES_FILE}"] = bad_titles.height
    videos = folder / "videos"
    items = titles.filter(pl.col("item").str.contains(r"^\d+$")).select(
        pl.col("item").alias("item_id"),
        pl.col("title").fill_null("").str.strip_chars(),
        pl.lit("").alias("text"),
        pl.lit([], dtype=pl.List(pl.String)).alias("genres"),
        pl.when(pl.col("item").is_in(_video_ids(videos)))
        .then(pl.lit(str(videos.resolve()) + "/") + pl.col("item") + pl.lit(".mp4"))
        .otherwise(None)
        .alias("video_path"),
    ).match_to_schema(ITEMS_SCHEMA)
    return RawDataset(
        "microlens-50k", interactions, items, [folder / PAIRS_FILE, folder / TITLES_FILE], rejected
    )


def _video_ids(videos: Path) -> list[str]:
    return sorted(p.stem for p in videos.glob("*.mp4")) if videos.is_dir() else []
