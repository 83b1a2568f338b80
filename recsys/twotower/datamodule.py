"""Batches for two-tower training, read from the files `recsys data prepare` wrote.

Training examples are the train interactions: (user, the user's items before this one, this
item). The interaction log is sorted once by user and time with polars, and each user's rows
are cut into *windows* of consecutive targets: a window is one row of a batch, whose history
input holds the user's items from a little before its first target up to its last one. The
causal user tower reads that input once and yields the user state after every prefix, so each
target is scored from exactly the items the user watched before it (at least
`max_history - targets per window + 1` of them when the user has that many, at most `max_history`).
That is how sequential recommenders train (GRU4Rec, SASRec): one pass over a sequence trains
all its steps, where one history per target would repeat the same encoder work up to
`max_history` times. Validation rows are the valid targets, with the user's train history; the
user's train items are excluded from the full ranking. The validation users are split in two
disjoint halves by a seeded permutation: one picks the checkpoint, stops training and scores the
champion (`val_dataloader`), the other fits the score's coefficients (`fit_dataloader`), so the
coefficients are never chosen on the users that then judge the model. On large datasets each half
is a fixed seeded sample of at most `validation_users` users, the same every epoch: ranking every
user's whole catalogue each epoch would cost more than the training pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader

from recsys.data.histories import in_watch_order, train_counts
from recsys.data.paths import PreparedPaths
from recsys.errors import DataFormatError
from recsys.twotower.batch import RetrievalBatch
from recsys.twotower.sparse import collate

MIN_BATCHES_PER_EPOCH = 20
"""Fewer windows per batch (down to MIN_WINDOWS_PER_BATCH) on small datasets, so an epoch has this many steps."""
MIN_WINDOWS_PER_BATCH = 8
"""Fewest windows in a training batch: a target's negatives are the targets of the other windows."""


def gather_ranges(data: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate `data[starts[i]:stops[i]]` for every i without a Python loop; (values, lengths)."""
    lengths = (stops - starts).astype(np.int64)
    offsets = np.cumsum(lengths) - lengths  # where each slice begins in the output
    positions = np.arange(lengths.sum()) - np.repeat(offsets, lengths) + np.repeat(starts, lengths)
    return data[positions], lengths


@dataclass
class InteractionLog:
    """Interactions sorted by (user, time) as flat arrays, with each row's position in its user's sequence."""

    users: np.ndarray
    """(E,) user_idx"""
    items: np.ndarray
    """(E,) item_idx"""
    position: np.ndarray
    """(E,) how many earlier rows the same user has"""

    @classmethod
    def read(cls, path: str) -> InteractionLog:
        frame = (
            in_watch_order([pl.scan_parquet(path)])
            .select(
                pl.col("user_idx"),
                pl.col("item_idx"),
                pl.int_range(pl.len(), dtype=pl.Int64).over("user_idx").alias("position"),
            )
            .collect()
        )
        return cls(*(frame.get_column(c).to_numpy().astype(np.int64) for c in ("user_idx", "item_idx", "position")))

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class TrainWindows:
    """Each user's train rows cut into windows of consecutive targets (log row ranges, one per window).

    Window w trains targets `[first_target, end)` from the history input `[input_start, end - 1)`;
    the target at row r follows `r - input_start` of those input items.
    """

    users: np.ndarray
    """(W,) user_idx"""
    input_start: np.ndarray
    """(W,) first log row of the history input"""
    first_target: np.ndarray
    """(W,) first log row trained as a target"""
    end: np.ndarray
    """(W,) one past the last target row"""

    @staticmethod
    def targets_per_window(max_history: int) -> int:
        """Half the history length (at least 1): the other half is context the window's first target reads."""
        return max(1, max_history // 2)

    @classmethod
    def cut(cls, log: InteractionLog, max_history: int) -> TrainWindows:
        """Windows of `targets_per_window` targets, each reading up to `max_history` earlier items."""
        per_window = cls.targets_per_window(max_history)
        context = max_history - per_window + 1  # items before the first target that the input keeps
        starts = np.flatnonzero(log.position == 0)  # first row of each user
        ends = np.append(starts[1:], len(log))
        counts = -(-(ends - starts) // per_window)  # windows per user
        user_first = np.repeat(starts, counts)
        window_of_user = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # 0, 1, ... per user
        first_target = user_first + per_window * window_of_user
        end = np.minimum(first_target + per_window, np.repeat(ends, counts))
        input_start = np.maximum(user_first, first_target - context)
        return cls(log.users[first_target], input_start, first_target, end)

    def __len__(self) -> int:
        return len(self.users)


class RetrievalDataModule(L.LightningDataModule):
    """Train and validation batches of one prepared dataset (seeded shuffling)."""

    def __init__(self, paths: PreparedPaths, max_history: int = 50, batch_size: int = 1024,
                 eval_batch_size: int = 1024, seed: int = 0, validation_users: int = 0) -> None:
        super().__init__()
        self.paths = paths.require()
        self.max_history = max_history
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.validation_users = validation_users
        self.train_log: InteractionLog | None = None
        self.windows: TrainWindows | None = None
        self.shuffle: torch.Generator | None = None
        """The generator of the training loader's shuffling (each epoch draws its order from it)"""
        self.shuffle_state: torch.Tensor | None = None
        """Its state restored from a checkpoint, for the next `train_dataloader`"""

    # ------------------------------------------------------------------ data read once
    def setup(self, stage: str | None = None) -> None:
        if self.train_log is not None:
            return
        self.train_log = InteractionLog.read(str(self.paths.train))
        if len(self.train_log) == 0:
            raise DataFormatError(f"{self.paths.train} holds no training interactions")
        self.windows = TrainWindows.cut(self.train_log, self.max_history)
        self.item_counts = train_counts(self.paths)
        self.n_items = len(self.item_counts)
        self.n_users = pl.scan_parquet(self.paths.user_map).select(pl.len()).collect().item()
        # Each user's train rows are contiguous in the sorted log: [first, end).
        self.user_start = np.full(self.n_users, 0, np.int64)
        self.user_end = np.full(self.n_users, 0, np.int64)
        firsts = np.flatnonzero(self.train_log.position == 0)
        ends = np.append(firsts[1:], len(self.train_log))
        self.user_start[self.train_log.users[firsts]] = firsts
        self.user_end[self.train_log.users[firsts]] = ends
        valid = pl.read_parquet(self.paths.valid).sort("user_idx")
        # Every validation interaction, before any sampling: the model's fresh views (recsys.twotower.fresh_views).
        self.fresh_users = valid.get_column("user_idx").to_numpy().astype(np.int64)
        self.fresh_items = valid.get_column("item_idx").to_numpy().astype(np.int64)
        self.fresh_times = valid.get_column("timestamp").to_numpy().astype(np.int64)
        order = np.random.default_rng(self.seed).permutation(len(valid))
        halves = order[: len(order) // 2], order[len(order) // 2:]  # checkpoint users, coefficient-fit users
        if self.validation_users:
            halves = tuple(half[: self.validation_users] for half in halves)
        users, items, times = self.fresh_users, self.fresh_items, self.fresh_times
        checkpoint, fit = (np.sort(half) for half in halves)  # rows of `valid`, in user order
        self.valid_users, self.valid_items, self.valid_times = users[checkpoint], items[checkpoint], times[checkpoint]
        self.fit_users, self.fit_items, self.fit_times = users[fit], items[fit], times[fit]

    @property
    def windows_per_batch(self) -> int:
        """Training windows per batch: about `batch_size` targets, fewer on small datasets.

        Training length is set in epochs; on a few thousand interactions a batch of `batch_size`
        targets would give a handful of optimizer steps per epoch, and training would stop before
        the model learns. Below MIN_BATCHES_PER_EPOCH batches the batches shrink instead.
        """
        assert self.windows is not None
        wanted = max(1, self.batch_size // TrainWindows.targets_per_window(self.max_history))
        return max(MIN_WINDOWS_PER_BATCH, min(wanted, len(self.windows) // MIN_BATCHES_PER_EPOCH))

    @property
    def known_items(self) -> np.ndarray:
        """(N,) bool: items with at least one training interaction."""
        return self.item_counts > 0

    def item_probabilities(self) -> np.ndarray:
        """(N,) share of training interactions per item: the sampling probability of in-batch negatives."""
        return self.item_counts / self.item_counts.sum()

    # ------------------------------------------------------------------ collate
    def train_batch(self, windows: np.ndarray) -> RetrievalBatch:
        """Training batch of `windows` (indices into `self.windows`): one row per window."""
        assert self.train_log is not None and self.windows is not None
        w = self.windows
        input_start, first_target, end = w.input_start[windows], w.first_target[windows], w.end[windows]
        values, lengths = gather_ranges(self.train_log.items, input_start, end - 1)
        target_rows, target_counts = gather_ranges(np.arange(len(self.train_log)), first_target, end)
        row = np.repeat(np.arange(len(windows)), target_counts)
        steps = target_rows - np.repeat(input_start, target_counts)
        targets = self.train_log.items[target_rows]
        features = collate(w.users[windows], targets, values, lengths, items_per_row=target_counts)
        empty = torch.empty(0, dtype=torch.long)
        return RetrievalBatch(features, torch.from_numpy(targets), torch.from_numpy(row), torch.from_numpy(steps),
                              empty, empty)

    def eval_batch(self, users: np.ndarray, targets: np.ndarray, times: np.ndarray | None = None) -> RetrievalBatch:
        """Ranking batch: history = the users' last train items, every train item but the target excluded;
        `times`: when each target happened (its ranking reads only the fresh views before then)."""
        assert self.train_log is not None
        starts, ends = self.user_start[users], self.user_end[users]
        values, lengths = gather_ranges(self.train_log.items, np.maximum(starts, ends - self.max_history), ends)
        seen, seen_lengths = gather_ranges(self.train_log.items, starts, ends)
        rows = np.repeat(np.arange(len(users)), seen_lengths)
        keep = seen != np.repeat(targets, seen_lengths)  # a re-watched target stays rankable
        features = collate(users, targets, values, lengths)
        return RetrievalBatch(features, torch.from_numpy(targets), torch.arange(len(users)), torch.from_numpy(lengths),
                              torch.from_numpy(rows[keep]), torch.from_numpy(seen[keep]),
                              None if times is None else torch.from_numpy(times))

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        """Seeded shuffling; after `load_state_dict` it goes on from where the checkpointed training was."""
        assert self.windows is not None
        self.shuffle = torch.Generator()
        if self.shuffle_state is not None:
            self.shuffle.set_state(self.shuffle_state)
        else:
            self.shuffle.manual_seed(self.seed)
        return DataLoader(
            np.arange(len(self.windows)), batch_size=self.windows_per_batch, shuffle=True, generator=self.shuffle,
            collate_fn=lambda windows: self.train_batch(np.asarray(windows, dtype=np.int64)),
        )

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shuffling generator's state (saved in Lightning checkpoints): which order the next epoch takes."""
        return {} if self.shuffle is None else {"shuffle": self.shuffle.get_state()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.shuffle_state = state_dict.get("shuffle")

    def val_dataloader(self) -> DataLoader:
        order = np.arange(len(self.valid_users))
        return DataLoader(
            order, batch_size=self.eval_batch_size, shuffle=False,
            collate_fn=lambda rows: self.eval_batch(self.valid_users[rows], self.valid_items[rows],
                                                    self.valid_times[rows]),
        )

    def fit_dataloader(self) -> DataLoader:
        """The other half of the validation users (disjoint from `val_dataloader`'s): they fit the coefficients."""
        return DataLoader(
            np.arange(len(self.fit_users)), batch_size=self.eval_batch_size, shuffle=False,
            collate_fn=lambda rows: self.eval_batch(self.fit_users[rows], self.fit_items[rows], self.fit_times[rows]),
        )

    def fresh_view_dataloader(self) -> DataLoader:
        """Every validation interaction (no sample) as a ranking batch: the model's fresh views."""
        return DataLoader(
            np.arange(len(self.fresh_users)), batch_size=self.eval_batch_size, shuffle=False,
            collate_fn=lambda rows: self.eval_batch(self.fresh_users[rows], self.fresh_items[rows]),
        )
