"""Temporal encoder: one vector from a sequence of frame features, order-aware (GRU) or not (mean).

The GRU sees the frames in order, so it can tell a shape moving left from one moving right;
mean-pooling sees the same set of frames either way and is kept as the ablation that proves
it. Padded frames (clips shorter than the sampled length) are masked out of both.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

TemporalKind = Literal["gru", "mean"]


def masked_mean(x: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """Mean of `x` over `dim` counting only positions where `mask` is true; zeros where none is."""
    weights = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    total = (x * weights).sum(dim)  # (B, F)
    return total / weights.sum(dim).clamp_min(1.0)


def compact(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move the valid steps of each row to the front, keeping their order; returns (x, lengths)."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # (B, T) valid steps first
    x = torch.gather(x, 1, order.unsqueeze(-1).expand_as(x))  # (B, T, F)
    return x, mask.sum(1)


def reverse_time(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's valid steps in reverse order, moved to the front: (x (B, T, F), mask (B, T))."""
    t = mask.shape[1]
    positions = torch.arange(t, device=mask.device).expand_as(mask)  # (B, T)
    key = torch.where(mask, t - positions, 2 * t)  # later valid steps first, padding last
    order = torch.argsort(key, dim=1)  # (B, T)
    x = torch.gather(x, 1, order.unsqueeze(-1).expand_as(x))  # (B, T, F)
    return x, torch.arange(t, device=mask.device) < mask.sum(1, keepdim=True)


def random_crop(mask: Tensor, min_fraction: float, max_fraction: float, min_steps: int = 2,
                generator: torch.Generator | None = None) -> Tensor:
    """A random contiguous window of each row's valid steps (B, T): between the given shares of them."""
    n = mask.sum(1)  # (B,)
    fraction = torch.empty(n.shape, device=mask.device).uniform_(min_fraction, max_fraction, generator=generator)
    length = torch.minimum(n, (fraction * n).round().long().clamp_min(min_steps))  # (B,)
    start = (torch.rand(n.shape, device=mask.device, generator=generator) * (n - length + 1)).floor().long()
    rank = mask.long().cumsum(1) - 1  # (B, T): index of each valid step among the valid ones
    inside = (rank >= start.unsqueeze(1)) & (rank < (start + length).unsqueeze(1))
    return mask & inside


CHANGE_SCALE = 0.05
"""Change of a frame feature that counts as a full step in `with_changes`' bounded copy: in the frame
CNN's position features ([-1, 1] across the frame) about a 1.6-pixel move at 64 pixels."""


def with_changes(x: Tensor) -> Tensor:
    """Each step's features next to their change since the previous step, raw and bounded: (B, T, 3F).

    The bounded copy (tanh of the change over `CHANGE_SCALE`) makes every step vote about equally
    for a direction, so one large jump cannot outvote the steady motion of all the other frames: a
    shape leaving the frame on one side and coming back on the other (the synthetic corpus wraps its
    shapes round the border, and most clips of its fast topics cross it), a cut, a tracked feature
    switching to another object. With the raw change alone, such a jump cancels the motion summed
    over the clip, and the GRU must first learn to discount it.
    """
    change = torch.diff(x, dim=1, prepend=x[:, :1])  # (B, T, F) zero at the first step
    return torch.cat([x, change, torch.tanh(change / CHANGE_SCALE)], dim=-1)  # (B, T, 3F)


class TemporalEncoder(nn.Module):
    """Frame features (B, T, F) and their mask (B, T) → one embedding (B, out_dim).

    `gru`: the valid frames in order, each with its change since the previous frame (motion is a
    change of position, and handing the difference over directly saves the GRU from learning to
    subtract; see `with_changes`), projected frame by frame, then a GRU; the summary is its state
    after the last valid frame (both directions when bidirectional). `mean`: the ablation, order-blind by
    design: the masked mean of the projected frames, no changes (a difference needs an order).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 128,
        kind: TemporalKind = "gru",
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("gru", "mean"):
            raise ValueError(f"unknown temporal encoder {kind!r}; choose gru or mean")
        self.kind = kind
        # Per-frame projection first, so the GRU (run several times per batch in training) stays
        # cheap whatever the backbone's width.
        self.project = nn.Sequential(nn.Linear(3 * in_dim if kind == "gru" else in_dim, hidden_dim), nn.ReLU())
        summary_dim = hidden_dim
        if kind == "gru":
            self.gru = nn.GRU(hidden_dim, hidden_dim, batch_first=True, bidirectional=bidirectional)
            summary_dim = hidden_dim * (2 if bidirectional else 1)
        self.head = nn.Sequential(nn.Linear(summary_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        if self.kind == "mean":
            summary = masked_mean(self.project(features), mask)  # (B, H)
        else:
            summary = self._gru_summary(features, mask)  # (B, H * directions)
        return self.head(summary)  # (B, D)

    def _gru_summary(self, features: Tensor, mask: Tensor) -> Tensor:
        features, lengths = compact(features, mask)  # (B, T, F), (B,): valid frames first, in order
        steps = self.project(with_changes(features))  # (B, T, H)
        # pack_padded_sequence rejects empty sequences; clips with no frame get a zero summary below.
        packed = pack_padded_sequence(steps, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        _, hidden = self.gru(packed)  # (directions, B, H): the state after each row's last valid frame
        summary = hidden.transpose(0, 1).reshape(features.shape[0], -1)  # (B, H * directions)
        return summary * (lengths > 0).unsqueeze(-1).to(summary.dtype)
