"""How videos without training interactions ("new videos") are scored beside watched ones.

A watched video's score is the cosine of user and item embedding. A new video has only its
content-only embedding, and that cosine changes little between a new video of the kind a user
watches most and one of a kind they never watch. Lifting new videos by one offset then lifts the
wrong ones too (on the synthetic corpus, 46% of the new videos an offset put in a top 10 were
outside the user's two main topics). So a new video's score gets one more term, the user's taste
for the group of videos its content points to:

    score(u, i) = weight * cos(u, e_i) + taste_weight * sum_k m_ik log(share_uk + EPSILON)
                  + fresh_weight * fresh_i + bias

- the groups are k-means clusters of the trained embeddings of watched videos: videos the same
  people watch;
- m_i, the membership of video i, is one-hot for a watched video; for a new one, it is the cluster
  probabilities that a logistic regression reads from its content embedding (trained on the watched
  videos), updated by Bayes' rule with the cluster shares of the people who watched it since the
  training cut-off (its fresh views): m_i ~ m_i(content) * prod_v (share_v + EPSILON). Content
  says roughly what a new video is about; a handful of its first viewers say it sharply. A user's
  own fresh view is taken out of the membership again when ranking for that user (validation
  targets must not lift themselves);
- share_u is the recency-weighted share of each cluster in the user's history (HALF_LIFE);
- fresh_i is the video's popularity among the views since the training cut-off
  (`recsys.twotower.fresh_views`): how many people watch it now, which content cannot tell. A
  watched video's score gets the same term with its own weight: cos(u, e_i) + watched_fresh_weight
  * fresh_i (whether it is rising or fading);
- weight, taste_weight, fresh_weight, watched_fresh_weight and bias are the grid point with the
  best validation NDCG@10 (`fit_new_video_scoring`). The grid holds weight 1 and every other
  weight 0 (the content score plus an offset), so validation can always choose the plain model.

Each term is an inner product, so the scorer serves them as more dimensions of one user vector
[u, log(share_u + EPSILON), 1] and one item vector: [weight e_i, taste_weight m_i, fresh_weight
fresh_i + bias] for a new video, [e_i, 0, watched_fresh_weight fresh_i] for a watched one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from recsys.metrics import mask_pairs, metrics_from_ranks
from recsys.twotower.batch import RetrievalBatch
from recsys.twotower.sparse import HISTORY_FEATURE
from recsys.twotower.towers import TwoTower
from recsys.twotower.validation import VAL_METRIC, K, catalogue_embeddings, ndcg_and_hits

HALF_LIFE = 20.0
"""Views after which a history item counts half as much towards the user's cluster shares."""
EPSILON = 0.01
"""Floor of every cluster share: a cluster the user never watched is unlikely, not impossible."""
MIN_PROBABILITY = 1e-9
"""Floor of a membership probability before its log is taken."""
WEIGHTS = (1.0, 0.5, 0.25)
"""Weights of a new video's content cosine that `fit_new_video_scoring` tries."""
TASTE_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3)
"""Weights of the cluster-taste term that `fit_new_video_scoring` tries (scores are cosines)."""
FRESH_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3)
"""Weights of a new video's fresh popularity that `fit_new_video_scoring` tries."""
WATCHED_FRESH_WEIGHTS = (0.0, 0.02, 0.05, 0.1)
"""Weights of a watched video's fresh popularity that `fit_new_video_scoring` tries."""
BIASES = tuple(round(0.05 * step, 2) for step in range(17))
"""Offsets (0 ... 0.8) that `fit_new_video_scoring` tries. None is negative: the taste term is."""


@dataclass(frozen=True)
class NewVideoScoring:
    """The fitted coefficients of a new video's score (see the module docstring)."""

    weight: float = 1.0
    taste_weight: float = 0.0
    bias: float = 0.0
    fresh_weight: float = 0.0
    watched_fresh_weight: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NewVideoScoring:
        return cls(**{key: float(value) for key, value in data.items()})

    def simplicity(self) -> tuple[float, ...]:
        """Sort key among equal validation scores: fewer terms, full content weight, small offset."""
        return -self.watched_fresh_weight, -self.fresh_weight, -self.taste_weight, self.weight, -self.bias


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

    membership = np.zeros((len(known), clusters), np.float32)
    watched = np.flatnonzero(known)
    k = min(clusters, len(watched))
    if k < 2:
        return membership
    labels = KMeans(k, n_init=4, random_state=seed).fit_predict(item_embeddings[watched])  # (W,)
    membership[watched, labels] = 1.0
    new = np.flatnonzero(~known)
    if len(new):
        membership[new] = content_clusters(content[watched], labels, content[new], clusters)
    return membership


def content_clusters(watched_content: np.ndarray, labels: np.ndarray, content: np.ndarray, clusters: int
                     ) -> np.ndarray:
    """(M, clusters) float32 cluster probabilities of M videos from their content (M, C): the logistic
    read-out fitted on the watched videos' content (W, C) and clusters (W,)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    out = np.zeros((len(content), clusters), np.float32)
    if len(np.unique(labels)) < 2 or not len(content):
        return out
    # One BLAS thread: a problem this small only loses to thread hand-offs (10x slower on a busy machine).
    with threadpool_limits(1):
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        classifier.fit(watched_content, labels)
        out[:, classifier.classes_] = classifier.predict_proba(content)
    return out


def add_fresh_viewers(membership: torch.Tensor, new: torch.Tensor, fresh_batches: Iterable[RetrievalBatch]
                      ) -> torch.Tensor:
    """(N, K) memberships with each new video's updated by the cluster shares of its fresh viewers.

    fresh_batches: one row per fresh view, the viewer's history before it and the viewed video as
    target. Each view of a new video multiplies its cluster probabilities by the viewer's
    (share + EPSILON), then they are normalised again. Watched videos keep theirs.
    """
    evidence = torch.zeros_like(membership)  # (N, K) sum of log(share + EPSILON) over each video's viewers
    for batch in fresh_batches:
        history = batch.features.items[HISTORY_FEATURE]
        log_shares = log_cluster_shares(membership, history.values(), history.lengths())  # (B, K)
        of_new = new[batch.targets]  # (B,)
        evidence.index_add_(0, batch.targets[of_new], log_shares[of_new])
    updated = membership.clone()
    updated[new] = torch.softmax(torch.log(membership[new].clamp(min=MIN_PROBABILITY)) + evidence[new], dim=1)
    return updated


def own_view_taste_changes(memberships: torch.Tensor, log_shares: torch.Tensor) -> torch.Tensor:
    """(V,) change of the taste term sum_k m_ik log(share_k + EPSILON) of V (user, new video) own fresh views.

    memberships (V, K): the videos' memberships, which include each user's own view;
    log_shares (V, K): each user's log(share + EPSILON), the factor their view multiplied in.
    """
    without = torch.softmax(torch.log(memberships.clamp(min=MIN_PROBABILITY)) - log_shares, dim=1)  # (V, K)
    return ((without - memberships) * log_shares).sum(1)


def fit_new_videos(model: TwoTower, batches: Iterable[RetrievalBatch], fresh_batches: Iterable[RetrievalBatch],
                   seed: int = 0) -> tuple[NewVideoScoring, float, dict[str, float]]:
    """Cluster memberships (written into `model.cluster_membership`), then `fit_new_video_scoring`.

    Memberships need content (new videos are read from it), new videos and `spec.taste_clusters` > 0;
    `fresh_batches` (the model's fresh views, see `add_fresh_viewers`) sharpen those of new videos.
    """
    known = model.item_tower.known_items.numpy()
    if model.spec.taste_clusters and model.spec.content_dim and not known.all():
        model.eval()
        items = catalogue_embeddings(model).numpy()  # (N, D)
        content = model.item_tower.content.numpy()  # (N, C)
        membership = torch.from_numpy(fit_membership(items, known, content, model.spec.taste_clusters, seed))
        if model.spec.fresh_views and membership.any():
            membership = add_fresh_viewers(membership, torch.from_numpy(~known), fresh_batches)
        model.cluster_membership.copy_(membership)
    return fit_new_video_scoring(model, batches)


def log_cluster_shares(membership: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, K) log(recency-weighted share of each cluster + EPSILON) of B histories.

    values: the histories concatenated, each oldest first; lengths (B,): their lengths.
    """
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # (V,)
    bounds = torch.cumsum(lengths, 0)  # (B,) one past each history
    age = bounds[rows] - 1 - torch.arange(len(values))  # (V,) 0 for the newest view
    recency = 0.5 ** (age.double() / HALF_LIFE)  # (V,)
    weighted = torch.cat([recency[:, None] * membership[values].double(), recency[:, None]], 1)  # (V, K + 1)
    # Per-history sums as differences of one running sum (float64: exact enough, and no scatter over V rows).
    running = torch.cat([torch.zeros(1, weighted.shape[1], dtype=torch.float64), torch.cumsum(weighted, 0)])
    sums = running[bounds] - running[bounds - lengths]  # (B, K + 1)
    shares, total = sums[:, :-1], sums[:, -1].clamp(min=1e-9)
    return torch.log(shares / total[:, None] + EPSILON).float()  # (B, K)


def new_video_scores(cosines: torch.Tensor, taste: torch.Tensor, fresh: torch.Tensor, scoring: NewVideoScoring
                     ) -> torch.Tensor:
    """Scores (B, C) of C new videos from their cosines, taste terms sum_k m_ik log(share_uk + eps) and
    fresh popularity, each (B, C)."""
    return scoring.weight * cosines + scoring.taste_weight * taste + scoring.fresh_weight * fresh + scoring.bias


class TargetRanks:
    """Ranks of a batch's targets under scores in which only the new videos' columns change.

    The watched videos' scores (B, N) are fixed: they are masked and sorted once, so each new
    scoring costs a search per row and a comparison with the C new videos, not a pass over the
    catalogue. Ranks are those of `rank_of_targets`: excluded pairs last, ties to the lower index.
    """

    def __init__(self, scores: torch.Tensor, batch: RetrievalBatch, new: torch.Tensor) -> None:
        scores = scores.clone()
        mask_pairs(scores, batch.exclude_rows, batch.exclude_items)
        targets = batch.targets  # (B,)
        index = torch.arange(scores.shape[1])
        self.new_targets = new[targets]  # (B,)
        self.new_columns = (torch.cumsum(new, 0) - 1)[targets].clamp(min=0)  # (B,) the target's column among new
        excluded = torch.zeros_like(scores, dtype=torch.bool)
        excluded[batch.exclude_rows, batch.exclude_items] = True
        self.new_excluded = excluded[:, new]  # (B, C)
        self.new_index = index[new]  # (C,)
        self.targets = targets
        watched = scores[:, ~new]  # (B, W)
        lower = index[~new][None, :] < targets[:, None]  # (B, W) watched videos that win ties with the target
        self.watched_sorted = torch.sort(watched, dim=1).values  # (B, W)
        self.lower_sorted = torch.sort(watched.masked_fill(~lower, float("-inf")), dim=1).values  # (B, W)
        self.watched_target_scores = scores.gather(1, targets[:, None]).squeeze(1)  # (B,) for watched targets
        t = self.watched_target_scores[:, None]
        self.watched_ahead_of_watched = ((watched > t) | ((watched == t) & lower)).sum(1)  # (B,) fixed

    def ranks(self, new_scores: torch.Tensor) -> torch.Tensor:
        """0-based rank (B,) of each target when the C new videos score `new_scores` (B, C)."""
        new_scores = new_scores.masked_fill(self.new_excluded, float("-inf"))
        from_new = new_scores.gather(1, self.new_columns[:, None]).squeeze(1) if new_scores.shape[1] else None
        t = self.watched_target_scores if from_new is None else torch.where(
            self.new_targets, from_new, self.watched_target_scores)  # (B,)
        t_column = t[:, None]
        above = self.watched_sorted.shape[1] - torch.searchsorted(self.watched_sorted, t_column, right=True)[:, 0]
        tied = (torch.searchsorted(self.lower_sorted, t_column, right=True)
                - torch.searchsorted(self.lower_sorted, t_column))[:, 0]  # (B,) lower-index ties
        watched_ahead = torch.where(self.new_targets, above + tied, self.watched_ahead_of_watched)  # (B,)
        new_ahead = (new_scores > t[:, None]) | ((new_scores == t[:, None])
                                                 & (self.new_index[None, :] < self.targets[:, None]))  # (B, C)
        return watched_ahead + new_ahead.sum(1)

    def ndcg(self, new_scores: torch.Tensor) -> torch.Tensor:
        """NDCG@K (B,) of each target when the new videos score `new_scores` (B, C)."""
        return metrics_from_ranks(self.ranks(new_scores), (K,))[f"ndcg@{K}"]


def scoring_grid(has_new: bool, has_taste: bool, has_fresh: bool) -> list[NewVideoScoring]:
    """Every scoring `fit_new_video_scoring` tries: terms without their inputs stay at 0."""
    new_points = itertools.product(WEIGHTS, TASTE_WEIGHTS if has_taste else (0.0,), BIASES,
                                   FRESH_WEIGHTS if has_fresh else (0.0,)) if has_new else [(1.0, 0.0, 0.0, 0.0)]
    return [NewVideoScoring(*point, watched_fresh_weight=watched)
            for point in new_points for watched in (WATCHED_FRESH_WEIGHTS if has_fresh else (0.0,))]


@torch.no_grad()
def fit_new_video_scoring(model: TwoTower, batches: Iterable[RetrievalBatch]
                          ) -> tuple[NewVideoScoring, float, dict[str, float]]:
    """(best scoring, its validation NDCG@K, validation NDCG@K and HR@K of the plain model) from one pass.

    Every scoring of `scoring_grid` ranks the validation targets; ties go to the simpler scoring.
    The plain model ranks by cosine alone. Fresh popularity leaves each user's own fresh views out,
    so a validation target does not lift itself. A catalogue without new videos or fresh views gets
    the default scoring and NaN.
    """
    model.eval()
    items = catalogue_embeddings(model)  # (N, D)
    new = ~model.item_tower.known_items  # (N,)
    membership = model.cluster_membership  # (N, K)
    has_taste = bool(new.any()) and bool(membership.any())
    fresh = model.fresh_views() if model.spec.fresh_views else None
    fitting = bool(new.any()) or fresh is not None
    new_columns = torch.cumsum(new, 0) - 1  # (N,) each new video's column among the new ones
    grid = scoring_grid(bool(new.any()), has_taste, fresh is not None) if fitting else []
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
        users = batch.features.row_users()  # (B,)
        taste = torch.zeros(len(batch), int(new.sum()))  # (B, C)
        if has_taste:
            log_shares = log_cluster_shares(membership, history.values(), history.lengths())  # (B, K)
            taste = log_shares @ membership[new].T
            if fresh is not None:  # a user's own fresh view of a new video leaves its membership
                viewers, viewed, _ = fresh.own_view_changes(users)
                own = new[viewed]
                viewers, viewed = viewers[own], viewed[own]
                taste[viewers, new_columns[viewed]] += own_view_taste_changes(membership[viewed], log_shares[viewers])
        popularity = fresh.popularity_for(users) if fresh is not None else torch.zeros_like(cosines)  # (B, N)
        new_cosines, new_popularity = cosines[:, new], popularity[:, new]  # (B, C)
        for watched_fresh_weight in sorted({scoring.watched_fresh_weight for scoring in grid}):
            ranks = TargetRanks(cosines + watched_fresh_weight * popularity, batch, new)
            for scoring in grid:
                if scoring.watched_fresh_weight == watched_fresh_weight:
                    scores = new_video_scores(new_cosines, taste, new_popularity, scoring)  # (B, C)
                    ndcg_sums[scoring] += float(ranks.ndcg(scores).sum())
    rows = max(rows, 1)
    plain_metrics = {VAL_METRIC: plain[0] / rows, "val_hr_10": plain[1] / rows}
    if not grid:
        return NewVideoScoring(), float("nan"), plain_metrics
    best = max(grid, key=lambda scoring: (ndcg_sums[scoring], scoring.simplicity()))
    return best, ndcg_sums[best] / rows, plain_metrics
