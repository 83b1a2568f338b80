"""`prepare` filters, indexes and splits interactions with every row accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import polars as pl
import pytest

from recsys.config import FetchConfig, PrepareConfig
from recsys.data.fetch import fetch
from recsys.data.paths import PreparedPaths
from recsys.data.prepare import prepare
from tests.movielens_files import write_ml100k


@pytest.fixture(scope="module")
def ml100k(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedPaths:
    root = tmp_path_factory.mktemp("ml100k")
    fetch(FetchConfig("movielens-100k", source=shared_data / "movielens/ml-100k", dest=root / "raw"))
    prepare(PrepareConfig("movielens-100k", raw_dir=root / "raw", processed_dir=root / "processed"))
    return PreparedPaths.of(root / "processed", "movielens-100k")


def _splits(paths: PreparedPaths) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(getattr(paths, name)) for name in ("train", "valid", "test")}


def test_counts_add_up(ml100k: PreparedPaths) -> None:
    meta = json.loads(ml100k.meta.read_text())
    counts = meta["counts"]
    assert counts["rows_read"] == 100_000
    assert counts["rows_read"] == counts["interactions"] + sum(meta["rejected"].values())
    assert counts["train"] + counts["valid"] + counts["test"] == counts["interactions"]
    splits = _splits(ml100k)
    assert {name: frame.height for name, frame in splits.items()} == {
        name: counts[name] for name in splits
    }
    assert counts["valid"] == counts["test"] == counts["users"] == 943


def test_k_core_holds_after_filtering(ml100k: PreparedPaths) -> None:
    everything = pl.concat(_splits(ml100k).values())
    assert everything.group_by("user_idx").len().get_column("len").min() >= 5
    assert everything.group_by("item_idx").len().get_column("len").min() >= 5


def test_leave_one_out_split_is_time_ordered_and_disjoint(ml100k: PreparedPaths) -> None:
    splits = _splits(ml100k)
    last_train = splits["train"].group_by("user_idx").agg(pl.col("timestamp").max().alias("last_train"))
    for name in ("valid", "test"):
        joined = splits[name].join(last_train, on="user_idx")
        assert joined.height == splits[name].height
        assert (joined.get_column("timestamp") >= joined.get_column("last_train")).all()
    test_after_valid = splits["test"].join(splits["valid"], on="user_idx", suffix="_valid")
    assert (test_after_valid.get_column("timestamp") >= test_after_valid.get_column("timestamp_valid")).all()
    keys = [frame.select("user_idx", "item_idx") for frame in splits.values()]
    assert pl.concat(keys).is_duplicated().sum() == 0


def test_id_maps_round_trip(ml100k: PreparedPaths, shared_data: Path) -> None:
    users = pl.read_parquet(ml100k.user_map)
    items = pl.read_parquet(ml100k.item_map)
    assert users.get_column("user_idx").to_list() == list(range(users.height))
    assert items.get_column("item_idx").to_list() == list(range(items.height))
    test = pl.read_parquet(ml100k.test).join(users, on="user_idx").join(items, on="item_idx")
    raw = pl.read_csv(
        shared_data / "movielens/ml-100k/u.data", separator="\t", has_header=False,
        schema={"user_id": pl.String, "item_id": pl.String, "rating": pl.Int64, "timestamp": pl.Int64},
    )
    # every test event, mapped back to external IDs, is a real event of the raw log at the same time
    assert test.join(raw, on=["user_id", "item_id", "timestamp"]).height == test.height
    back = test.join(users, on="user_id", suffix="_again").join(items, on="item_id", suffix="_again")
    assert (back.get_column("user_idx") == back.get_column("user_idx_again")).all()
    assert (back.get_column("item_idx") == back.get_column("item_idx_again")).all()


def test_popularity_follows_train(ml100k: PreparedPaths) -> None:
    train = pl.read_parquet(ml100k.train)
    popularity = pl.read_parquet(ml100k.popularity)
    assert popularity.get_column("count").sum() == train.height


def test_prepare_logs_an_mlflow_run(ml100k: PreparedPaths) -> None:
    runs = mlflow.search_runs(experiment_names=["movielens-100k"], filter_string="tags.`recsys.step` = 'prepare'")
    assert len(runs) >= 1
    assert runs.iloc[0]["metrics.count.users"] == 943
    assert runs.iloc[0]["tags.recsys.input.raw_files"] == json.loads(ml100k.meta.read_text())["input_fingerprint"]


def _write_raw_ml100k(folder: Path, events: list[tuple[int, int, int, int]], items: list[int]) -> None:
    write_ml100k(folder, events, {i: f"Film {i} (1999)" for i in items}, release_date="01-Jan-1999")


def test_rejections_are_counted_by_reason(tmp_path: Path) -> None:
    events = [(u, i, 4, 100 * u + i) for u in range(1, 6) for i in range(1, 6)]
    events += [(1, 1, 5, 999), (2, 42, 3, 5), (3, 2, 1, 7)]  # repeat pair, unknown item, low rating (dup too)
    _write_raw_ml100k(tmp_path / "raw/movielens-100k", events, items=list(range(1, 8)))
    meta = prepare(PrepareConfig(
        "movielens-100k", raw_dir=tmp_path / "raw", processed_dir=tmp_path / "out", min_weight=3,
        min_user_interactions=3, min_item_interactions=3,
    ))
    rejected = meta["rejected"]
    assert rejected["names a video missing from the items table"] == 1
    assert rejected["weight below min_weight=3"] == 1
    assert rejected["repeats an earlier (user, video) pair"] == 1
    assert meta["counts"]["interactions"] == 25
    assert meta["counts"]["rows_read"] == 28
    # items 6 and 7 were never watched: kept in the catalogue for cold-start recommendation
    assert meta["counts"]["items"] == 7


def test_temporal_split_cuts_globally(tmp_path: Path) -> None:
    events = [(u, i, 4, 10 * i + u) for u in range(1, 11) for i in range(1, 11)]
    _write_raw_ml100k(tmp_path / "raw/movielens-100k", events, items=list(range(1, 11)))
    prepare(PrepareConfig(
        "movielens-100k", raw_dir=tmp_path / "raw", processed_dir=tmp_path / "out", split="temporal",
        valid_fraction=0.2, test_fraction=0.1,
    ))
    splits = _splits(PreparedPaths.of(tmp_path / "out", "movielens-100k"))
    assert [splits[n].height for n in ("train", "valid", "test")] == [70, 20, 10]
    assert splits["train"].get_column("timestamp").max() < splits["valid"].get_column("timestamp").min()
    assert splits["valid"].get_column("timestamp").max() < splits["test"].get_column("timestamp").min()


def test_same_command_twice_gives_the_same_files(tmp_path: Path, shared_data: Path) -> None:
    fetch(FetchConfig("movielens-100k", source=shared_data / "movielens/ml-100k", dest=tmp_path / "raw"))
    outputs = []
    for run in ("a", "b"):
        prepare(PrepareConfig("movielens-100k", raw_dir=tmp_path / "raw", processed_dir=tmp_path / run))
        folder = PreparedPaths.of(tmp_path / run, "movielens-100k").root
        outputs.append({p.name: p.read_bytes() for p in folder.glob("*.parquet")})
    assert outputs[0] == outputs[1]
