"""Why a video got its score: the score of `TwoTowerScorer` split into the terms that make it.

The ranking score of a video i for a user is `user_vectors(u) . item_vectors()[i]`, the
inner-product form of the score of `recsys.twotower.scoring`. Its columns are three groups of terms:

- the embedding columns: w_i * u . e_i, where w_i is the coefficient of the cosine
  (`recsys.twotower.scoring.Coefficients`: 1 for a watched video, the fitted weight for a new
  one). The item embedding is e_i = normalize(LayerNorm(a_i + c_i)) with a_i the ID embedding
  (zero for a video never seen in training) and c_i the projected content embedding. LayerNorm is
  linear once its statistics are fixed: LayerNorm(a + c) = g * (a - mean a) / s
  + g * (c - mean c) / s + beta with s the standard deviation of a + c. So e_i splits exactly into an ID part, a
  content part and a part shared by every video (beta), each divided by the same norm. A video
  embedded from its viewers since training (`ItemTower` fold-in) has their user embeddings in its
  ID part;
- the cluster-taste columns (new videos only): the user's taste for the group of videos the
  video's content and first viewers point to (`recsys.twotower.new_videos`);
- the last column: fresh_weight * fresh popularity, plus the new-video offset `bias`.

`score_terms` returns those terms for given videos; they add up to the score the index ranks by.
Collaborative = ID part + cluster taste (both learned from who watched what), content = content
part, popularity = fresh popularity, offset = the shared LayerNorm part and the new-video bias.
A share is a term's absolute value over the sum of the absolute values, so shares add up to 1
whatever the signs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recsys.twotower.scoring import Coefficients
from recsys.twotower.sparse import ITEM_TABLE
from recsys.twotower.trained_model import TwoTowerScorer

SHARES: tuple[str, ...] = ("collaborative", "content", "popularity", "offset")
"""The groups of score terms a share is reported for, in that order."""


@dataclass
class ScoreTerms:
    """Terms of the scores of B users' ranked videos, each (B, k); they add up to the scores."""

    collaborative: np.ndarray
    """w * user . (ID part of the item embedding) + the new-video cluster taste"""
    content: np.ndarray
    """w * user . (content part of the item embedding)"""
    popularity: np.ndarray
    """fresh-popularity term"""
    offset: np.ndarray
    """w * user . (LayerNorm bias part) + the new-video bias"""
    from_content: np.ndarray
    """bool (B, k): the video has no trained ID embedding, so it was ranked from its content"""

    def total(self) -> np.ndarray:
        """(B, k) the scores: the sum of the terms."""
        return self.collaborative + self.content + self.popularity + self.offset

    def shares(self) -> np.ndarray:
        """(B, k, 4) |term| / sum |terms| in `SHARES` order (each row sums to 1; all zero when the score is 0)."""
        terms = np.abs(np.stack([getattr(self, name) for name in SHARES], axis=-1))  # (B, k, 4)
        total = terms.sum(-1, keepdims=True)  # (B, k, 1)
        return np.divide(terms, total, out=np.zeros_like(terms), where=total > 0)


@torch.inference_mode()
def embedding_parts(scorer: TwoTowerScorer, items: np.ndarray) -> np.ndarray:
    """(n, 3, D) ID, content and shared (LayerNorm bias) parts of the embeddings of `items` (n,).

    They add up to `scorer.item_embeddings()[items]` (see the module docstring).
    """
    tower = scorer.model.item_tower
    ids = torch.as_tensor(items, dtype=torch.long)  # (n,)
    d = scorer.dim
    id_part = torch.zeros(len(ids), d)
    table = scorer.model.sparse.item_embeddings
    if table is not None:
        id_part = table.embeddings[ITEM_TABLE].weight[ids].float()  # (n, D)
        if tower.content_proj is not None:
            id_part = id_part * tower.known_items[ids].unsqueeze(-1)  # as `ItemTower.represent` does
    content = tower.content_proj(tower.content[ids]) if tower.content_proj is not None else torch.zeros(len(ids), d)
    norm = tower.norm
    x = id_part + content  # (n, D) what the LayerNorm reads
    spread = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)  # (n, 1)
    gain = norm.weight if norm.weight is not None else torch.ones(d)
    shift = norm.bias if norm.bias is not None else torch.zeros(d)
    parts = torch.stack([
        gain * (id_part - id_part.mean(-1, keepdim=True)) / spread,
        gain * (content - content.mean(-1, keepdim=True)) / spread,
        shift.expand(len(ids), d),
    ], dim=1)  # (n, 3, D)
    length = parts.sum(1).norm(dim=-1).clamp_min(1e-12)  # (n,) the norm F.normalize divides by
    parts = parts / length[:, None, None]
    folded, viewers = tower.viewers_of(ids)  # (n,), (n, D)
    if bool(folded.any()):  # embedded from its viewers: their sum joins the collaborative (ID) part
        prior = torch.tensor(tower.spec.fold_in_prior)
        scale = torch.where(folded, prior, torch.tensor(1.0))[:, None, None]  # (n, 1, 1)
        parts = parts * scale
        parts[:, 0] += viewers
        parts = parts / parts.sum(1).norm(dim=-1).clamp_min(1e-12)[:, None, None]
    return parts.numpy()


def score_terms(scorer: TwoTowerScorer, user_vectors: np.ndarray, items: np.ndarray) -> ScoreTerms:
    """The terms of the scores of videos `items` (B, k) for users given by `user_vectors` (B, D')."""
    items = np.asarray(items, dtype=np.int64)
    b, k = items.shape
    d = scorer.dim
    vectors = scorer.item_vectors()[items.reshape(-1)].reshape(b, k, -1)  # (B, k, D')
    new = scorer.item_state().new[torch.from_numpy(items)]  # (B, k)
    coefficients = Coefficients.of(new, scorer.new_video_scoring)
    weight, bias = coefficients.weight.numpy(), coefficients.bias.numpy()  # (B, k)
    parts = embedding_parts(scorer, items.reshape(-1)).reshape(b, k, 3, d)  # (B, k, 3, D)
    dots = np.einsum("bd,bkpd->bkp", user_vectors[:, :d], parts) * weight[..., None]  # (B, k, 3)
    taste = np.einsum("bc,bkc->bk", user_vectors[:, d:-1], vectors[..., d:-1])  # (B, k), zero when no clusters
    return ScoreTerms(
        collaborative=(dots[..., 0] + taste).astype(np.float32),
        content=dots[..., 1].astype(np.float32),
        popularity=(vectors[..., -1] - bias).astype(np.float32),
        offset=(dots[..., 2] + bias).astype(np.float32),
        from_content=new.numpy(),
    )
