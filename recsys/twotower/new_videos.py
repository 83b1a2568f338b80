"""How videos without training interactions ("new videos") are scored beside watched ones: fitting the
parts of the score (`recsys.twotower.scoring`, where the formula lives) that only they need.

A watched video's score is the cosine of user and item embedding. A new video has only its
content-only embedding, and that cosine changes little between a new video of the kind a user
watches most and one of a kind they never watch. Lifting new videos by one offset then lifts the
wrong ones too (on the synthetic corpus, 46% of the new videos an offset put in a top 10 were
outside the user's two main topics). So a new video's score gets one more term, the user's taste
for the group of videos its content points to, sum_k m_ik log(share_uk + EPSILON):

- the groups are k-means clusters of the trained embeddings of watched videos: videos the same
  people watch;
- m_i, the membership of video i, is one-hot for a watched video; for a new one, it is the cluster
  probabilities that a logistic regression reads from its content embedding (trained on the watched
  videos), updated by Bayes' rule with the cluster shares of the people who watched it since the
  training cut-off (its fresh views): m_i ~ m_i(content) * prod_v (share_v + EPSILON). Content
  says roughly what a new video is about; a handful of its first viewers say it sharply;
- share_u is the share of each cluster in the user's history (`log_cluster_shares`);
- fresh popularity (`recsys.twotower.fresh_views`) tells how many people watch a video now, which
  content cannot tell; a watched video gets the same term with its own weight (rising or fading);
- weight, taste_weight, fresh_weight, watched_fresh_weight and bias (`NewVideoScoring`) are the
  grid point with the best validation NDCG@10 (`fit_new_video_scoring`). The grid holds weight 1
  and every other weight 0 (the content score plus an offset), so validation can always choose
  the plain model.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np
import torch

from recsys.metrics import mask_pairs, metrics_from_ranks
from recsys.twotower.batch import RetrievalBatch
from recsys.twotower.scoring import (
    MIN_PROBABILITY,
    ItemState,
    NewVideoScoring,
    UserState,
    log_cluster_shares,
    score_inputs,
)
from recsys.twotower.sparse import HISTORY_FEATURE
from recsys.twotower.towers import TwoTower
from recsys.twotower.validation import VAL_METRIC, K, catalogue_embeddings, ndcg_and_hits

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


FITTED_TERMS = ("cold bias", "taste clusters", "fresh sharpening", "fresh popularity")
"""Terms of the score that the fit can leave out (`fit_new_videos(without=...)`), for ablations: the new
videos' offset, the taste term, the sharpening of new videos' memberships by their fresh viewers, and
fresh popularity."""


def fit_new_videos(model: TwoTower, batches: Iterable[RetrievalBatch], fresh_batches: Iterable[RetrievalBatch],
                   seed: int = 0, without: frozenset[str] = frozenset()
                   ) -> tuple[NewVideoScoring, float, dict[str, float]]:
    """Cluster memberships (written into `model.cluster_membership`), then `fit_new_video_scoring`.

    Memberships need content (new videos are read from it), new videos and `spec.taste_clusters` > 0;
    `fresh_batches` (the model's fresh views, see `add_fresh_viewers`) sharpen those of new videos.
    `without`: terms of `FITTED_TERMS` to leave out (their coefficients stay 0, their memberships unfitted).
    """
    unknown = set(without) - set(FITTED_TERMS)
    if unknown:
        raise ValueError(f"unknown score terms {sorted(unknown)}; the fit can leave out {list(FITTED_TERMS)}")
    known = model.item_tower.known_items.numpy()
    model.cluster_membership.zero_()
    if model.spec.taste_clusters and model.spec.content_dim and not known.all() and "taste clusters" not in without:
        model.eval()
        items = catalogue_embeddings(model).numpy()  # (N, D)
        content = model.item_tower.content.numpy()  # (N, C)
        membership = torch.from_numpy(fit_membership(items, known, content, model.spec.taste_clusters, seed))
        if model.spec.fresh_views and membership.any() and "fresh sharpening" not in without:
            membership = add_fresh_viewers(membership, torch.from_numpy(~known), fresh_batches)
        model.cluster_membership.copy_(membership)
    return fit_new_video_scoring(model, batches, without)


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


def scoring_grid(has_new: bool, has_taste: bool, has_fresh: bool, has_bias: bool = True) -> list[NewVideoScoring]:
    """Every scoring `fit_new_video_scoring` tries: terms without their inputs (or left out) stay at 0."""
    new_points = itertools.product(WEIGHTS, TASTE_WEIGHTS if has_taste else (0.0,), BIASES if has_bias else (0.0,),
                                   FRESH_WEIGHTS if has_fresh else (0.0,)) if has_new else [(1.0, 0.0, 0.0, 0.0)]
    return [NewVideoScoring(*point, watched_fresh_weight=watched)
            for point in new_points for watched in (WATCHED_FRESH_WEIGHTS if has_fresh else (0.0,))]


@torch.no_grad()
def fit_new_video_scoring(model: TwoTower, batches: Iterable[RetrievalBatch], without: frozenset[str] = frozenset()
                          ) -> tuple[NewVideoScoring, float, dict[str, float]]:
    """(best scoring, its validation NDCG@K, validation NDCG@K and HR@K of the plain model) from one pass.

    Every scoring of `scoring_grid` ranks the validation targets by the served score
    (`recsys.twotower.scoring`); ties go to the simpler scoring. The plain model is the default
    `NewVideoScoring` (cosine alone). The terms are read once per batch; the scorings of one
    watched_fresh_weight share the watched videos' scores (`TargetRanks`), so each grid point
    re-scores only the new videos' columns. A catalogue without new videos or fresh views gets the
    default scoring and NaN. `without`: terms of `FITTED_TERMS` whose coefficients stay 0.
    """
    model.eval()
    items = ItemState.of(model, catalogue_embeddings(model))
    has_new = bool(items.new.any())
    has_taste = items.has_taste() and "taste clusters" not in without
    has_fresh = items.fresh is not None and "fresh popularity" not in without
    grid = scoring_grid(has_new, has_taste, has_fresh, "cold bias" not in without) if has_new or has_fresh else []
    ndcg_sums = dict.fromkeys(grid, 0.0)
    plain = [0.0, 0.0]  # NDCG sum, HR sum
    rows = 0
    for batch in batches:
        inputs = score_inputs(UserState.of(model, batch.features, has_taste, batch.times), items, has_taste,
                              has_fresh)
        ndcg, hit = ndcg_and_hits(inputs.score(NewVideoScoring()), batch)
        plain[0], plain[1] = plain[0] + float(ndcg.sum()), plain[1] + float(hit.sum())
        rows += len(batch)
        new_inputs = inputs.columns(items.new)  # (B, C)
        for watched_fresh_weight in sorted({scoring.watched_fresh_weight for scoring in grid}):
            ranks = TargetRanks(inputs.score(NewVideoScoring(watched_fresh_weight=watched_fresh_weight)), batch,
                                items.new)
            for scoring in grid:
                if scoring.watched_fresh_weight == watched_fresh_weight:
                    ndcg_sums[scoring] += float(ranks.ndcg(new_inputs.score(scoring)).sum())
    rows = max(rows, 1)
    plain_metrics = {VAL_METRIC: plain[0] / rows, "val_hr_10": plain[1] / rows}
    if not grid:
        return NewVideoScoring(), float("nan"), plain_metrics
    best = max(grid, key=lambda scoring: (ndcg_sums[scoring], scoring.simplicity()))
    return best, ndcg_sums[best] / rows, plain_metrics
