"""The fast paths of import and prepare against straightforward reference computations.

`prepare` codes string IDs by a sort of hashes, counts k-core rounds incrementally and splits by
each user's last rows; `parse_time` reads a sampled ISO layout first. Each test here computes the
same thing the slow, obvious way (Python loops over a small log) and asserts equal results, so a
speedup that changes behaviour fails here.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.config import ImportConfig, PrepareConfig
from recsys.data.importers.files import import_dataset, parse_time
from recsys.data.paths import PreparedPaths
from recsys.data.prepare import _factorize, k_core, prepare

# --------------------------------------------------------------------------------------------
# Coding IDs


def _check_codes(values: pl.Series, codes: np.ndarray, distinct: pl.Series) -> None:
    """Codes index distinct values that give back every value, each distinct value once."""
    assert codes.shape == (values.len(),)
    assert distinct.gather(codes).eq_missing(values).all()
    assert distinct.n_unique() == distinct.len() == values.n_unique()


def _ids(n: int, seed: int) -> pl.Series:
    rng = np.random.default_rng(seed)
    ids = [None if x == 0 else f"u{x}" if x % 3 else str(x) for x in rng.integers(0, 60, n)]
    return pl.Series("id", ids, pl.String)


def test_factorize_gives_each_distinct_id_one_code() -> None:
    values = _ids(2_000, seed=0)
    _check_codes(values, *_factorize(values))


@pytest.mark.parametrize("collide", [
    lambda v: 0,  # every ID shares one hash
    lambda v: 0 if v is None else len(v),  # few hashes, many IDs each
    lambda v: 0 if v is None else (len(v) << 60) | 1,  # the same high bits, low bits that differ
])
def test_factorize_is_exact_when_hashes_collide(collide: object) -> None:
    values = _ids(2_000, seed=1)
    hashes = np.array([collide(v) for v in values.to_list()], dtype=np.uint64)  # type: ignore[operator]
    _check_codes(values, *_factorize(values, hashes))


def test_factorize_of_one_and_of_no_value() -> None:
    codes, distinct = _factorize(pl.Series(["a"]))
    assert codes.tolist() == [0] and distinct.to_list() == ["a"]
    codes, distinct = _factorize(pl.Series([], dtype=pl.String))
    assert codes.size == 0 and distinct.len() == 0


def _reference_k_core(users: list[int], items: list[int], min_user: int, min_item: int) -> tuple[list[int], int]:
    kept, rounds = list(range(len(users))), 0
    while True:
        rounds += 1
        user_n: dict[int, int] = {}
        item_n: dict[int, int] = {}
        for i in kept:
            user_n[users[i]] = user_n.get(users[i], 0) + 1
            item_n[items[i]] = item_n.get(items[i], 0) + 1
        keep = [i for i in kept if user_n[users[i]] >= min_user and item_n[items[i]] >= min_item]
        if len(keep) == len(kept):
            return kept, rounds
        kept = keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_core_matches_repeated_counting(seed: int) -> None:
    rng = np.random.default_rng(seed)
    users = (rng.pareto(1.0, 600) * 5).astype(np.int64) % 60
    items = (rng.pareto(1.0, 600) * 3).astype(np.int64) % 80
    kept, rounds = k_core(users, items, 6, 4)
    expected, expected_rounds = _reference_k_core(users.tolist(), items.tolist(), 6, 4)
    assert (kept.tolist(), rounds) == (expected, expected_rounds)
    assert rounds > 2  # the log is shaped so that dropping items drops users and the other way round


# --------------------------------------------------------------------------------------------
# prepare on a small shuffled log against a reference


def _natural(user: str) -> tuple[int, str]:
    return len(user), user


def _reference_prepare(views: list[dict], catalogue: list[str], min_user: int, min_item: int) -> dict:
    """prepare's outputs the obvious way: drop unknown videos, keep each (user, video) pair's first view in
    (time, line) order, k-core, index users by natural order and videos by catalogue order (those kept and
    those nobody watched), leave-one-out."""
    known, watched = set(catalogue), {v["video"] for v in views}
    ordered = sorted((v for v in views if v["video"] in known), key=lambda v: (v["time"], v["line"]))
    seen, first = set(), []
    for view in ordered:
        if (view["viewer"], view["video"]) not in seen:
            seen.add((view["viewer"], view["video"]))
            first.append(view)
    while True:
        user_n: dict[str, int] = {}
        item_n: dict[str, int] = {}
        for view in first:
            user_n[view["viewer"]] = user_n.get(view["viewer"], 0) + 1
            item_n[view["video"]] = item_n.get(view["video"], 0) + 1
        keep = [v for v in first if user_n[v["viewer"]] >= min_user and item_n[v["video"]] >= min_item]
        if len(keep) == len(first):
            break
        first = keep
    users = sorted({v["viewer"] for v in first}, key=_natural)
    videos = [item for item in catalogue if item in {v["video"] for v in first} or item not in watched]
    user_idx, item_idx = {u: i for i, u in enumerate(users)}, {v: i for i, v in enumerate(videos)}
    splits: dict[str, list[tuple[int, int, int]]] = {"train": [], "valid": [], "test": []}
    for user in users:
        history = [v for v in first if v["viewer"] == user]  # already in (time, line) order
        for at, view in enumerate(history):
            from_end = len(history) - 1 - at
            split = "train" if len(history) < 3 or from_end > 1 else ("test" if from_end == 0 else "valid")
            splits[split].append((user_idx[user], item_idx[view["video"]], view["time"]))
    return {"users": users, "videos": videos, **splits}


def test_prepare_of_a_shuffled_log_matches_the_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 3_000
    users = rng.integers(0, 120, n)
    videos = (rng.pareto(0.8, n) * 4).astype(np.int64) % 150
    times = rng.integers(1_700_000_000, 1_700_000_000 + 400, n)  # many ties: the line breaks them
    views = [{"viewer": f"u{u}" if u % 4 else str(u), "video": f"v{v}", "time": int(t)}
             for u, v, t in zip(users, videos, times, strict=True)]
    order = rng.permutation(n)  # a shuffled log: prepare sorts it
    views = [views[i] | {"line": at + 2} for at, i in enumerate(order)]
    catalogue = [f"v{v}" for v in rng.permutation(140)]  # v140..v149 are unknown
    pl.DataFrame({k: [v[k] for v in views] for k in ("viewer", "video", "time")}).write_csv(tmp_path / "views.csv")
    pl.DataFrame({"item_id": catalogue, "title": catalogue}).write_csv(tmp_path / "items.csv")
    import_dataset(ImportConfig("shuffled", interactions=tmp_path / "views.csv", items=tmp_path / "items.csv",
                                user_column="viewer", item_column="video", time_column="time",
                                raw_dir=tmp_path / "raw"))
    meta = prepare(PrepareConfig("shuffled", raw_dir=tmp_path / "raw", processed_dir=tmp_path / "out",
                                 min_user_interactions=4, min_item_interactions=3))

    expected = _reference_prepare(views, catalogue, 4, 3)
    paths = PreparedPaths.of(tmp_path / "out", "shuffled")
    assert pl.read_parquet(paths.user_map).get_column("user_id").to_list() == expected["users"]
    assert pl.read_parquet(paths.item_map).get_column("item_id").to_list() == expected["videos"]
    for split in ("train", "valid", "test"):
        rows = pl.read_parquet(getattr(paths, split)).select("user_idx", "item_idx", "timestamp").rows()
        assert rows == expected[split], split  # the same rows in the same order: by user, then time
    assert meta["counts"]["interactions"] == sum(len(expected[s]) for s in ("train", "valid", "test"))
    assert 0 < meta["rejected"]["repeats an earlier (user, video) pair"]
    assert 0 < meta["rejected"]["removed by k-core filtering (users >= 4, items >= 3)"]
    assert json.loads(paths.meta.read_text())["counts"] == meta["counts"]


# --------------------------------------------------------------------------------------------
# Times


def _seconds(text: str) -> int:
    return int(datetime(*map(int, text.split(",")), tzinfo=UTC).timestamp())  # type: ignore[misc]


def _parse(values: list[str | None], unit: str = "auto", sample: int | None = 1000) -> list[int | None]:
    frame = pl.LazyFrame({"t": values}, schema={"t": pl.String})
    head = None if sample is None else pl.Series(values[:sample], dtype=pl.String)
    return parse_time(frame, "t", unit, head).collect().get_column("_seconds").to_list()


NOON = _seconds("2024,5,1,12,30,0")
LAYOUTS = {
    "2024-05-01T12:30:00Z": NOON,
    "2024-05-01T12:30:00": NOON,
    "2024-05-01 12:30:00Z": NOON,
    "2024-05-01 12:30:00": NOON,
    "2024-05-01T14:30:00+02:00": NOON,
    "2024-05-01T14:30:00+0200": NOON,
    "2024-05-01 10:30:00-02:00": NOON,
    "2024-05-01T12:30:00.750Z": NOON,
    "2024-05-01 12:30:00.750": NOON,
    "2024-05-01T13:30:00.250+01:00": NOON,
    "2024-05-01T12:30:00z": NOON,
    "2024-05-01t12:30:00Z": None,
    "2024-05-01T12:30": NOON,
    "2024-05-01": _seconds("2024,5,1,0,0,0"),
    " 2024-05-01T12:30:00Z ": NOON,
    str(NOON): NOON,
    f"{NOON}.9": NOON,
    str(NOON * 1000 + 999): NOON,
    "not a time": None,
    "2024-5-01 12:30:00": None,
    "2024-05-01X12:30:00": None,
    "": None,
}


@pytest.mark.parametrize("first", list(LAYOUTS))
def test_every_layout_reads_the_same_whatever_layout_the_sample_shows(first: str) -> None:
    """A sample of 1000 values of one layout, then every other layout: each read as on its own."""
    values = [first] * 1000 + list(LAYOUTS)
    expected = [LAYOUTS[first]] * 1000 + list(LAYOUTS.values())
    assert _parse(values) == expected
    assert _parse(values, sample=None) == expected  # without a sample: every layout tried


def test_a_layout_that_changes_after_the_sample_and_nulls() -> None:
    values = ["2024-05-01 12:30:00"] * 1500 + ["2024-05-01T12:30:00Z", None, "1714566600000", "2024-05-01"]
    assert _parse(values) == [NOON] * 1501 + [None, NOON, _seconds("2024,5,1,0,0,0")]


def test_units_s_ms_and_iso_read_only_their_kind() -> None:
    values = [str(NOON), str(NOON * 1000), "2024-05-01T12:30:00Z"]
    assert _parse(values, "s") == [NOON, NOON * 1000, None]
    assert _parse(values, "ms") == [NOON // 1000, NOON, None]
    assert _parse(values, "iso") == [None, None, NOON]
