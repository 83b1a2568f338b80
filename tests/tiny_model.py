"""A tiny structured dataset in MovieLens-100k format, prepared and with a trained two-tower model.

4 groups of 12 videos, 80 users who each watch videos of one group in order, so a trained model
ranks the user's own group first. `tests/conftest.py` builds it once per session
(`trained_tiny_model`) for the export, serving, evaluation, content distillation and plot tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.config import PrepareConfig, RetrievalConfig
from recsys.data.prepare import prepare
from recsys.twotower.build import RetrievalResult
from recsys.twotower.train import train_retrieval
from tests.movielens_files import write_ml100k

DATASET = "movielens-100k"
GROUPS = 4
ITEMS_PER_GROUP = 12
USERS = 80


@dataclass(frozen=True)
class TinyModel:
    """The prepared tiny dataset and its one trained model."""

    processed_dir: Path
    result: RetrievalResult


def write_raw(raw_dir: Path, seed: int = 0) -> Path:
    """u.data and u.item for the tiny dataset under raw_dir/movielens-100k."""
    rng = np.random.default_rng(seed)
    events = []
    for user in range(1, USERS + 1):
        group = user % GROUPS
        items = group * ITEMS_PER_GROUP + rng.permutation(ITEMS_PER_GROUP)[:9] + 1
        for step, item in enumerate(items):
            events.append((user, int(item), int(rng.integers(3, 6)), 880000000 + user * 100 + step))
    titles = {item: f"Video {item} of group {(item - 1) // ITEMS_PER_GROUP} (1995)"
              for item in range(1, GROUPS * ITEMS_PER_GROUP + 1)}
    return write_ml100k(raw_dir / DATASET, events, titles)


def build(root: Path, epochs: int = 4, seed: int = 0) -> tuple[Path, RetrievalResult]:
    """Raw files, prepared dataset and one trained model under `root`; (processed_dir, training result)."""
    raw_dir, processed_dir = root / "raw", root / "processed"
    if not (processed_dir / DATASET / "meta.json").exists():
        write_raw(raw_dir)
        prepare(PrepareConfig(dataset=DATASET, raw_dir=raw_dir, processed_dir=processed_dir))
    result = train_retrieval(
        RetrievalConfig(
            dataset=DATASET, processed_dir=processed_dir, dim=16, batch_size=32, learning_rate=1e-2,
            max_epochs=epochs, patience=epochs,
            seed=seed, threads=1, progress_bar=False, content="none",
        )
    )
    return processed_dir, result
