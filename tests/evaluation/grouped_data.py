"""A tiny prepared dataset with known structure, in MovieLens-100k format, for evaluation tests.

4 groups of 10 videos; every user watches 8 videos of one group, in order. Group 0 has twice as
many users as the others, so popularity recommends group 0 to everyone while co-occurrence finds
each user's own group. Video 41 (group 0) is new: it is only ever the last (test) event of the
first few group-0 users, so it is the cold-start slice. Video 42 is in the catalogue but never watched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recsys.config import PrepareConfig
from recsys.data.paths import PreparedPaths
from recsys.data.prepare import prepare
from tests.movielens_files import write_ml100k

DATASET = "movielens-100k"
GROUPS = 4
ITEMS_PER_GROUP = 10
USERS = 60
COLD_ITEM = "41"
UNWATCHED_ITEM = "42"
COLD_USERS = 5
"""The first COLD_USERS users of group 0 end with the cold video."""


def group_of_user(user: int) -> int:
    """Users 1..60: pattern 0, 0, 1, 2, 3 so that group 0 is twice as large."""
    return (0, 0, 1, 2, 3)[user % 5]


def group_of_item(item: int) -> int:
    """Videos 1..40 by tens; the cold video 41 belongs to group 0, the unwatched 42 to group 1."""
    return {41: 0, 42: 1}.get(item, (item - 1) // ITEMS_PER_GROUP)


def cold_users() -> list[int]:
    return [u for u in range(1, USERS + 1) if group_of_user(u) == 0][:COLD_USERS]


def write_raw(raw_dir: Path, seed: int = 0) -> Path:
    """u.data and u.item under raw_dir/movielens-100k."""
    rng = np.random.default_rng(seed)
    events = []
    for user in range(1, USERS + 1):
        group = group_of_user(user)
        items = [int(i) for i in group * ITEMS_PER_GROUP + rng.permutation(ITEMS_PER_GROUP)[:8] + 1]
        if user in cold_users():
            items.append(int(COLD_ITEM))
        events += [(user, item, 4, 880000000 + user * 100 + step) for step, item in enumerate(items)]
    titles = {item: f"Video {item} of group {group_of_item(item)} (1995)"
              for item in range(1, GROUPS * ITEMS_PER_GROUP + 3)}
    return write_ml100k(raw_dir / DATASET, events, titles)


def build_prepared(root: Path) -> PreparedPaths:
    """Raw files and the prepared dataset under `root` (raw/, processed/); the prepared paths."""
    raw_dir, processed_dir = root / "raw", root / "processed"
    write_raw(raw_dir)
    prepare(
        PrepareConfig(
            dataset=DATASET, raw_dir=raw_dir, processed_dir=processed_dir,
            min_user_interactions=1, min_item_interactions=1,
        )
    )
    return PreparedPaths.of(processed_dir, DATASET)
