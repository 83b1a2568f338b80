"""Title encoder: a trained projection of the cached MiniLM sentence embedding.

The sentence model stays frozen and is never run during training: `recsys ingest` stores its
384-d output per video, and only this small projection learns.
"""

from __future__ import annotations

from torch import Tensor, nn

SENTENCE_DIM = 384
"""Size of the all-MiniLM-L6-v2 sentence embedding stored in the feature store."""


class TitleEncoder(nn.Module):
    """Cached sentence embedding (B, 384) → title embedding (B, out_dim)."""

    def __init__(self, out_dim: int, in_dim: int = SENTENCE_DIM, hidden_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, sentence: Tensor) -> Tensor:
        return self.net(sentence)  # (B, D)
