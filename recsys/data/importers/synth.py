"""The synthetic corpus written by `recsys data synth` (`recsys.synthetic`), read onto the canonical tables.

The generator writes `items.parquet` (item_id, title, video_path relative to the corpus folder, ...)
and `events.parquet` (user_id, item_id, timestamp, ...); this importer is the only reader of those
files, so the data stage never imports the generator.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.data.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, BadLines, RawDataset
from recsys.errors import DataFormatError, MissingInputError


def load_synth(folder: Path, on_bad_lines: BadLines = "error") -> RawDataset:
    """Read a corpus written by `synthesize` into the canonical tables (video paths made absolute).

    Genres stay empty: the latent topic is what models must discover, so it is not given away.
    Rows with a missing user, item or timestamp are reported (on_bad_lines='error') or skipped
    and counted (on_bad_lines='skip').
    """
    folder = Path(folder)
    items_file, events_file = folder / "items.parquet", folder / "events.parquet"
    for path in (items_file, events_file):
        if not path.exists():
            raise MissingInputError(f"{path} not found; run `recsys data synth` to generate the corpus")
    _check_columns(items_file, ("item_id", "title", "video_path"))
    _check_columns(events_file, ("user_id", "item_id", "timestamp"))

    rejected: dict[str, int] = {}
    events = pl.scan_parquet(events_file).with_row_index("line", offset=1)
    incomplete = pl.any_horizontal(pl.col("user_id", "item_id", "timestamp").is_null())
    bad = events.filter(incomplete).select("line").collect()
    if bad.height:
        if on_bad_lines == "error":
            raise DataFormatError(
                f"{events_file}: row {bad.item(0, 0)} lacks a user_id, item_id or timestamp "
                f"({bad.height} such row(s)); fix the file or pass --on-bad-lines skip"
            )
        rejected[f"row without user_id, item_id or timestamp in {events_file.name}"] = bad.height
    interactions = events.filter(~incomplete).select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("timestamp").cast(pl.Int64),
        pl.lit(None, dtype=pl.Float32).alias("weight"),
        pl.col("line").cast(pl.Int64),
    ).match_to_schema(INTERACTIONS_SCHEMA)

    root = str(folder.resolve()) + "/"
    items = pl.scan_parquet(items_file).select(
        pl.col("item_id").cast(pl.String),
        pl.col("title").cast(pl.String).fill_null(""),
        pl.lit("").alias("text"),
        pl.lit([], dtype=pl.List(pl.String)).alias("genres"),
        pl.when(pl.col("video_path").str.starts_with("/")).then(pl.col("video_path"))
        .otherwise(pl.lit(root) + pl.col("video_path")).alias("video_path"),
    ).match_to_schema(ITEMS_SCHEMA)
    return RawDataset("synth", interactions, items, [items_file, events_file], rejected)


def _check_columns(path: Path, needed: tuple[str, ...]) -> None:
    present = set(pl.read_parquet_schema(path))
    missing = [c for c in needed if c not in present]
    if missing:
        raise DataFormatError(
            f"{path}: missing column(s) {', '.join(missing)}; regenerate it with `recsys data synth --overwrite`"
        )
