"""How videos without training interactions ("new videos") are scored beside watched ones.

A watched video's score is the cosine of user and item embedding. A new video has only its
content-only embedding, and that cosine changes little between a new video of the kind a user
watches most and one of a kind they never watch. Lifting new videos by one offset then lifts the
wrong ones too (on the synthetic corpus, 46% of the new videos an offset put in a top 10 were
outside the user's two main topics). So a new video's score gets one more term, the user's taste
for the group of videos its content points to:

    score(u, i) = weight * cos(u, e_i) + taste_weight * sum_k m_ik log(share_uk + EPSILON) + bias

- the groups are k-means clusters of the trained embeddings of watched videos: videos the same
  people watch;
- m_i, the membership of video i, is one-hot for a watched video; for a new one, it is the cluster
  probabilities that a logistic regression reads from its content embedding (trained on the watched
  videos);
- share_u is the recency-weighted share of each cluster in the user's history (HALF_LIFE);
- weight, taste_weight and bias are the grid point with the best validation NDCG@10
  (`fit_new_video_scoring`). The grid holds weight 1 and taste_weight 0 (the content score plus an
  offset), so validation can always choose the plain model.

Each term is an inner product, so the scorer serves them as more dimensions of one user vector
[u, log(share_u + EPSILON), 1] and one item vector: [weight e_i, taste_weight m_i, bias] for a
new video, [e_i, 0, 0] for a watched one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from recsys.data.retrieval_datamodule import RetrievalBatch
from recsys.models.retrieval_module import VAL_METRIC, catalogue_embeddings, ndcg_and_hits
from recsys.models.sparse import HISTORY_FEATURE
from recsys.models.towers import TwoTower

HALF_LIFE = 20.0
"""Views after which a history item counts half as much towards the user's cluster shares."""
EPSILON = 0.01
"""Floor of every cluster share: a cluster the user never watched is unlikely, not impossible."""
WEIGHTS = (1.0, 0.5, 0.25)
"""Weights of a new video's content cosine that `fit_new_video_scoring` tries."""
TASTE_WEIGHTS = (0.0, 0.05, 0.1, 0.2)
"""Weights of the cluster-taste term that `fit_new_video_scoring` tries (scores are cosines)."""
BIASES = tuple(round(0.05 * step, 2) for step in range(17))
"""Offsets (0 ... 0.8) that `fit_new_video_scoring` tries. None is negative: the taste term is."""


@dataclass(frozen=True)
class NewVideoScoring:
    """The fitted coefficients of a new video's score (see the module docstring)."""

    weight: float = 1.0
    taste_weight: float = 0.0
    bias: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NewVideoScoring:
        return cls(**{key: float(value) for key, value in data.items()})

    def simplicity(self) -> tuple[float, float, float]:
        """Sort key among equal validation scores: no taste term, full content weight, small offset."""
        return -self.taste_weight, self.weight, -self.bias


def new_video_metrics(scoring: NewVideoScoring, val_ndcg: float) -> dict[str, float]:
    """The fitted scoring as MLflow metrics, with the validation NDCG@10 it reached."""
    return {**{f"new_video_{name}": value for name, value in scoring.to_dict().items()},
            "val_ndcg_10_with_new_video_scoring": val_ndcg}


def fit_membership(item_embeddings: np.ndarray, known: np.ndarray, content: np.ndarray, clusters: int,
                   seed: int = 0) -> np.ndarray:
    """(N, clusters) float32: one-hot cluster of each watched video, predicted cluster probabilities of new ones.

    item_embeddings (N, D): the trained item tower; known (N,) bool: videos with training
    interactions; content (N, C): content embeddings. With fewer watched videos than clusters,
    each watched video is its own cluster and the remaining columns stay 0.
    """
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    membership = np.zeros((len(known), clusters), np.float32)
    watched = np.flatnonzero(known)
    k = min(clusters, len(watched))
    if k < 2:
        return membership
    labels = KMeans(k, n_init=4, random_state=seed).fit_predict(item_embeddings[watched])  # (W,)
    membership[watched, labels] = 1.0
    new = np.flatnonzero(~known)
    if len(new):
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        classifier.fit(content[watched], labels)
        membership[np.ix_(new, classifier.classes_)] = classifier.predict_proba(content[new])
    return membership


def fit_new_videos(model: TwoTower, batches: Iterable[RetrievalBatch], seed: int = 0
                   ) -> tuple[NewVideoScoring, float, dict[str, float]]:
    """Cluster memberships (written into `model.cluster_membership`), then `fit_new_video_scoring`.

    Memberships need content (new videos are read from it), new videos and `spec.taste_clusters` > 0.
    """
    known = model.item_tower.known_items.numpy()
    if model.spec.taste_clusters and model.spec.content_dim and not known.all():
        model.eval()
        items = catalogue_embeddings(model).numpy()  # (N, D)
        content = model.item_tower.content.numpy()  # (N, C)
        membership = fit_membership(items, known, content, model.spec.taste_clusters, seed)
        model.cluster_membership.copy_(torch.from_numpy(membership))
    return fit_new_video_scoring(model, batches)


def log_cluster_shares(membership: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, K) log(recency-weighted share of each cluster + EPSILON) of B histories.

    values: the histories concatenated, each oldest first; lengths (B,): their lengths.
    """
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # (V,)
    ends = torch.cumsum(lengths, 0)[rows]  # (V,) one past each value's history
    age = ends - 1 - torch.arange(len(values))  # (V,) 0 for the newest view
    recency = 0.5 ** (age.float() / HALF_LIFE)  # (V,)
    shares = torch.zeros(len(lengths), membership.shape[1]).index_add_(0, rows, recency[:, None] * membership[values])
    total = torch.zeros(len(lengths)).index_add_(0, rows, recency).clamp(min=1e-9)  # (B,)
    return torch.log(shares / total[:, None] + EPSILON)  # (B, K)


def new_video_scores(cosines: torch.Tensor, taste: torch.Tensor, scoring: NewVideoScoring) -> torch.Tensor:
    """Scores (B, C) of C new videos from their cosines (B, C) and taste terms sum_k m_ik log(share_uk + eps) (B, C)."""
    return scoring.weight * cosines + scoring.taste_weight * taste + scoring.bias


@torch.no_grad()
def fit_new_video_scoring(model: TwoTower, batches: Iterable[RetrievalBatch]
                          ) -> tuple[NewVideoScoring, float, dict[str, float]]:
    """(best scoring, its validation NDCG@K, validation NDCG@K and HR@K of the plain model) from one pass.

    Every combination of `WEIGHTS`, `TASTE_WEIGHTS` (only 0 without cluster memberships) and
    `BIASES` ranks the validation targets; ties go to the simpler scoring. The plain model ranks
    by cosine alone. A catalogue without new videos gets the default scoring and NaN.
    """
    model.eval()
    items = catalogue_embeddings(model)  # (N, D)
    new = ~model.item_tower.known_items  # (N,)
    membership = model.cluster_membership  # (N, K)
    has_taste = bool(new.any()) and bool(membership.any())
    grid = [NewVideoScoring(*point) for point in itertools.product(
        WEIGHTS, TASTE_WEIGHTS if has_taste else (0.0,), BIASES)] if new.any() else []
    ndcg_sums = dict.fromkeys(grid, 0.0)
    plain = [0.0, 0.0]  # NDCG sum, HR sum
    rows = 0
    for batch in batches:
        users = model.user_embeddings(batch.features)  # (B, D)
        cosines = users @ items.T  # (B, N)
        ndcg, hit = ndcg_and_hits(cosines, batch)
        plain[0], plain[1] = plain[0] + float(ndcg.sum()), plain[1] + float(hit.sum())
        rows += len(batch)
        if not grid:
            continue
        history = batch.features.items[HISTORY_FEATURE]
        taste = (log_cluster_shares(membership, history.values(), history.lengths()) @ membership[new].T
                 if has_taste else torch.zeros(len(batch), int(new.sum())))  # (B, C)
        new_cosines = cosines[:, new]  # (B, C)
        for scoring in grid:
            scores = cosines.clone()
            scores[:, new] = new_video_scores(new_cosines, taste, scoring)
            ndcg_sums[scoring] += float(ndcg_and_hits(scores, batch)[0].sum())
    rows = max(rows, 1)
    plain_metrics = {VAL_METRIC: plain[0] / rows, "val_hr_10": plain[1] / rows}
    if not grid:
        return NewVideoScoring(), float("nan"), plain_metrics
    best = max(grid, key=lambda scoring: (ndcg_sums[scoring], scoring.simplicity()))
    return best, ndcg_sums[best] / rows, plain_metrics
