"""Ranking metrics for one held-out target per user, computed from full score rows in batches.

A target's rank is its position in the top-k list the recommender would actually show: items
scoring strictly higher come first, and ties go to the lower item index (the order of a stable
descending sort). So a model that gives every item the same score earns no credit for ties, and
the metrics agree with the lists `recommend` prints.

With a 0-based rank r and a cut-off K: HR@K = [r < K] (equal to Recall@K for one target),
NDCG@K = [r < K] / log2(r + 2) (the ideal DCG of a single relevant item is 1), and
MRR@K = [r < K] / (r + 1). Catalogue coverage@K is the share of all items that appear in at
least one user's top-K list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

KS: tuple[int, ...] = (10, 20, 50)
"""The cut-offs every evaluation reports."""

METRICS: tuple[str, ...] = ("hr", "ndcg", "mrr")
"""Per-target metrics, reported as e.g. `ndcg@10`."""


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1) int64 number of True per row of a (B, N) bool tensor."""
    # Summing bools widens to int64 element by element; bytes summed into int32 is several times faster.
    return mask.view(torch.uint8).sum(dim=1, keepdim=True, dtype=torch.int32).long()


def mask_pairs(scores: torch.Tensor, rows: torch.Tensor, items: torch.Tensor, keep: torch.Tensor | None = None
               ) -> None:
    """Set the excluded (row, item) pairs of scores (B, N) to -inf in place, except each row's item in `keep`.

    rows, items (E,): the pairs; keep (B,) or None. `keep` protects a held-out target that the user
    had also watched before (a re-watch): it is still the item to predict, so its own score must
    stay rankable. Every ranking with exclusions masks through here, then ranks (`target_ranks`,
    `top_k`, or an index's top-k).
    """
    if keep is not None:
        saved = scores.gather(1, keep[:, None])  # (B, 1)
    scores[rows.to(scores.device), items.to(scores.device)] = float("-inf")
    if keep is not None:
        scores.scatter_(1, keep[:, None], saved)


def mask_excluded(scores: torch.Tensor, exclude: Sequence[np.ndarray], keep: torch.Tensor | None = None) -> None:
    """`mask_pairs` with the exclusions given as one array of item indices per row of scores (B, N)."""
    if not len(exclude):
        return
    rows = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])  # (E,)
    items = np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude])  # (E,)
    mask_pairs(scores, torch.from_numpy(rows), torch.from_numpy(items), keep)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target among all items (strictly higher first, ties to lower index).

    scores: (B, N) float, excluded items already at -inf; targets: (B,) int64 item indices.
    Returns (B,) int64.
    """
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    index = torch.arange(scores.shape[1], device=scores.device)[None, :]  # (1, N)
    ahead = (scores > target_scores) | ((scores == target_scores) & (index < targets[:, None]))  # (B, N)
    return count_true(ahead).squeeze(1)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, torch.Tensor]:
    """Per-target HR@K, NDCG@K and MRR@K (each (B,) float32) from 0-based ranks (B,)."""
    ranks = ranks.to(torch.float32)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = (ranks < k).to(torch.float32)  # (B,)
        out[f"hr@{k}"] = hit
        out[f"ndcg@{k}"] = hit / torch.log2(ranks + 2.0)
        out[f"mrr@{k}"] = hit / (ranks + 1.0)
    return out


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of each row's k best items, best first, ties to the lower index (as in `target_ranks`).

    torch.topk breaks ties arbitrarily and a full stable sort costs O(N log N) per row, so the
    k-th best value is found with topk and the tied items at that value are taken by index.
    """
    k = min(k, scores.shape[1])
    threshold = torch.topk(scores, k, dim=1).values[:, -1:]  # (B, 1)
    above = scores > threshold  # (B, N)
    tied = scores == threshold  # (B, N)
    room = k - count_true(above)  # (B, 1) places left for tied items
    chosen = above | tied  # (B, N)
    crowded = (count_true(tied) > room).squeeze(1)  # (B,) more ties than places
    if crowded.any():  # a cumulative count is costly, so only for the rows that need it
        first = tied[crowded].cumsum(dim=1) <= room[crowded]  # (C, N)
        chosen[crowded] = above[crowded] | (tied[crowded] & first)
    ids = chosen.nonzero()[:, 1].view(-1, k)  # (B, k) ascending item index
    order = torch.sort(scores.gather(1, ids), dim=1, descending=True, stable=True).indices  # (B, k)
    return ids.gather(1, order)


class CoverageCounter:
    """Accumulates which items appear in some user's top-K list, batch by batch."""

    def __init__(self, n_items: int, ks: Sequence[int] = KS) -> None:
        self.ks = tuple(ks)
        self.shown = {k: torch.zeros(n_items, dtype=torch.bool) for k in self.ks}

    def update(self, scores: torch.Tensor) -> None:
        """Add the top-K lists of a batch of masked score rows (B, N)."""
        ranked = top_k(scores, max(self.ks))  # (B, Kmax)
        for k in self.ks:
            self.shown[k][ranked[:, :k].reshape(-1)] = True

    def result(self) -> dict[str, float]:
        """coverage@K for each K: shown items / catalogue size."""
        return {f"coverage@{k}": float(shown.float().mean()) for k, shown in self.shown.items()}
