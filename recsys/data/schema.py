"""The canonical tables every dataset is read onto, and the line-level reading that reports bad input precisely.

Every importer (your own files, MovieLens, MicroLens, the synthetic corpus) returns a `RawDataset`:

- interactions: user_id (str), item_id (str), timestamp (i64: unix seconds; for datasets without
  clock time, the position in the user's chronological sequence), weight (f32: a rating, a watch
  fraction; null when absent), line (i64: where the event came from, for error messages and
  stable tie-breaking)
- items: item_id (str), title (str, "" when missing), text (str: description and tags, read by the
  title encoder after the title; "" when none), genres (list[str]), video_path (str: an absolute
  path, null when the item has no video file)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from recsys.errors import DataFormatError

INTERACTIONS_SCHEMA = pl.Schema(
    {
        "user_id": pl.String,
        "item_id": pl.String,
        "timestamp": pl.Int64,
        "weight": pl.Float32,
        "line": pl.Int64,
    }
)
ITEMS_SCHEMA = pl.Schema(
    {"item_id": pl.String, "title": pl.String, "text": pl.String, "genres": pl.List(pl.String), "video_path": pl.String}
)

BadLines = Literal["error", "skip"]


@dataclass
class RawDataset:
    """A dataset as read from its raw files, before filtering and splitting."""

    name: str
    interactions: pl.LazyFrame
    items: pl.LazyFrame
    files: list[Path]
    """The raw files read (their hashes are the dataset's input fingerprint)."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Input rows skipped while reading, by reason (only with on_bad_lines='skip')."""


def check_utf8(path: Path) -> None:
    """Raise a DataFormatError naming the line of the first byte that is not valid UTF-8."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataFormatError(
            f"{path}:{line}: byte {data[err.start]:#04x} is not valid UTF-8 (the file must be UTF-8 encoded)"
        ) from None


def scan_lines(path: Path, encoding: Literal["utf-8", "latin-1"] = "utf-8") -> pl.LazyFrame:
    """A file's lines as a LazyFrame (line: 1-based number, text: without line ending), blank lines dropped.

    UTF-8 files are scanned lazily by polars after a validity check; latin-1 files (MovieLens
    item lists, a few hundred KB) are decoded in Python because polars reads only UTF-8.
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: file not found")
    if encoding == "utf-8":
        check_utf8(path)
        frame = pl.scan_csv(
            path,
            has_header=False,
            separator="\x1f",  # a byte that never occurs in these files: one column per line
            quote_char=None,
            schema={"text": pl.String},
            comment_prefix=None,
        )
    else:
        text = path.read_bytes().decode(encoding)
        frame = pl.LazyFrame({"text": text.removesuffix("\n").split("\n")})
    return (
        frame.with_row_index("line", offset=1)
        .with_columns(pl.col("line").cast(pl.Int64), pl.col("text").fill_null("").str.strip_chars_end("\r"))
        .filter(pl.col("text").str.strip_chars() != "")
    )


def split_fields(
    lines: pl.LazyFrame,
    path: Path,
    separator: str,
    names: list[str],
    integer_fields: list[str],
    on_bad_lines: BadLines,
    rejected: dict[str, int],
    min_fields: int | None = None,
) -> pl.LazyFrame:
    """Split each line into named string fields; report lines with a wrong field count or a non-integer.

    With on_bad_lines='error' the first bad line raises a DataFormatError naming file, line and
    problem; with 'skip' bad lines are dropped and counted in `rejected`. `min_fields` accepts
    lines with at least that many fields (extra fields ignored); by default exactly len(names).
    """
    parts = pl.col("text").str.split(separator)
    n_parts = parts.list.len()
    wanted = len(names)
    count_ok = n_parts >= (min_fields or wanted) if min_fields else n_parts == wanted
    frame = lines.with_columns(parts.alias("_parts"), count_ok.alias("_count_ok"))
    frame = frame.with_columns(
        pl.col("_parts").list.get(i, null_on_oob=True).str.strip_chars().alias(name) for i, name in enumerate(names)
    )
    int_ok = pl.all_horizontal(
        [pl.col(n).str.contains(r"^-?\d+$").fill_null(False) for n in integer_fields] or [pl.lit(True)]
    )
    frame = frame.with_columns((pl.col("_count_ok") & int_ok).alias("_ok"))
    bad = frame.filter(~pl.col("_ok")).select("line", "text", "_count_ok", n_parts.alias("_n")).collect()
    if bad.height:
        first = bad.row(0, named=True)
        problem = (
            f"expected {wanted} fields separated by {separator!r}, found {first['_n']}"
            if not first["_count_ok"]
            else f"expected whole numbers in field(s) {', '.join(integer_fields)}"
        )
        if on_bad_lines == "error":
            more = f" ({bad.height - 1} more bad line(s) follow)" if bad.height > 1 else ""
            raise DataFormatError(f"{path}:{first['line']}: {problem}: {first['text'][:80]!r}{more}")
        rejected[f"malformed line in {Path(path).name}"] = bad.height
    return frame.filter(pl.col("_ok")).drop("_parts", "_count_ok", "_ok", "text")
