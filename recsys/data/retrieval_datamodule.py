"""Batches for two-tower training, read from the files `recsys data prepare` wrote.

Training examples are the train interactions: (user, the user's items before this one, this
item). The interaction log is sorted once by user and time with polars; an example is then just
its row number, and its history is the slice of the same user's rows before it, so no per-example
lists are ever materialised. Validation rows are the valid targets, with the user's train
history; the user's train items are excluded from the full ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader

from recsys.data.paths import PreparedPaths
from recsys.errors import DataFormatError
from recsys.models.sparse import SparseFeatures, collate


@dataclass
class RetrievalBatch:
    """One batch: sparse features plus what the loss and the validation ranking need."""

    features: SparseFeatures
    """KeyedJaggedTensors: user_id, item_id (the target), history"""
    targets: torch.Tensor
    """(B,) target item_idx per row"""
    exclude_rows: torch.Tensor
    """(E,) row of each (row, item) pair excluded from the ranking (validation only; empty in training)"""
    exclude_items: torch.Tensor
    """(E,) item of each excluded pair"""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RetrievalBatch:
        return RetrievalBatch(
            self.features.to(device, non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.exclude_rows.to(device, non_blocking=non_blocking),
            self.exclude_items.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return len(self.targets)


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
            pl.scan_parquet(path)
            # Stable sort: prepare writes each user's rows in time order, ties already broken by line.
            .sort(["user_idx", "timestamp"], maintain_order=True)
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

    def histories(self, rows: np.ndarray, max_history: int) -> tuple[np.ndarray, np.ndarray]:
        """The last `max_history` items each row's user watched before it; (values, lengths)."""
        starts = rows - np.minimum(self.position[rows], max_history)
        return gather_ranges(self.items, starts, rows)


class RetrievalDataModule(L.LightningDataModule):
    """Train and validation batches of one prepared dataset (seeded shuffling)."""

    def __init__(self, paths: PreparedPaths, max_history: int = 50, batch_size: int = 1024,
                 eval_batch_size: int = 1024, seed: int = 0) -> None:
        super().__init__()
        self.paths = paths.require()
        self.max_history = max_history
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.train_log: InteractionLog | None = None

    # ------------------------------------------------------------------ data read once
    def setup(self, stage: str | None = None) -> None:
        if self.train_log is not None:
            return
        self.train_log = InteractionLog.read(str(self.paths.train))
        if len(self.train_log) == 0:
            raise DataFormatError(f"{self.paths.train} holds no training interactions")
        counts = pl.read_parquet(self.paths.popularity).sort("item_idx")
        self.item_counts = counts.get_column("count").to_numpy().astype(np.int64)
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
        self.valid_users = valid.get_column("user_idx").to_numpy().astype(np.int64)
        self.valid_items = valid.get_column("item_idx").to_numpy().astype(np.int64)

    @property
    def known_items(self) -> np.ndarray:
        """(N,) bool: items with at least one training interaction."""
        return self.item_counts > 0

    def item_probabilities(self) -> np.ndarray:
        """(N,) share of training interactions per item: the sampling probability of in-batch negatives."""
        return self.item_counts / self.item_counts.sum()

    # ------------------------------------------------------------------ collate
    def train_batch(self, rows: np.ndarray) -> RetrievalBatch:
        """Training batch of log rows: history = the user's earlier items, target = the row's item."""
        assert self.train_log is not None
        values, lengths = self.train_log.histories(rows, self.max_history)
        targets = self.train_log.items[rows]
        features = collate(self.train_log.users[rows], targets, values, lengths)
        empty = torch.empty(0, dtype=torch.long)
        return RetrievalBatch(features, torch.from_numpy(targets), empty, empty)

    def eval_batch(self, users: np.ndarray, targets: np.ndarray) -> RetrievalBatch:
        """Ranking batch: history = the users' last train items, every train item but the target excluded."""
        assert self.train_log is not None
        starts, ends = self.user_start[users], self.user_end[users]
        values, lengths = gather_ranges(self.train_log.items, np.maximum(starts, ends - self.max_history), ends)
        seen, seen_lengths = gather_ranges(self.train_log.items, starts, ends)
        rows = np.repeat(np.arange(len(users)), seen_lengths)
        keep = seen != np.repeat(targets, seen_lengths)  # a re-watched target stays rankable
        features = collate(users, targets, values, lengths)
        return RetrievalBatch(features, torch.from_numpy(targets), torch.from_numpy(rows[keep]),
                              torch.from_numpy(seen[keep]))

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        assert self.train_log is not None
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            np.arange(len(self.train_log)), batch_size=self.batch_size, shuffle=True, generator=generator,
            collate_fn=lambda rows: self.train_batch(np.asarray(rows, dtype=np.int64)),
        )

    def val_dataloader(self) -> DataLoader:
        order = np.arange(len(self.valid_users))
        return DataLoader(
            order, batch_size=self.eval_batch_size, shuffle=False,
            collate_fn=lambda rows: self.eval_batch(self.valid_users[rows], self.valid_items[rows]),
        )
