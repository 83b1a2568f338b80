"""`recsys data import NAME`: your own watch log and catalogue (CSV, TSV, Parquet, JSON Lines) → canonical tables.

The watch log is read lazily with polars and streamed to parquet, so a log larger than memory
imports; the catalogue is small and read whole. Every input row is accounted for: rows read =
rows kept + rows skipped, by reason. A bad row stops the import with a one-line error naming the
file, the line (or row) and the value, unless `--on-bad-rows skip` skips and counts it. Nothing is
written unless the whole import succeeds (`CanonicalFolder.replace_atomically`).
"""

from __future__ import annotations

import codecs
import difflib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import polars as pl

from recsys.config import ImportConfig, WatchLogOptions, to_dict
from recsys.data.canonical import CanonicalFolder, write_manifest
from recsys.data.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA
from recsys.errors import DataFormatError, MissingInputError

TableFormat = Literal["csv", "tsv", "parquet", "jsonl"]
EXTENSIONS: dict[str, TableFormat] = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl",
}
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".3gp", ".ogv",
})
"""Files a --media-root folder is searched for when the catalogue names no video paths."""
MS_THRESHOLD = 100_000_000_000
"""Whole-number times at or above this are milliseconds (as seconds it would be the year 5138)."""

# Why a watch-log row is skipped; the first that applies is the one counted.
MISSING_USER = "missing user ID"
MISSING_ITEM = "missing video ID"
BAD_TIME = "unparseable timestamp"
BAD_WEIGHT = "unparseable weight"
UNKNOWN_ITEM = "video not in the catalogue"


@dataclass
class ImportReport:
    """What `recsys data import` read, kept and skipped, by reason."""

    dataset: str
    folder: str
    rows_read: int
    rows_kept: int
    skipped: dict[str, int]
    users: int
    items: int
    item_rows_read: int
    item_rows_skipped: dict[str, int]
    items_with_views: int
    items_without_title: int
    items_with_video: int
    videos_not_found: list[str] = field(default_factory=list)
    first_time: str | None = None
    last_time: str | None = None
    seconds: float = 0.0
    mlflow_run_id: str | None = None

    def summary(self) -> str:
        """The report as the lines the CLI prints."""
        lines = [
            f"{self.dataset}: {self.rows_kept:,} of {self.rows_read:,} views kept, {self.users:,} users; "
            f"{self.items:,} videos in the catalogue ({self.items_with_views:,} watched, "
            f"{self.items - self.items_with_views:,} new), {self.items_with_video:,} with a video file, "
            f"{self.items_without_title:,} without a title -> {self.folder}",
        ]
        if self.first_time is not None:
            lines.append(f"  views from {self.first_time} to {self.last_time} (UTC)")
        lines += [f"  skipped {n:,} view(s): {reason}" for reason, n in self.skipped.items() if n]
        lines += [f"  skipped {n:,} catalogue row(s): {reason}" for reason, n in self.item_rows_skipped.items() if n]
        if self.videos_not_found:
            shown = ", ".join(self.videos_not_found[:3])
            lines.append(f"  {len(self.videos_not_found):,} video file(s) not found (e.g. {shown}): "
                         "those videos are embedded from their title alone")
        lines.append(f"  next: recsys data prepare {self.dataset}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Reading a table of any supported format, with the location of each row


@dataclass(frozen=True)
class Table:
    """A user file scanned lazily: its columns as found, and `_at` giving each row's line (or row) number."""

    path: Path
    fmt: TableFormat
    frame: pl.LazyFrame
    columns: list[str]
    unit: Literal["line", "row"]

    def where(self, at: int) -> str:
        """`file:line` for text files, `file: row N` for parquet."""
        return f"{self.path}:{at}" if self.unit == "line" else f"{self.path}: row {at}"

    def column(self, name: str, role: str, option: str) -> str:
        """The column's name when the file has it, else an error listing the columns found."""
        if name in self.columns:
            return name
        close = difflib.get_close_matches(name, self.columns, n=1)
        hint = f"; did you mean {close[0]!r} ({option} {close[0]})?" if close else f"; set it with {option} NAME"
        raise DataFormatError(f"{self.path}: no {role} column {name!r} (columns found: "
                              f"{', '.join(self.columns) or 'none'}){hint}")


def table_format(path: Path, override: str) -> TableFormat:
    if override != "auto":
        return override  # type: ignore[return-value]
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataFormatError(f"{path}: cannot tell the format from the extension {suffix!r}; "
                              f"name it {', '.join(EXTENSIONS)} or pass the format (csv, tsv, parquet, jsonl)")
    return EXTENSIONS[suffix]


def scan_table(path: Path, fmt: TableFormat) -> Table:
    """Scan a user file lazily: text formats with every column as a string (IDs stay exactly as written)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path}: the file is empty")
    try:
        if fmt in ("csv", "tsv"):
            frame = pl.scan_csv(path, separator="," if fmt == "csv" else "\t", infer_schema=False)
            offset, unit = 2, "line"  # line 1 is the header
        elif fmt == "jsonl":
            frame, offset, unit = pl.scan_ndjson(path, infer_schema_length=10_000), 1, "line"
        else:
            frame, offset, unit = pl.scan_parquet(path), 1, "row"
        columns = frame.collect_schema().names()
    except pl.exceptions.PolarsError as err:
        raise _read_error(path, fmt, err) from None
    return Table(path, fmt, frame.with_row_index("_at", offset=offset).with_columns(pl.col("_at").cast(pl.Int64)),
                 columns, unit)


def _read_error(path: Path, fmt: TableFormat, err: Exception) -> DataFormatError:
    """A polars read error as one line naming the file, and the line of the first bad byte for bad UTF-8."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "utf-8" in message.lower() or "utf8" in message.lower():
        at = first_invalid_utf8(path)
        if at is not None:
            line, byte = at
            return DataFormatError(f"{path}:{line}: byte {byte:#04x} is not valid UTF-8 "
                                   "(the file must be UTF-8 encoded)")
    if "more fields" in message:
        at = first_long_row(path, "\t" if fmt == "tsv" else ",")
        if at is not None:
            line, expected, found = at
            return DataFormatError(f"{path}:{line}: {found} fields where the header names {expected} "
                                   "(a separator inside a value needs quotes)")
    return DataFormatError(f"{path}: cannot be read as a table: {message}")


def first_long_row(path: Path, separator: str) -> tuple[int, int, int] | None:
    """(line, header fields, fields) of the first CSV/TSV row with more fields than its header."""
    import csv

    with Path(path).open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=separator)
        header = next(reader, [])
        for row in reader:
            if len(row) > len(header):
                return reader.line_num, len(header), len(row)
    return None


def first_invalid_utf8(path: Path, block: int = 1 << 24) -> tuple[int, int] | None:
    """(line, byte value) of the first byte that is not valid UTF-8, reading the file in blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with Path(path).open("rb") as handle:
        while chunk := handle.read(block):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return line + chunk.count(b"\n", 0, err.start), chunk[err.start]
            line += chunk.count(b"\n")
    return None


def _collect(table: Table, frame: pl.LazyFrame) -> pl.DataFrame:
    try:
        return frame.collect()
    except pl.exceptions.PolarsError as err:
        raise _read_error(table.path, table.fmt, err) from None


def _collect_all(table: Table, frames: list[pl.LazyFrame]) -> list[pl.DataFrame]:
    """Run the queries (sinks among them) in one pass over the table."""
    try:
        return pl.collect_all(frames, engine="streaming")
    except pl.exceptions.PolarsError as err:
        raise _read_error(table.path, table.fmt, err) from None


def _text(name: str) -> pl.Expr:
    """A column as trimmed text, null when empty."""
    return pl.col(name).cast(pl.String).str.strip_chars().replace("", None)


# --------------------------------------------------------------------------------------------
# Timestamps: unix seconds or milliseconds, or ISO-8601 text with or without a zone


def parse_time(frame: pl.LazyFrame, column: str, unit: str, sample: pl.Series | None = None,
               name: str = "_seconds") -> pl.LazyFrame:
    """`frame` with `name`: the column in unix seconds (Int64), null where a value cannot be read as a time.

    Datetime columns (Parquet, JSON) are taken as they are. Text is read per value under
    `unit` auto: whole or decimal numbers are unix seconds, or milliseconds from 1e11 on (as
    seconds that would be the year 5138); anything else is ISO-8601, converted to UTC when it
    has a zone (Z, +01:00, +0100) and read as UTC when it has none.

    `sample` (some of the column's first values) only makes reading faster: the ISO layout most
    of it has is parsed first, and only the values it does not read go through every layout.
    Each step is its own column because polars evaluates a shared sub-expression inside
    `when`/`coalesce` once per use (the ISO chain would run four times).
    """
    if frame.collect_schema()[column].is_temporal():
        return frame.with_columns(pl.col(column).cast(pl.Datetime("ms")).dt.epoch("s").alias(name))
    steps = [name + "_text", name + "_number", name + "_iso", name + "_first"]
    text, number, iso, first = (pl.col(c) for c in steps)
    frame = frame.with_columns(_text(column).alias(steps[0]))
    layout = None if sample is None or unit in ("s", "ms") else _sample_layout(sample, unit)
    if layout is not None:
        # The sampled layout reads first, and only what it leaves goes on: nothing it reads is a number
        # (each layout has a dash after the year), so the order changes no result, and most values skip
        # the number and ISO steps.
        frame = frame.with_columns(_layout_datetime(text, layout).alias(steps[3])).with_columns(
            pl.when(first.is_null()).then(text).alias(steps[0]))
    frame = frame.with_columns(text.cast(pl.Float64, strict=False).alias(steps[1]))
    seconds = {"s": number, "ms": number / 1000,
               "auto": pl.when(number.abs() >= MS_THRESHOLD).then(number / 1000).otherwise(number)}
    frame = frame.with_columns(seconds.get(unit, pl.lit(None, pl.Float64)).floor().cast(pl.Int64).alias(steps[1]))
    if unit in ("s", "ms"):
        return frame.rename({steps[1]: name}).drop(steps[0])
    # A number never reaches the ISO parsers; under auto it is what the value means.
    frame = frame.with_columns((text if unit == "iso" else pl.when(number.is_null()).then(text)).alias(steps[2]))
    frame = frame.with_columns(_normal_iso(iso).alias(steps[2]))
    from_text = pl.coalesce(*([first] if layout is not None else []), *_iso_layouts(iso)).dt.epoch("s")
    return frame.with_columns(
        (from_text if unit == "iso" else pl.coalesce(number, from_text)).alias(name)
    ).drop(steps if layout is not None else steps[:3])


def _normal_iso(text: pl.Expr) -> pl.Expr:
    """`YYYY-MM-DD hh...` with a T, and a Z zone as +00:00: what `_iso_layouts` read."""
    return text.str.replace(r"^(\d{4}-\d{2}-\d{2})[ T]", "${1}T").str.replace(r"(?i)z$", "+00:00")


def _iso_layouts(iso: pl.Expr) -> list[pl.Expr]:
    """Every accepted ISO-8601 layout of normalised text (naive Datetime("ms") in UTC), first match wins:
    the definition of what is read."""
    return [
        iso.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", strict=False, time_zone="UTC", time_unit="ms")
        .dt.replace_time_zone(None),
        iso.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="ms"),
        iso.str.to_datetime("%Y-%m-%dT%H:%M", strict=False, time_unit="ms"),
        iso.str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("ms")),
    ]


ISO_LAYOUTS: tuple[tuple[str, bool], ...] = (
    ("%Y-%m-%dT%H:%M:%SZ", False), ("%Y-%m-%dT%H:%M:%S", False),
    ("%Y-%m-%d %H:%M:%SZ", True), ("%Y-%m-%d %H:%M:%S", True),
    ("%Y-%m-%dT%H:%M:%S%.fZ", False), ("%Y-%m-%dT%H:%M:%S%.f", False), ("%Y-%m-%dT%H:%M:%S%.f%z", False),
    ("%Y-%m-%d %H:%M:%S%.fZ", True), ("%Y-%m-%d %H:%M:%S%.f", True), ("%Y-%m-%d %H:%M:%S%.f%z", True),
    ("%Y-%m-%dT%H:%M", False), ("%Y-%m-%d", False),
)
"""Single layouts tried on a sample, each (format, whether it has a space after the date).

Whatever one of them reads, `_iso_layouts` reads the same way (Z is UTC, no zone is UTC), so a
value read by the layout is never read differently. Layouts with a space are used only on
values starting with ASCII `YYYY-MM-DD `, the shape `_normal_iso` turns into `YYYY-MM-DDT`: the
parser alone would also take `2024-5-01 ...`, which `_iso_layouts` refuse. The first four are on
polars' fast path (about 20x faster than `_iso_layouts`)."""
SPACE_AFTER_DATE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2} "


def _layout_datetime(text: pl.Expr, layout: tuple[str, bool]) -> pl.Expr:
    fmt, spaced = layout
    if spaced:
        text = pl.when(text.str.contains(SPACE_AFTER_DATE)).then(text)
    if fmt == "%Y-%m-%d":
        return text.str.to_date(fmt, strict=False).cast(pl.Datetime("ms"))
    # No cache of converted values: times of day are mostly distinct, and the cache's hash table of the
    # strings costs a third of the parse (on 10M views of a year).
    if fmt.endswith("%z"):
        return (text.str.to_datetime(fmt, strict=False, time_zone="UTC", time_unit="ms", cache=False)
                .dt.replace_time_zone(None))
    return text.str.to_datetime(fmt, strict=False, time_unit="ms", cache=False)


def _sample_layout(sample: pl.Series, unit: str) -> tuple[str, bool] | None:
    """The layout of ISO_LAYOUTS reading most of the sample's text values (None when none reads any)."""
    frame = pl.DataFrame({"t": sample.cast(pl.String)}).select(_text("t").alias("t")).drop_nulls()
    if unit == "auto":
        frame = frame.filter(pl.col("t").cast(pl.Float64, strict=False).is_null())
    if frame.is_empty():
        return None
    read = frame.select([_layout_datetime(pl.col("t"), layout).is_not_null().sum().alias(str(i))
                         for i, layout in enumerate(ISO_LAYOUTS)]).row(0)
    best = max(range(len(ISO_LAYOUTS)), key=lambda i: (read[i], -i))
    return ISO_LAYOUTS[best] if read[best] else None


# --------------------------------------------------------------------------------------------
# The catalogue


class CatalogueOptions(Protocol):
    """What reading a catalogue needs from a config (`ImportConfig`, `CatalogueAddConfig`)."""

    items: Path | None
    media_root: Path | None
    items_format: str
    item_column: str
    on_bad_rows: str


@dataclass
class Catalogue:
    """The imported catalogue (canonical items, video paths relative to the media root) and what was skipped."""

    items: pl.DataFrame
    rows_read: int
    skipped: dict[str, int]
    videos_not_found: list[str]


def _bad(table: Table, reason: str, at: int, value: Any, on_bad_rows: str, skipped: dict[str, int],
         count: int = 1, counted_as: str | None = None) -> None:
    """Raise the one-line error for a bad row, or count it as skipped (under `counted_as`, default the reason)."""
    if on_bad_rows == "error":
        more = f" ({count - 1} more such row(s))" if count > 1 else ""
        raise DataFormatError(f"{table.where(at)}: {reason}: {value!r}{more}; "
                              "fix the file or pass --on-bad-rows skip to skip and count such rows")
    key = counted_as or reason
    skipped[key] = skipped.get(key, 0) + count


def read_catalogue(config: CatalogueOptions) -> Catalogue:
    """The items file (or the --media-root folder) as canonical items, every path checked to stay in the root."""
    media_root = None if config.media_root is None else config.media_root.resolve()
    if media_root is not None and not media_root.is_dir():
        raise MissingInputError(f"--media-root {config.media_root}: no such folder")
    if config.items is None:
        assert media_root is not None  # checked by ImportConfig
        return _folder_catalogue(media_root)

    table = scan_table(config.items, table_format(config.items, config.items_format))
    id_column = table.column("item_id" if "item_id" in table.columns else config.item_column,
                             "video ID", "the items file's item_id")
    title_column = table.column("title", "title", "the items file's title")
    video_column = next((c for c in ("video", "video_path") if c in table.columns), None)
    if "tags" not in table.columns:
        tag_list = pl.lit([], pl.List(pl.String))
    elif isinstance(table.frame.collect_schema()["tags"], pl.List):
        tag_list = pl.col("tags").cast(pl.List(pl.String))
    else:
        tag_list = _text("tags").str.split("|")
    rows = _collect(table, table.frame.select(
        pl.col("_at"),
        _text(id_column).alias("item_id"),
        _text(title_column).fill_null("").alias("title"),
        (_text("description") if "description" in table.columns else pl.lit(None, pl.String)).alias("description"),
        tag_list.alias("genres"),
        (_text(video_column) if video_column else pl.lit(None, pl.String)).alias("video"),
    ))
    if rows.is_empty():
        raise DataFormatError(f"{table.path}: holds no catalogue rows")
    skipped: dict[str, int] = {}
    # Tags may be a list, or text separated by "|" or ",": one list of trimmed, non-empty tags.
    rows = rows.with_columns(pl.col("genres").fill_null([]).list.eval(
        pl.element().str.split(",").explode().str.strip_chars()).list.drop_nulls().list.filter(pl.element() != ""))

    missing = rows.filter(pl.col("item_id").is_null())
    if missing.height:
        _bad(table, "missing video ID", missing.item(0, "_at"), None, config.on_bad_rows, skipped, missing.height)
        rows = rows.filter(pl.col("item_id").is_not_null())
    repeats = rows.filter(~pl.col("item_id").is_first_distinct())
    if repeats.height:
        first = repeats.row(0, named=True)
        earlier = rows.filter(pl.col("item_id") == first["item_id"]).item(0, "_at")
        _bad(table, f"duplicate video ID (first on {table.unit} {earlier})", first["_at"], first["item_id"],
             config.on_bad_rows, skipped, repeats.height, counted_as="duplicate video ID (the first row is kept)")
        rows = rows.unique("item_id", keep="first", maintain_order=True)

    if video_column is not None:
        if media_root is None and rows.get_column("video").drop_nulls().len():
            raise DataFormatError(f"{table.path}: the {video_column} column names files; give the folder they are in "
                                  "with --media-root DIR")
        videos, bad = [], []
        for video in rows.get_column("video"):
            relative, problem = (None, None) if video is None else _inside(media_root, video)  # type: ignore[arg-type]
            videos.append(relative)
            bad.append(problem)
        rows = rows.with_columns(pl.Series("video_path", videos, pl.String), pl.Series("_problem", bad, pl.String))
        for problem in rows.get_column("_problem").drop_nulls().unique(maintain_order=True):
            hits = rows.filter(pl.col("_problem") == problem)
            _bad(table, problem, hits.item(0, "_at"), hits.item(0, "video"), config.on_bad_rows, skipped, hits.height)
        rows = rows.filter(pl.col("_problem").is_null()).drop("_problem")
    elif media_root is not None:
        by_id = _videos_by_id(media_root)
        rows = rows.with_columns(pl.col("item_id").replace_strict(by_id, default=None, return_dtype=pl.String)
                                 .alias("video_path"))
    else:
        rows = rows.with_columns(pl.lit(None, pl.String).alias("video_path"))

    text = pl.concat_str([pl.col("description"), pl.col("genres").list.join(" ")], separator=" ", ignore_nulls=True)
    items = rows.select(
        "item_id", "title", text.str.strip_chars().fill_null("").alias("text"), "genres", "video_path",
    ).match_to_schema(ITEMS_SCHEMA)
    not_found = [] if media_root is None else [
        p for p in items.get_column("video_path").drop_nulls() if not (media_root / p).is_file()
    ]
    return Catalogue(items, table.frame.select(pl.len()).collect().item(), skipped, not_found)


def _inside(media_root: Path, video: str) -> tuple[str | None, str | None]:
    """(path relative to the media root, None) or (None, why it is refused): absolute or escaping paths."""
    path = Path(video)
    if path.is_absolute() or video.startswith(("/", "\\")) or (len(video) > 1 and video[1] == ":"):
        return None, "absolute video path (give paths relative to --media-root)"
    normal = Path(os.path.normpath(media_root / path))
    if not normal.is_relative_to(media_root):
        return None, "video path outside the media root (refused: nothing outside --media-root is read)"
    if not normal.resolve().is_relative_to(media_root):
        return None, "video path is a link to a file outside the media root (refused)"
    return normal.relative_to(media_root).as_posix(), None


def _videos_by_id(media_root: Path) -> dict[str, str]:
    """{item_id: path relative to the root} of the video files named <item_id>.<ext> under the root."""
    found: dict[str, str] = {}
    for path in sorted(media_root.rglob("*")):
        if path.suffix.lower() not in VIDEO_EXTENSIONS or not path.is_file():
            continue
        resolved = path.resolve()
        if not resolved.is_relative_to(media_root):
            continue  # a link out of the root is never followed
        relative = path.relative_to(media_root).as_posix()
        if path.stem in found:
            raise DataFormatError(f"{media_root}: two videos for item {path.stem!r}: {found[path.stem]} and "
                                  f"{relative}; item IDs must name one file each")
        found[path.stem] = relative
    return found


def _folder_catalogue(media_root: Path) -> Catalogue:
    """The catalogue of a folder of <item_id>.<ext> videos, each title from the container's title tag."""
    by_id = _videos_by_id(media_root)
    if not by_id:
        raise DataFormatError(f"{media_root}: holds no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) "
                              "to make a catalogue of; give one with --items FILE")
    titles = [_container_title(media_root / p) for p in by_id.values()]
    items = pl.DataFrame({
        "item_id": list(by_id), "title": titles, "text": [""] * len(by_id),
        "genres": [[] for _ in by_id], "video_path": list(by_id.values()),
    }, schema=ITEMS_SCHEMA)
    return Catalogue(items, items.height, {}, [])


def _container_title(path: Path) -> str:
    """The title tag of a video container, "" when it has none or cannot be opened (ingest reports that)."""
    import av

    try:
        with av.open(str(path)) as container:
            return str(container.metadata.get("title", "")).strip()
    except (av.error.FFmpegError, OSError, UnicodeDecodeError):
        return ""


# --------------------------------------------------------------------------------------------
# The watch log


def watch_log(config: WatchLogOptions, table: Table, catalogue_ids: pl.Series) -> pl.LazyFrame:
    """Every row with its canonical columns and `_skip`, the reason it is skipped (null when kept)."""
    user = table.column(config.user_column, "user ID", "--user-column")
    item = table.column(config.item_column, "video ID", "--item-column")
    when = table.column(config.time_column, "time", "--time-column")
    weight_column = None if config.weight_column is None else table.column(
        config.weight_column, "weight", "--weight-column")
    weight = (pl.lit(None, pl.Float32) if weight_column is None
              else _text(weight_column).cast(pl.Float32, strict=False))
    frame = parse_time(table.frame, when, config.time_unit, _sample(table, when)).select(
        _text(user).alias("user_id"),
        _text(item).alias("item_id"),
        pl.col("_seconds").alias("timestamp"),
        weight.alias("weight"),
        pl.col("_at").alias("line"),
        pl.col(when).cast(pl.String).alias("_time"),
        (pl.lit(None, pl.String) if weight_column is None else pl.col(weight_column).cast(pl.String)).alias("_weight"),
    )
    skip = (
        pl.when(pl.col("user_id").is_null()).then(pl.lit(MISSING_USER))
        .when(pl.col("item_id").is_null()).then(pl.lit(MISSING_ITEM))
        .when(pl.col("timestamp").is_null()).then(pl.lit(BAD_TIME))
        .when(pl.lit(weight_column is not None) & pl.col("weight").is_null()).then(pl.lit(BAD_WEIGHT))
    )
    if config.min_weight is not None:
        below = f"weight below min_weight={config.min_weight:g}"
        skip = skip.when(pl.col("weight") < config.min_weight).then(pl.lit(below))
    skip = skip.when(~pl.col("item_id").is_in(catalogue_ids.implode())).then(pl.lit(UNKNOWN_ITEM))
    return frame.with_columns(skip.otherwise(None).alias("_skip"))


def _sample(table: Table, column: str, rows: int = 1000) -> pl.Series | None:
    """The column's first values, to pick the time layout from (None when unreadable: the full read reports it)."""
    try:
        return table.frame.select(pl.col(column)).head(rows).collect().to_series()
    except pl.exceptions.PolarsError:
        return None


def check_skips(config: WatchLogOptions, table: Table, staged: pl.LazyFrame, counts: dict[str, int]) -> None:
    """Raise the error for the first bad row whose reason is an error under the settings (none when skipping)."""
    errors = [r for r in (MISSING_USER, MISSING_ITEM, BAD_TIME, BAD_WEIGHT) if config.on_bad_rows == "error"]
    if config.strict:
        errors.append(UNKNOWN_ITEM)
    errors = [r for r in errors if counts.get(r)]
    if not errors:
        return
    first = staged.filter(pl.col("_skip").is_in(errors)).sort("line").head(1).collect().row(0, named=True)
    reason = first["_skip"]
    value = {MISSING_USER: None, MISSING_ITEM: None, BAD_TIME: first["_time"], BAD_WEIGHT: first["_weight"],
             UNKNOWN_ITEM: first["item_id"]}[reason]
    n = counts[reason]
    more = f" ({n - 1:,} more such row(s))" if n > 1 else ""
    fix = ("pass --strict off (default) to skip and count them, or add the videos to the catalogue"
           if reason == UNKNOWN_ITEM else "fix the file or pass --on-bad-rows skip to skip and count such rows")
    if reason == BAD_TIME:
        fix = ("times must be unix seconds or milliseconds, or ISO-8601 text like 2024-05-01T12:30:00Z "
               f"(--time-unit is {config.time_unit}); " + fix)
    raise DataFormatError(f"{table.where(first['line'])}: {reason}: {value!r}{more}; {fix}")


# --------------------------------------------------------------------------------------------
# The command


def import_dataset(config: ImportConfig) -> ImportReport:
    """Import a watch log and catalogue as dataset `config.dataset`; returns the report (also in dataset.json)."""
    from recsys.tracking.store import fingerprint_files, open_store, start_run

    started = time.perf_counter()
    target = CanonicalFolder(config.raw_dir / config.dataset)
    assert config.interactions is not None  # checked by ImportConfig
    log = scan_table(config.interactions, table_format(config.interactions, config.format))
    sources = [p for p in (config.interactions, config.items) if p is not None]
    # The sources' hash (a full read of the log) is taken while polars reads it, on a core it leaves idle,
    # and the MLflow store is opened meanwhile (its queries wait on sqlite more than they compute).
    with target.replace_atomically(config.overwrite) as staging, ThreadPoolExecutor(2) as background:
        fingerprint = background.submit(fingerprint_files, sources)
        store = background.submit(open_store)
        catalogue = read_catalogue(config)
        # One pass over the log: kept rows straight to their table, skipped ones (few) beside them
        # with what their error needs. zstd level 1: the size of the default level 3, 20% less CPU.
        rows = watch_log(config, log, catalogue.items.get_column("item_id"))
        skipped_file = staging / "_skipped.parquet"
        _collect_all(log, [
            rows.filter(pl.col("_skip").is_null()).select(list(INTERACTIONS_SCHEMA))
            .sink_parquet(staging / "interactions.parquet", compression_level=1, lazy=True),
            rows.filter(pl.col("_skip").is_not_null()).select("line", "item_id", "_time", "_weight", "_skip")
            .sink_parquet(skipped_file, lazy=True),
        ])
        skipped = pl.scan_parquet(skipped_file)
        counts = {reason: n for reason, n in skipped.group_by("_skip").len().collect().iter_rows()}
        kept = pl.scan_parquet(staging / "interactions.parquet")
        if kept_rows := kept.select(pl.len()).collect().item():
            counts[None] = kept_rows
        rows_read = sum(counts.values())
        if rows_read == 0:
            raise DataFormatError(f"{log.path}: holds no views (only a header?)")
        check_skips(config, log, skipped, counts)
        kept_count = counts.pop(None, 0)
        skipped_file.unlink()
        if kept_count == 0:
            reasons = ", ".join(f"{n:,} {r}" for r, n in counts.items())
            raise DataFormatError(f"{log.path}: no view is left to import ({reasons})")
        catalogue.items.write_parquet(staging / "items.parquet")
        # A summary of the table just written (a third output of the pass above would read the log again).
        # Every kept video is in the catalogue, so when the catalogue's IDs have distinct hashes the
        # kept videos' distinct hashes count them exactly, without a hash table of the strings.
        ids = catalogue.items.get_column("item_id")
        videos = pl.col("item_id").hash() if ids.hash().n_unique() == ids.len() else pl.col("item_id")
        summary = kept.select(
            pl.col("user_id").n_unique().alias("users"), videos.n_unique().alias("items"),
            pl.col("timestamp").min().alias("first"), pl.col("timestamp").max().alias("last"),
        ).collect(engine="streaming").row(0, named=True)

        items = catalogue.items
        report = ImportReport(
            dataset=config.dataset,
            folder=str(target.root),
            rows_read=rows_read,
            rows_kept=kept_count,
            skipped={reason: counts.get(reason, 0) for reason in sorted(counts, key=lambda r: -counts[r])},
            users=summary["users"],
            items=items.height,
            item_rows_read=catalogue.rows_read,
            item_rows_skipped=catalogue.skipped,
            items_with_views=summary["items"],
            items_without_title=items.filter(pl.col("title") == "").height,
            items_with_video=items.get_column("video_path").drop_nulls().len() - len(catalogue.videos_not_found),
            videos_not_found=catalogue.videos_not_found,
            first_time=_iso(summary["first"]),
            last_time=_iso(summary["last"]),
        )
        assert report.rows_read == report.rows_kept + sum(report.skipped.values())
        store.result()
        with start_run(config.dataset, "import", to_dict(config), {"sources": fingerprint.result()}) as run:
            import mlflow

            mlflow.log_metrics({"count.rows_read": rows_read, "count.rows_kept": kept_count,
                                "count.users": report.users, "count.items": report.items,
                                "skipped.total": rows_read - kept_count})
        report.mlflow_run_id = run.info.run_id
        report.seconds = round(time.perf_counter() - started, 3)
        write_manifest(staging, {
            "dataset": config.dataset,
            "kind": "imported",
            "media_root": None if config.media_root is None else str(config.media_root.resolve()),
            "sources": {"interactions": str(config.interactions.resolve()),
                        "items": None if config.items is None else str(config.items.resolve())},
            "config": to_dict(config),
            "report": asdict(report),
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pid": os.getpid(),
        })
    return report


def _iso(seconds: int | None) -> str | None:
    return None if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
