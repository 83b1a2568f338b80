"""Fusion of modality embeddings into one content embedding, robust to missing modalities.

Both variants weigh only the modalities present for a video (the mask), so a clip without an
audio track or with an empty title still gets an embedding. During training whole modalities
are dropped at random (modality dropout), so the fused embedding never learns to depend on
one of them being there.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

FusionKind = Literal["gated", "attention"]


def drop_modalities(mask: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Randomly hide present modalities with probability `p`, always keeping at least one per row."""
    if p <= 0:
        return mask
    keep = torch.rand(mask.shape, generator=generator, device=mask.device) >= p  # (B, M)
    dropped = mask & keep  # (B, M)
    # Rows that lost every modality get back one present modality chosen at random.
    empty = ~dropped.any(1) & mask.any(1)  # (B,)
    if empty.any():
        scores = torch.rand(mask.shape, generator=generator, device=mask.device).masked_fill(~mask, -1.0)
        rescue = torch.zeros_like(mask).scatter_(1, scores.argmax(1, keepdim=True), True)  # (B, M)
        dropped = dropped | (rescue & empty.unsqueeze(1))
    return dropped


class ModalityFusion(nn.Module):
    """Modality embeddings (B, M, D) with presence mask (B, M) → fused embedding (B, D).

    `gated`: per-dimension softmax gates over the present modalities (each gate computed from
    that modality's embedding plus a learned modality bias). `attention`: a learned query
    attends over the present modality tokens. Rows with no modality present give zeros.
    """

    def __init__(self, dim: int, n_modalities: int, kind: FusionKind = "gated", modality_dropout: float = 0.0,
                 heads: int = 4) -> None:
        super().__init__()
        if kind not in ("gated", "attention"):
            raise ValueError(f"unknown fusion {kind!r}; choose gated or attention")
        self.kind = kind
        self.modality_dropout = modality_dropout
        self.modality_bias = nn.Parameter(torch.zeros(n_modalities, dim))
        if kind == "gated":
            self.gate = nn.Linear(dim, dim)
        else:
            self.query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
            self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.out = nn.Linear(dim, dim)

    def forward(self, embeddings: Tensor, mask: Tensor) -> Tensor:
        if self.training:
            mask = drop_modalities(mask, self.modality_dropout)
        fused, _ = self._fuse(embeddings, mask)
        return fused

    @torch.no_grad()
    def modality_weights(self, embeddings: Tensor, mask: Tensor) -> Tensor:
        """How much each present modality contributes to each row's fused embedding (B, M), rows sum to 1."""
        _, weights = self._fuse(embeddings, mask)
        return weights

    def _fuse(self, embeddings: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        present = mask.any(1, keepdim=True)  # (B, 1)
        # A row with nothing present would make the softmax NaN; let it see everything, then zero it.
        safe = mask | ~present  # (B, M)
        if self.kind == "gated":
            scores = self.gate(embeddings) + self.modality_bias  # (B, M, D)
            scores = scores.masked_fill(~safe.unsqueeze(-1), float("-inf"))
            gates = scores.softmax(dim=1)  # (B, M, D)
            fused = (gates * embeddings).sum(1)  # (B, D)
            weights = gates.mean(-1)  # (B, M)
        else:
            tokens = embeddings + self.modality_bias  # (B, M, D)
            query = self.query.expand(embeddings.shape[0], -1, -1)  # (B, 1, D)
            attended, attn = self.attention(query, tokens, tokens, key_padding_mask=~safe)  # (B,1,D), (B,1,M)
            fused = self.out(attended.squeeze(1))  # (B, D)
            weights = attn.squeeze(1)  # (B, M)
        return fused * present.to(fused.dtype), weights * present.to(weights.dtype)
