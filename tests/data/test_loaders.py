"""The raw loaders read the real datasets into one schema and report malformed input precisely."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

from recsys.data.datasets import load_raw
from recsys.data.importers.microlens import load_microlens_50k
from recsys.data.importers.movielens import load_movielens_100k
from recsys.data.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA
from recsys.errors import DataFormatError, MissingInputError


def _summary(frame: pl.LazyFrame) -> tuple[int, int, int]:
    row = frame.select(pl.len(), pl.col("user_id").n_unique(), pl.col("item_id").n_unique()).collect().row(0)
    return tuple(row)  # type: ignore[return-value]


def test_movielens_100k_loads_every_rating(shared_data: Path) -> None:
    raw = load_movielens_100k(shared_data / "movielens/ml-100k")
    assert raw.interactions.collect_schema() == INTERACTIONS_SCHEMA
    assert raw.items.collect_schema() == ITEMS_SCHEMA
    assert _summary(raw.interactions) == (100_000, 943, 1_682)
    items = raw.items.collect()
    assert items.height == 1_682
    toy_story = items.filter(pl.col("item_id") == "1").row(0, named=True)
    assert toy_story["title"] == "Toy Story (1995)"
    assert toy_story["genres"] == ["Animation", "Children's", "Comedy"]
    # latin-1 titles are decoded, not mangled
    assert items.filter(pl.col("title").str.contains("é")).height > 0


def test_microlens_50k_loads_sequences_in_order(shared_data: Path) -> None:
    raw = load_microlens_50k(shared_data / "microlens/MicroLens-50k")
    assert _summary(raw.interactions) == (359_708, 50_000, 19_220)
    first_user = raw.interactions.filter(pl.col("user_id") == "1").sort("timestamp").collect()
    assert first_user.get_column("item_id").to_list() == ["1958", "6346", "15223", "17700", "1707"]
    assert first_user.get_column("timestamp").to_list() == [0, 1, 2, 3, 4]
    items = raw.items.collect()
    assert items.height == 19_220
    with_video = items.filter(pl.col("video_path").is_not_null())
    assert sorted(with_video.get_column("item_id").to_list()) == ["1002", "10034", "10040"]
    assert all(Path(p).exists() for p in with_video.get_column("video_path"))


@pytest.fixture
def ml100k_copy(shared_data: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "movielens-100k"
    folder.mkdir()
    for name in ("u.data", "u.item"):
        shutil.copy(shared_data / "movielens/ml-100k" / name, folder / name)
    return folder


def _corrupt_line(path: Path, line_no: int, new: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[line_no - 1] = new
    path.write_bytes(b"\n".join(lines))


def test_wrong_separator_is_reported_with_file_and_line(ml100k_copy: Path) -> None:
    _corrupt_line(ml100k_copy / "u.data", 7, b"244,51,2,880606923")
    with pytest.raises(DataFormatError, match=r"u\.data:7: expected 4 fields separated by '\\t', found 1"):
        load_movielens_100k(ml100k_copy)


def test_non_numeric_field_is_reported(ml100k_copy: Path) -> None:
    _corrupt_line(ml100k_copy / "u.data", 3, b"22\tabc\t1\t878887116")
    with pytest.raises(DataFormatError, match=r"u\.data:3: expected whole numbers"):
        load_movielens_100k(ml100k_copy)


def test_bad_lines_can_be_skipped_and_are_counted(ml100k_copy: Path) -> None:
    _corrupt_line(ml100k_copy / "u.data", 3, b"22\tabc\t1\t878887116")
    _corrupt_line(ml100k_copy / "u.data", 9, b"garbage")
    raw = load_movielens_100k(ml100k_copy, on_bad_lines="skip")
    assert raw.interactions.select(pl.len()).collect().item() == 99_998
    assert raw.rejected == {"malformed line in u.data": 2}


def test_non_utf8_bytes_name_the_line(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "microlens-50k"
    shutil.copytree(shared_data / "microlens/MicroLens-50k", folder, ignore=shutil.ignore_patterns("videos"))
    _corrupt_line(folder / "MicroLens-50k_titles.csv", 5, b'4,"caf\xe9 latin-1 title"\r')
    with pytest.raises(DataFormatError, match=r"MicroLens-50k_titles\.csv:5: byte 0xe9 is not valid UTF-8"):
        load_microlens_50k(folder)


def test_missing_dataset_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="recsys data fetch movielens-1m"):
        load_raw("movielens-1m", tmp_path)
