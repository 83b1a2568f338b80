"""A batch of the two-tower model: what training, validation and the coefficient fit read (no Lightning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recsys.twotower.sparse import SparseFeatures


@dataclass
class RetrievalBatch:
    """One batch: sparse features plus what the loss and the validation ranking need."""

    features: SparseFeatures
    """KeyedJaggedTensors: user_id (per row), item_id (the row's targets), history (the row's input)"""
    targets: torch.Tensor
    """(P,) target item_idx, rows' targets concatenated"""
    target_rows: torch.Tensor
    """(P,) batch row of each target"""
    target_steps: torch.Tensor
    """(P,) items of its row's history input that each target follows (the user state that scores it)"""
    exclude_rows: torch.Tensor
    """(E,) row of each (row, item) pair excluded from the ranking (validation only; empty in training)"""
    exclude_items: torch.Tensor
    """(E,) item of each excluded pair"""
    times: torch.Tensor | None = None
    """(B,) when each row's target happened (validation): its ranking reads only the fresh views before then"""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RetrievalBatch:
        return RetrievalBatch(
            self.features.to(device, non_blocking),
            *(t.to(device, non_blocking=non_blocking)
              for t in (self.targets, self.target_rows, self.target_steps, self.exclude_rows, self.exclude_items)),
            None if self.times is None else self.times.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return len(self.targets)
