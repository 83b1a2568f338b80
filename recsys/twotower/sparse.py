"""All TorchRec construction of the two-tower model: embedding tables, feature batches, the one collate.

Three sparse features reach the model as `KeyedJaggedTensor`s built by `collate`:

- `user_id`: one ID per row (none for a user the model has never seen), pooled by an
  `EmbeddingBagCollection` table of users;
- `item_id`: the candidate / target videos of each row (one per row, except in training
  batches, where a row trains several consecutive targets of one user);
- `history`: the row's watch history, oldest first, at most `max_history` IDs.

`item_id` and `history` look up the same item table (one `EmbeddingConfig` with both feature
names), so the videos a user watched and the videos scored for them share their embeddings. The
history stays a sequence (an `EmbeddingCollection`, unpooled) because the user tower reads it in
order. `DistributedModelParallel` shards both collections without any change to this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)


class _FxTracingNote(logging.Filter):
    """Drops torch's note that `is_fx_tracing()` also covers torch.export: TorchRec's modules call it on
    every forward pass, so each process (a CLI run, every notebook) printed it once, about code we do not own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("is_fx_tracing will return true")


logging.getLogger("torch.fx._symbolic_trace").addFilter(_FxTracingNote())

USER_FEATURE = "user_id"
ITEM_FEATURE = "item_id"
HISTORY_FEATURE = "history"
USER_TABLE = "user"
ITEM_TABLE = "item"


@dataclass
class SparseFeatures:
    """One batch of sparse inputs: `users` (key user_id) and `items` (keys item_id, history)."""

    users: KeyedJaggedTensor
    items: KeyedJaggedTensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseFeatures:
        return SparseFeatures(
            self.users.to(torch.device(device), non_blocking=non_blocking),
            self.items.to(torch.device(device), non_blocking=non_blocking),
        )

    @property
    def batch_size(self) -> int:
        return self.items.stride()

    def row_users(self) -> torch.Tensor:
        """(B,) the user index of each row, -1 for a row without a known user."""
        lengths = self.users[USER_FEATURE].lengths()  # (B,) 1 for a known user, else 0
        users = torch.full((self.batch_size,), -1, dtype=torch.long, device=lengths.device)
        users[lengths > 0] = self.users[USER_FEATURE].values()
        return users


def _jagged(values: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)), torch.from_numpy(
        np.ascontiguousarray(lengths, dtype=np.int64)
    )


def collate(
    user_idx: np.ndarray | None,
    item_idx: np.ndarray | None,
    history_values: np.ndarray,
    history_lengths: np.ndarray,
    items_per_row: np.ndarray | None = None,
) -> SparseFeatures:
    """Build the KeyedJaggedTensors of one batch of B rows (the only place they are built).

    `user_idx` (B,): a user index per row, -1 for a user unknown to the model (empty ID bag), or
    None for no user at all (item-only batches). `item_idx`: the candidate per row (B,), or None
    (user-only batches); with `items_per_row` (B,), the rows' candidates concatenated.
    `history_values` holds the B histories concatenated, `history_lengths` (B,) their lengths;
    each history is oldest first.
    """
    batch = len(history_lengths)
    users = np.full(batch, -1, dtype=np.int64) if user_idx is None else np.asarray(user_idx, dtype=np.int64)
    known = users >= 0
    user_values, user_lengths = _jagged(users[known], known.astype(np.int64))
    if item_idx is None:
        item_values, item_lengths = _jagged(np.empty(0, np.int64), np.zeros(batch, np.int64))
    else:
        item_values, item_lengths = _jagged(np.asarray(item_idx),
                                            np.ones(batch, np.int64) if items_per_row is None else items_per_row)
    hist_values, hist_lengths = _jagged(np.asarray(history_values), np.asarray(history_lengths))
    return SparseFeatures(
        users=KeyedJaggedTensor.from_lengths_sync(
            keys=[USER_FEATURE], values=user_values, lengths=user_lengths, stride=batch
        ),
        items=KeyedJaggedTensor.from_lengths_sync(
            keys=[ITEM_FEATURE, HISTORY_FEATURE],
            values=torch.cat([item_values, hist_values]),
            lengths=torch.cat([item_lengths, hist_lengths]),
            stride=batch,
        ),
    )


def collate_histories(
    user_idx: np.ndarray | None, item_idx: np.ndarray | None, histories: list[np.ndarray], max_history: int
) -> SparseFeatures:
    """`collate` from a list of per-row histories (oldest first), keeping the last `max_history` of each."""
    kept = [np.asarray(h, dtype=np.int64)[-max_history:] if max_history else np.empty(0, np.int64)
            for h in histories]
    lengths = np.array([len(h) for h in kept], dtype=np.int64)
    values = np.concatenate(kept) if kept else np.empty(0, np.int64)
    return collate(user_idx, item_idx, values, lengths)


@dataclass
class SparseEmbeddings:
    """Embeddings looked up for a `SparseFeatures` batch (dense, padded)."""

    user: torch.Tensor | None
    """(B, D) user ID embedding, zero for rows without a known user; None without ID tables"""
    item_ids: torch.Tensor
    """(P,) candidate items, the rows' candidates concatenated"""
    item: torch.Tensor | None
    """(P, D) candidate item ID embeddings; None without ID tables"""
    history_ids: torch.Tensor
    """(B, T) history item IDs, oldest first, right-padded with 0"""
    history_lengths: torch.Tensor
    """(B,) number of real entries in each history"""
    history: torch.Tensor | None
    """(B, T, D) history item ID embeddings (zero in padding); None without ID tables"""


class SparseArch(nn.Module):
    """The TorchRec tables: users (EmbeddingBagCollection) and items shared by candidates and histories.

    With `use_ids=False` there are no tables (the content-only model); the module then only turns
    the KeyedJaggedTensors into padded ID tensors, so the towers can look up content features.
    """

    def __init__(self, n_users: int, n_items: int, dim: int, max_history: int, use_ids: bool = True,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.max_history = max_history
        self.user_bags: EmbeddingBagCollection | None = None
        self.item_embeddings: EmbeddingCollection | None = None
        if use_ids:
            self.user_bags = EmbeddingBagCollection(
                tables=[EmbeddingBagConfig(name=USER_TABLE, embedding_dim=dim, num_embeddings=n_users,
                                           feature_names=[USER_FEATURE], pooling=PoolingType.SUM,
                                           init_fn=_normal_init)],
                device=device,
            )
            self.item_embeddings = EmbeddingCollection(
                tables=[EmbeddingConfig(name=ITEM_TABLE, embedding_dim=dim, num_embeddings=n_items,
                                        feature_names=[ITEM_FEATURE, HISTORY_FEATURE], init_fn=_normal_init)],
                device=device,
            )

    def forward(self, features: SparseFeatures) -> SparseEmbeddings:
        items = features.items.to_dict()
        item_ids = items[ITEM_FEATURE].values().long()  # (P,)
        history_ids = items[HISTORY_FEATURE].to_padded_dense(self.max_history, padding_value=0).long()  # (B, T)
        history_lengths = items[HISTORY_FEATURE].lengths().clamp(max=self.max_history)  # (B,)
        if self.user_bags is None or self.item_embeddings is None:
            return SparseEmbeddings(None, item_ids, None, history_ids, history_lengths, None)
        user = self.user_bags(features.users)[USER_FEATURE]  # (B, D)
        looked_up = self.item_embeddings(features.items)
        item = looked_up[ITEM_FEATURE].values()  # (P, D)
        history = looked_up[HISTORY_FEATURE].to_padded_dense(self.max_history)  # (B, T, D)
        return SparseEmbeddings(user, item_ids, item, history_ids, history_lengths, history)


def _normal_init(weight: torch.Tensor) -> torch.Tensor:
    # Small normal init: TorchRec's default uniform(±1/sqrt(n)) is tiny for large tables and
    # large for small ones; a fixed scale keeps ID and content parts comparable at the start.
    return nn.init.normal_(weight, std=0.05)
