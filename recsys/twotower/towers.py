"""The two towers: plain `nn.Module`s that map sparse IDs and content features to one shared space.

- `ItemTower`: item ID embedding + projected content embedding. With content, the ID part is
  dropped at random in training and is always absent for items never seen in training, so a
  cold-start video is embedded from its content alone.
- `UserTower`: the ordered watch history (GRU or causal self-attention over the item
  representations that the item tower also scores) plus the user ID embedding (dropped at random
  in training, absent for unknown users), through an MLP to the shared space. Both encoders are
  causal, so one pass over a history gives the user after every prefix of it: training scores
  many targets of one user from one pass, inference takes the state after the whole history.
- `TwoTower`: the TorchRec tables (`SparseArch`) and both towers. Outputs are L2-normalised
  embeddings; scores are dot products. The training objective lives in `RetrievalModule`. It also
  keeps the cluster memberships that score new videos (`recsys.twotower.new_videos`), filled after
  training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import RetrievalConfig
from recsys.twotower.fresh_views import FreshViews
from recsys.twotower.sparse import SparseArch, SparseEmbeddings, SparseFeatures

Encoder = Literal["gru", "attention"]


def _config_default(name: str) -> Any:
    """The default of a `RetrievalConfig` field: a spec built without it gets what training would use."""
    return {f.name: f.default for f in fields(RetrievalConfig)}[name]


REMOVED_SPEC_FIELDS = ("taste_half_life",)
"""Fields of specs saved before the score term they set was removed (issue 19: the recency weighting of cluster
shares paid on no dataset); such a model loads, and scores as the model now does (every history view alike)."""


@dataclass
class TwoTowerSpec:
    """Everything needed to rebuild a `TwoTower` (saved as JSON beside the weights).

    The architecture fields are `RetrievalConfig`'s (documented there), with its defaults:
    `from_config` is how training builds a spec. The rest describe what the trained model holds,
    found from the data; their defaults (nothing) are also what a model.json written before them means.
    """

    n_users: int
    """Rows of the user ID table"""
    n_items: int
    """Rows of the item ID table (the prepared catalogue)"""
    dim: int = _config_default("dim")
    max_history: int = _config_default("max_history")
    encoder: Encoder = _config_default("encoder")
    layers: int = _config_default("layers")
    heads: int = _config_default("heads")
    dropout: float = _config_default("dropout")
    use_ids: bool = _config_default("ids")
    """`RetrievalConfig.ids`: False gives the content-only model"""
    user_id_dropout: float = _config_default("user_id_dropout")
    item_id_dropout: float = _config_default("item_id_dropout")
    """`RetrievalConfig.item_id_dropout` when the model has content, else 0"""
    content_dim: int = 0
    """Width of the item content embedding; 0 when the model has no content"""
    content_source: str = "none"
    """Which feature store file gave the content embedding (fused, title or none)"""
    taste_clusters: int = 0
    """`RetrievalConfig.taste_clusters` when the model has content, else 0 (no new-video taste term)"""
    fresh_views: int = 0
    """(user, item) views after the training cut-off that the model holds (`recsys.twotower.fresh_views`)"""
    folded_items: int = 0
    """Videos without training interactions embedded from the viewers they got since (`ItemTower`, `views add`)"""
    fold_in_prior: float = 0.0
    """Views a folded-in video's content embedding counts as (`recsys.twotower.catalogue_update.pick_fold_in_prior`)"""
    fresh_pseudo_views: float = 1.0
    """Views every video is given in its fresh popularity, so one nobody watched yet is not impossible"""
    temperature: float = _config_default("temperature")
    """`RetrievalConfig.temperature`: the softmax over the catalogue that the model was trained under"""

    @classmethod
    def from_config(cls, config: RetrievalConfig, n_users: int, n_items: int, content_dim: int = 0,
                    content_source: str = "none", fresh_views: int = 0) -> TwoTowerSpec:
        """The spec a training config asks for, on a catalogue of `n_items` and `n_users` (content found by
        the caller: `content_dim` 0 means none; `fresh_views` held, when `config.fresh_views`)."""
        return cls(
            n_users=n_users, n_items=n_items, dim=config.dim, max_history=config.max_history,
            encoder=config.encoder, layers=config.layers, heads=config.heads, dropout=config.dropout,
            use_ids=config.ids, user_id_dropout=config.user_id_dropout,
            item_id_dropout=config.item_id_dropout if content_dim else 0.0,
            content_dim=content_dim, content_source=content_source,
            taste_clusters=config.taste_clusters if content_dim else 0,
            fresh_views=fresh_views if config.fresh_views else 0, temperature=config.temperature,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TwoTowerSpec:
        return cls(**{key: value for key, value in data.items() if key not in REMOVED_SPEC_FIELDS})


def _drop_rows(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole rows of `x` (..., D) with probability p in training (no rescaling: absence is the signal)."""
    if not training or p <= 0:
        return x
    keep = torch.rand(x.shape[:-1], device=x.device) >= p  # (...,)
    return x * keep.unsqueeze(-1)


class ItemTower(nn.Module):
    """Item representation = ID embedding (seen items only) + MLP(content embedding)."""

    def __init__(self, spec: TwoTowerSpec, content: torch.Tensor | None, known_items: torch.Tensor) -> None:
        super().__init__()
        self.spec = spec
        if spec.content_dim and content is None:
            raise ValueError("spec.content_dim > 0 needs a content tensor")
        # Buffers (not parameters): the content comes from the frozen encoders, and is saved with the
        # weights so that a trained model scores cold items without the feature store.
        self.register_buffer("content", content if spec.content_dim else torch.zeros(spec.n_items, 0))
        self.register_buffer("known_items", known_items.bool())
        # Videos without training interactions that got views after training (`recsys views add`): sorted
        # item_idx, the collaborative part of their embedding fitted to their viewers
        # (`recsys.twotower.catalogue_update.fit_fold_in`) and the sum of those viewers' user embeddings
        # (each just before the view), which the next update refits from.
        self.register_buffer("folded_items", torch.zeros(spec.folded_items, dtype=torch.long))
        self.register_buffer("folded_sums", torch.zeros(spec.folded_items, spec.dim))
        self.register_buffer("folded_viewer_sums", torch.zeros(spec.folded_items, spec.dim))
        self.content_proj = (
            nn.Sequential(
                nn.Linear(spec.content_dim, spec.dim * 2),
                nn.GELU(),
                nn.Dropout(spec.dropout),
                nn.Linear(spec.dim * 2, spec.dim),
            )
            if spec.content_dim
            else None
        )
        self.norm = nn.LayerNorm(spec.dim)

    def represent(self, ids: torch.Tensor, id_embedding: torch.Tensor | None) -> torch.Tensor:
        """Unnormalised representation of items `ids` (...,) from their ID embeddings (..., D)."""
        parts = []
        if id_embedding is not None:
            id_part = id_embedding  # (..., D)
            if self.content_proj is not None:
                # An ID never trained carries no information: with content, cold items rely on it alone.
                # (Without content an untrained ID row stays a random vector: a random score, where a
                # zero vector would put every cold item at score 0, above most items.)
                id_part = id_part * self.known_items[ids].unsqueeze(-1)
                id_part = _drop_rows(id_part, self.spec.item_id_dropout, self.training)
            parts.append(id_part)
        if self.content_proj is not None:
            # Histories repeat items: project each distinct item once.
            unique, inverse = torch.unique(ids, return_inverse=True)  # (U,), (...,)
            parts.append(self.content_proj(self.content[unique])[inverse])  # (..., D)
        return self.norm(parts[0] if len(parts) == 1 else parts[0] + parts[1])  # (..., D)

    def forward(self, ids: torch.Tensor, id_embedding: torch.Tensor | None) -> torch.Tensor:
        """L2-normalised item embeddings (B, D).

        A video with views since training but none in it (`folded_items`) is embedded where its
        viewers were: normalise(prior * content embedding + sum of its viewers' user embeddings),
        the classic fold-in of an item from the users who chose it. Its content counts as
        `spec.fold_in_prior` views, as many as a watched video's embedding was trained on, so a few
        viewers move it a little from what it shows, and it takes as many as a trained video had to
        be placed by its viewers as much as by its content.
        """
        out = F.normalize(self.represent(ids, id_embedding), dim=-1)
        folded, viewers = self.viewers_of(ids)  # (B,), (B, D)
        if not bool(folded.any()):
            return out
        return torch.where(folded.unsqueeze(-1), F.normalize(self.spec.fold_in_prior * out + viewers, dim=-1), out)

    def viewers_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(folded (B,) bool, viewer sums (B, D), zero where not folded) of items `ids` (B,)."""
        if not len(self.folded_items):
            return torch.zeros(len(ids), dtype=torch.bool), torch.zeros(len(ids), self.spec.dim)
        place = torch.searchsorted(self.folded_items, ids).clamp(max=len(self.folded_items) - 1)  # (B,)
        folded = self.folded_items[place] == ids  # (B,)
        return folded, self.folded_sums[place] * folded.unsqueeze(-1)

    def scored_as_new(self) -> torch.Tensor:
        """(N,) bool: videos scored as new (`recsys.twotower.new_videos`): no training interactions, no fold-in."""
        new = ~self.known_items
        new[self.folded_items] = False
        return new


class UserTower(nn.Module):
    """User embedding from the ordered watch history and the user ID embedding."""

    def __init__(self, spec: TwoTowerSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.dim
        if spec.encoder == "gru":
            self.gru = nn.GRU(d, d, num_layers=spec.layers, batch_first=True,
                              dropout=spec.dropout if spec.layers > 1 else 0.0)
        else:
            # Positions count from the oldest item of the history the tower reads.
            self.positions = nn.Embedding(spec.max_history, d)
            layer = nn.TransformerEncoderLayer(d, spec.heads, dim_feedforward=2 * d, dropout=spec.dropout,
                                               batch_first=True, norm_first=True)
            self.attention = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.empty_history = nn.Parameter(torch.zeros(d))
        in_dim = 2 * d if spec.use_ids else d
        self.mlp = nn.Sequential(nn.Linear(in_dim, 2 * d), nn.GELU(), nn.Dropout(spec.dropout), nn.Linear(2 * d, d))

    def encode_prefixes(self, tokens: torch.Tensor) -> torch.Tensor:
        """History state after every prefix of right-padded histories (B, T, D) -> (B, T + 1, D).

        State s has read the first s items (state 0: the learned empty history). Both encoders
        are causal, so right padding never reaches the state of a real prefix.
        """
        batch, steps, _ = tokens.shape
        if self.spec.encoder == "gru":
            out, _ = self.gru(tokens)  # (B, T, D)
        else:
            x = tokens + self.positions(torch.arange(steps, device=tokens.device))  # (B, T, D)
            causal = nn.Transformer.generate_square_subsequent_mask(steps, device=tokens.device)  # (T, T)
            out = self.attention(x, mask=causal, is_causal=True)  # (B, T, D)
        return torch.cat([self.empty_history.expand(batch, 1, -1), out], dim=1)  # (B, T + 1, D)

    def forward(self, tokens: torch.Tensor, user_embedding: torch.Tensor | None, rows: torch.Tensor,
                steps: torch.Tensor) -> torch.Tensor:
        """L2-normalised user embeddings (P, D) of history row `rows` (P,) after its first `steps` (P,) items.

        tokens (B, T, D): right-padded histories; user_embedding (B, D): the rows' user IDs.
        """
        history = self.encode_prefixes(tokens)[rows, steps]  # (P, D)
        if user_embedding is not None:
            user = _drop_rows(user_embedding[rows], self.spec.user_id_dropout, self.training)  # (P, D)
            history = torch.cat([history, user], dim=-1)  # (P, 2D)
        return F.normalize(self.mlp(history), dim=-1)  # (P, D)


class TwoTower(nn.Module):
    """TorchRec ID tables + user tower + item tower; `forward` returns (user, item) embeddings."""

    def __init__(self, spec: TwoTowerSpec, content: torch.Tensor | None = None,
                 known_items: torch.Tensor | None = None,
                 fresh_views: tuple[torch.Tensor, ...] | None = None) -> None:
        super().__init__()
        if not spec.use_ids and not spec.content_dim:
            raise ValueError("a two-tower model needs ID embeddings, content, or both")
        self.spec = spec
        known = torch.ones(spec.n_items, dtype=torch.bool) if known_items is None else known_items
        self.sparse = SparseArch(spec.n_users, spec.n_items, spec.dim, spec.max_history, spec.use_ids)
        self.item_tower = ItemTower(spec, content, known)
        self.user_tower = UserTower(spec)
        # Filled after training (`recsys.twotower.new_videos.fit_new_videos`); saved with the weights.
        self.register_buffer("cluster_membership", torch.zeros(spec.n_items, spec.taste_clusters))
        # (user, item, time) of each fresh view: read by the scoring of every video, saved with the weights.
        # `fresh_views`: (users, items) or (users, items, times); without times every view counts as time 0.
        empty = torch.zeros(spec.fresh_views, dtype=torch.long)
        users, items, *times = fresh_views or (empty, empty.clone())
        times = times[0] if times else torch.zeros(len(users), dtype=torch.long)
        if not len(users) == len(items) == len(times) == spec.fresh_views:
            raise ValueError(f"the spec holds {spec.fresh_views} fresh views, got {len(users)} users, "
                             f"{len(items)} items, {len(times)} times")
        self.register_buffer("fresh_view_users", users.long())
        self.register_buffer("fresh_view_items", items.long())
        self.register_buffer("fresh_view_times", times.long())

    def fresh_views(self) -> FreshViews:
        """The fresh views this model holds, and the popularity they give each video."""
        return FreshViews(self.fresh_view_users, self.fresh_view_items, self.spec.n_items, self.fresh_view_times,
                          self.spec.fresh_pseudo_views)

    def _users(self, emb: SparseEmbeddings, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        tokens = self.item_tower.represent(emb.history_ids, emb.history)  # (B, T, D)
        return self.user_tower(tokens, emb.user, rows, steps)  # (P, D)

    def forward(self, features: SparseFeatures, rows: torch.Tensor, steps: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(user embeddings (P, D), candidate item embeddings (P, D)) of a batch's P candidates.

        Candidate p belongs to history row `rows[p]` and follows its first `steps[p]` items.
        """
        emb = self.sparse(features)
        return self._users(emb, rows, steps), self.item_tower(emb.item_ids, emb.item)

    def user_embeddings(self, features: SparseFeatures) -> torch.Tensor:
        """User embeddings (B, D) after each row's whole history (the item_id feature may be empty)."""
        emb = self.sparse(features)
        rows = torch.arange(len(emb.history_lengths), device=emb.history_lengths.device)  # (B,)
        return self._users(emb, rows, emb.history_lengths)

    def item_embeddings(self, features: SparseFeatures) -> torch.Tensor:
        """Candidate item embeddings (B, D) of a batch (its user and history features may be empty)."""
        emb = self.sparse(features)
        return self.item_tower(emb.item_ids, emb.item)
