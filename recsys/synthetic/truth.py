"""The latent truth behind the synthetic corpus, and the oracle ranker built from it.

The generator (`recsys.synthetic.generator`) draws every watch event from the distribution defined
here, so the oracle's scores are the exact log-weights with which events were drawn: no model
can rank better in expectation, which makes the oracle the ceiling for every quality metric.

A user's choice weight for an item at time t is

    w(u, i, t) = (taste_u(t)[topic_i] + epsilon) ** beta * popularity_i * (cold_boost if i is cold)

where the taste drifts linearly from `taste_start` to a mix with `taste_end` over the user's
active window: taste_u(t) = (1 - drift_u * s) * taste_start_u + drift_u * s * taste_end_u,
s = (t - t_start_u) / (t_end_u - t_start_u) clipped to [0, 1]. Cold items are never drawn
before a user's last two events (the validation and test events of a leave-one-out split),
and get `cold_boost` there: the oracle scores those two events.

Files under `<synth folder>/truth/`:

- `items.parquet`: item_id, topic, group, popularity, cold, has_audio, title_kind and the
  rendering facts (hue, shape, direction_deg, speed_px_s, band_hz, rhythm_hz, and whether
  colour / shape / motion / audio show the true topic)
- `users.parquet`: user_id, t_start, t_end, drift, taste_start (list of K floats), taste_end
- `truth.json`: beta, epsilon, cold_boost, the topic table (words, look, motion, sound) and
  the cold item IDs
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.paths import PreparedPaths
from recsys.errors import DataFormatError, MissingInputError
from recsys.files import read_json

TRUTH_DIR = "truth"
TRUTH_ITEMS = "items.parquet"
"""The item truth file (item_id, topic, ...) under `TRUTH_DIR`."""


def corpus_folder(paths: PreparedPaths) -> Path | None:
    """The synthetic corpus a prepared dataset was made from (`<raw_dir>/<dataset>`, raw_dir as `prepare`
    recorded it), when its truth is there; None for the other datasets (or when the raw files moved)."""
    raw_dir = read_json(paths.meta).get("config", {}).get("raw_dir")
    folder = Path(raw_dir) / paths.root.name if raw_dir else None
    return folder if folder is not None and (folder / TRUTH_DIR).is_dir() else None


def truth_items(paths: PreparedPaths) -> Path | None:
    """The item truth of a prepared dataset's synthetic corpus (see `corpus_folder`), when it exists."""
    folder = corpus_folder(paths)
    path = folder / TRUTH_DIR / TRUTH_ITEMS if folder is not None else None
    return path if path is not None and path.exists() else None


@dataclass
class SynthTruth:
    """Item topics and popularity, user tastes over time: everything the oracle needs."""

    item_ids: np.ndarray
    """(N,) str: item IDs in the corpus' order"""
    item_topic: np.ndarray
    """(N,) int: each item's latent topic"""
    popularity: np.ndarray
    """(N,) float: latent popularity (the multiplicative popularity bias)"""
    cold: np.ndarray
    """(N,) bool: kept out of training, watched only as users' last two events"""
    user_ids: np.ndarray
    """(U,) str"""
    taste_start: np.ndarray
    """(U, K) float: topic tastes at the start of each user's window (rows sum to 1)"""
    taste_end: np.ndarray
    """(U, K) float: the tastes each user drifts towards"""
    drift: np.ndarray
    """(U,) float in [0, 1]: how far each user drifts by the end of the window"""
    t_start: np.ndarray
    """(U,) int64: timestamp of each user's first event"""
    t_end: np.ndarray
    """(U,) int64: timestamp of each user's last event"""
    beta: float
    """Sharpness of taste in the choice weight"""
    epsilon: float
    """Floor added to every topic's taste, so no topic is ever impossible"""
    cold_boost: float
    """Extra weight of cold (newly released) items at users' last two events"""

    @property
    def n_topics(self) -> int:
        return self.taste_start.shape[1]

    def user_index(self, user_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Rows of `user_ids` in the truth tables; raises for unknown users."""
        lookup = {user: row for row, user in enumerate(self.user_ids.tolist())}
        missing = [u for u in user_ids if u not in lookup]
        if missing:
            raise DataFormatError(f"unknown synthetic user(s): {', '.join(map(str, missing[:5]))}")
        return np.array([lookup[u] for u in user_ids], dtype=np.int64)

    def item_index(self, item_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Rows of `item_ids` in the truth tables; raises for unknown items."""
        lookup = {item: row for row, item in enumerate(self.item_ids.tolist())}
        missing = [i for i in item_ids if i not in lookup]
        if missing:
            raise DataFormatError(f"unknown synthetic item(s): {', '.join(map(str, missing[:5]))}")
        return np.array([lookup[i] for i in item_ids], dtype=np.int64)

    def taste(self, users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
        """Topic tastes of user rows `users` at `timestamps` (same length): (B, K)."""
        users = np.asarray(users, dtype=np.int64)
        span = np.maximum(self.t_end[users] - self.t_start[users], 1).astype(np.float64)
        progress = np.clip((np.asarray(timestamps, dtype=np.int64) - self.t_start[users]) / span, 0.0, 1.0)
        move = (self.drift[users] * progress)[:, None]  # (B, 1)
        return (1.0 - move) * self.taste_start[users] + move * self.taste_end[users]  # (B, K)

    def log_weights(self, users: np.ndarray, timestamps: np.ndarray, items: np.ndarray | None = None,
                    tail: bool = True) -> np.ndarray:
        """Log choice weights of item rows `items` (default all) for user rows at timestamps: (B, I).

        `tail=True` gives the weights of a user's last two events (cold items boosted); with
        `tail=False` cold items get -inf, as for every earlier event.
        """
        items = np.arange(len(self.item_ids)) if items is None else np.asarray(items, dtype=np.int64)
        taste = self.taste(users, timestamps)  # (B, K)
        per_topic = self.beta * np.log(taste + self.epsilon)  # (B, K)
        scores = per_topic[:, self.item_topic[items]] + np.log(self.popularity[items])[None, :]  # (B, I)
        cold = self.cold[items]
        if tail:
            scores[:, cold] += np.log(self.cold_boost)
        else:
            scores[:, cold] = -np.inf
        return scores

    # ----------------------------------------------------------------------------------------
    # Files

    def save(self, folder: Path, topics: list[dict], item_facts: pl.DataFrame) -> Path:
        """Write the truth under `folder/truth/`; `item_facts` adds per-item rendering columns."""
        out = Path(folder) / TRUTH_DIR
        out.mkdir(parents=True, exist_ok=True)
        items = pl.DataFrame(
            {
                "item_id": self.item_ids.tolist(),
                "topic": self.item_topic.astype(np.int32),
                "popularity": self.popularity.astype(np.float64),
                "cold": self.cold,
            }
        ).join(item_facts, on="item_id", how="left", maintain_order="left")
        items.write_parquet(out / TRUTH_ITEMS)
        pl.DataFrame(
            {
                "user_id": self.user_ids.tolist(),
                "t_start": self.t_start.astype(np.int64),
                "t_end": self.t_end.astype(np.int64),
                "drift": self.drift.astype(np.float64),
                "taste_start": self.taste_start.astype(np.float64).tolist(),
                "taste_end": self.taste_end.astype(np.float64).tolist(),
            }
        ).write_parquet(out / "users.parquet")
        document = {
            "n_topics": self.n_topics,
            "beta": self.beta,
            "epsilon": self.epsilon,
            "cold_boost": self.cold_boost,
            "weight": "(taste_u(t)[topic_i] + epsilon) ** beta * popularity_i * (cold_boost if cold, at the last "
                      "two events; cold items are never drawn earlier)",
            "topics": topics,
            "cold_items": self.item_ids[self.cold].tolist(),
        }
        (out / "truth.json").write_text(json.dumps(document, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, folder: Path) -> SynthTruth:
        """Read the truth from a synth corpus folder or its `truth/` subfolder."""
        folder = Path(folder)
        if (folder / TRUTH_DIR).is_dir():
            folder = folder / TRUTH_DIR
        needed = [folder / TRUTH_ITEMS, folder / "users.parquet", folder / "truth.json"]
        missing = [p for p in needed if not p.exists()]
        if missing:
            raise MissingInputError(
                f"{folder}: no synthetic truth ({missing[0].name} missing); run `recsys data synth` first"
            )
        items = pl.read_parquet(needed[0], columns=["item_id", "topic", "popularity", "cold"])
        users = pl.read_parquet(needed[1])
        document = json.loads(needed[2].read_text())
        return cls(
            item_ids=items.get_column("item_id").to_numpy().astype(str),
            item_topic=items.get_column("topic").to_numpy().astype(np.int64),
            popularity=items.get_column("popularity").to_numpy(),
            cold=items.get_column("cold").to_numpy().astype(bool),
            user_ids=users.get_column("user_id").to_numpy().astype(str),
            taste_start=np.array(users.get_column("taste_start").to_list(), dtype=np.float64),
            taste_end=np.array(users.get_column("taste_end").to_list(), dtype=np.float64),
            drift=users.get_column("drift").to_numpy(),
            t_start=users.get_column("t_start").to_numpy(),
            t_end=users.get_column("t_end").to_numpy(),
            beta=float(document["beta"]),
            epsilon=float(document["epsilon"]),
            cold_boost=float(document["cold_boost"]),
        )


def oracle_scores(
    truth_folder: Path,
    user_ids: Sequence[str],
    at_timestamps: Sequence[int] | np.ndarray,
    item_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """The oracle's scores (B, I): higher means more likely to be watched by that user at that time.

    `truth_folder` is the synth corpus folder (e.g. `data/raw/synth`) or its `truth/` subfolder;
    `user_ids` and `at_timestamps` have one entry per query (use each user's validation or test
    event time); columns follow `item_ids` (e.g. a prepared dataset's `item_map` order), all
    items of the corpus in their original order when unset. The scores are the log-weights the
    generator used for users' last two events, so ranking by them is the best possible ranking;
    exclude already-watched items as for any model.
    """
    truth = SynthTruth.load(truth_folder)
    users = truth.user_index(list(user_ids))
    items = None if item_ids is None else truth.item_index(list(item_ids))
    timestamps = np.asarray(at_timestamps, dtype=np.int64)
    if timestamps.shape != users.shape:
        raise DataFormatError(f"oracle_scores: {len(users)} user IDs but {timestamps.size} timestamps")
    return truth.log_weights(users, timestamps, items, tail=True)
