"""The user–video score of the two-tower model: the one place that combines its terms.

    score(u, i) = w_i cos(u, e_i) + t_i sum_k m_ik log(share_uk + EPSILON) + f_i fresh_i + b_i

with, from the fitted `NewVideoScoring`,

    a new video (`ItemTower.scored_as_new`): w_i = weight, t_i = taste_weight, f_i = fresh_weight, b_i = bias
    a watched video:                          w_i = 1,      t_i = 0,            f_i = watched_fresh_weight, b_i = 0

- cos(u, e_i): user tower and item tower embeddings, both of unit length;
- m_i: the video's cluster membership, share_u: the share of each cluster in the user's history
  (every view alike: a recency weighting paid on no dataset, issue 19); how memberships are fitted
  and why a new video needs the taste term is in `recsys.twotower.new_videos`;
- fresh_i: the video's popularity among the views since the training cut-off
  (`recsys.twotower.fresh_views`).

A user's own fresh views count neither towards the fresh popularity of what they watched nor
towards a new video's membership (validation targets must not lift themselves); that changes only
the scores of videos in the user's history, which a ranking for them excludes.

Everything that ranks by the model calls this module: checkpoint selection and early stopping
(`recsys.twotower.validation`, with the coefficients in force then: the default `NewVideoScoring`,
cosine alone, during training), the coefficient fit (`recsys.twotower.new_videos`, which reads
`score_inputs` once per batch and re-scores only the new videos' columns for every grid point),
and `TwoTowerScorer` (evaluate, recommend, REST, the exported model). The scorer ranks by the
inner-product form of the same score, which an item index can search:

    user_vectors = [u, log(share_u + EPSILON), 1]      item_vectors = [w_i e_i, t_i m_i, f_i fresh_i + b_i]

(the K taste columns only where taste_weight > 0), plus `own_view_corrections` for each user's own
fresh views. tests/twotower/test_scoring.py checks that both forms give the same scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import torch

from recsys.twotower.fresh_views import FreshViews
from recsys.twotower.sparse import HISTORY_FEATURE, SparseFeatures
from recsys.twotower.towers import TwoTower

EPSILON = 0.01
"""Floor of every cluster share: a cluster the user never watched is unlikely, not impossible."""
MIN_PROBABILITY = 1e-9
"""Floor of a membership probability before its log is taken."""


@dataclass(frozen=True)
class NewVideoScoring:
    """The fitted coefficients of the score (see the module docstring); the default is cosine alone."""

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

    def uses_taste(self) -> bool:
        return self.taste_weight > 0

    def uses_fresh(self) -> bool:
        return self.fresh_weight > 0 or self.watched_fresh_weight > 0


@dataclass(frozen=True)
class Coefficients:
    """w_i, t_i, f_i and b_i (C,) of C videos, new or watched (see the module docstring)."""

    weight: torch.Tensor | float
    taste: torch.Tensor | float
    fresh: torch.Tensor | float
    bias: torch.Tensor | float

    @classmethod
    def of(cls, new: torch.Tensor, scoring: NewVideoScoring) -> Coefficients:
        """The coefficients (C,) of videos whose `new` (C,) says which are scored as new."""
        return cls(weight=torch.where(new, scoring.weight, 1.0), taste=torch.where(new, scoring.taste_weight, 0.0),
                   fresh=torch.where(new, scoring.fresh_weight, scoring.watched_fresh_weight),
                   bias=torch.where(new, scoring.bias, 0.0))

    @classmethod
    def of_new_videos(cls, scoring: NewVideoScoring) -> Coefficients:
        """The coefficients of new videos, as numbers: the coefficient fit applies thousands to the same
        columns, where building (C,) tensors each time would cost more than the scores."""
        return cls(scoring.weight, scoring.taste_weight, scoring.fresh_weight, scoring.bias)


@dataclass(frozen=True)
class ItemState:
    """What the score reads of the catalogue's N videos."""

    embeddings: torch.Tensor
    """(N, D) the item tower over the whole catalogue"""
    new: torch.Tensor
    """(N,) bool: videos scored as new"""
    membership: torch.Tensor
    """(N, K) cluster membership (K = 0, or all zero before it is fitted)"""
    fresh: FreshViews | None
    """the model's fresh views; None for a model without them"""

    @classmethod
    def of(cls, model: TwoTower, embeddings: torch.Tensor) -> ItemState:
        """The state of `model`'s catalogue, whose item tower gave `embeddings` (N, D)."""
        fresh = model.fresh_views() if model.spec.fresh_views else None
        return cls(embeddings, model.item_tower.scored_as_new(), model.cluster_membership, fresh)

    def has_taste(self) -> bool:
        """Whether the taste term can change a score: new videos with fitted memberships."""
        return bool(self.new.any()) and bool(self.membership.any())


@dataclass(frozen=True)
class UserState:
    """What the score reads of B users."""

    embeddings: torch.Tensor
    """(B, D) the user tower"""
    users: torch.Tensor
    """(B,) user index (-1: a user the model does not know, who has no own fresh views)"""
    log_shares: torch.Tensor | None
    """(B, K) log(share + EPSILON) of each cluster in the history; None where the taste term is not read"""
    before: torch.Tensor | None = None
    """(B,) when each user is ranked: fresh popularity counts only the fresh views before then (a held-out
    event's time, in validation and test); None: now, every fresh view but the user's own"""

    @classmethod
    def of(cls, model: TwoTower, features: SparseFeatures, taste: bool, before: torch.Tensor | None = None
           ) -> UserState:
        """The state of the users of one batch (the last `max_history` views of each, as the user tower reads),
        ranked at times `before` (None: now)."""
        log_shares = None
        if taste:
            history = features.items[HISTORY_FEATURE]
            log_shares = log_cluster_shares(model.cluster_membership, history.values(), history.lengths())
        return cls(model.user_embeddings(features), features.row_users(), log_shares, before)

    @classmethod
    def concat(cls, states: list[UserState]) -> UserState:
        """The states of several batches of users, one after the other."""
        shares = [state.log_shares for state in states if state.log_shares is not None]
        times = [state.before for state in states if state.before is not None]
        return cls(torch.cat([state.embeddings for state in states]), torch.cat([state.users for state in states]),
                   torch.cat(shares) if len(shares) == len(states) else None,
                   torch.cat(times) if len(times) == len(states) else None)


def log_cluster_shares(membership: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, K) log(share of each cluster + EPSILON) of B histories, every view alike.

    values: the histories concatenated, each oldest first; lengths (B,): their lengths.
    """
    bounds = torch.cumsum(lengths, 0)  # (B,) one past each history
    # Per-history sums as differences of one running sum (float64: exact enough, and no scatter over V rows).
    counted = membership[values].double()  # (V, K)
    running = torch.cat([torch.zeros(1, counted.shape[1], dtype=torch.float64), torch.cumsum(counted, 0)])
    sums = running[bounds] - running[bounds - lengths]  # (B, K)
    return torch.log(sums / lengths.clamp(min=1)[:, None] + EPSILON).float()  # (B, K)


def own_view_taste_changes(memberships: torch.Tensor, log_shares: torch.Tensor) -> torch.Tensor:
    """(V,) change of the taste term sum_k m_ik log(share_k + EPSILON) of V (user, new video) own fresh views.

    memberships (V, K): the videos' memberships, which include each user's own view;
    log_shares (V, K): each user's log(share + EPSILON), the factor their view multiplied in.
    """
    without = torch.softmax(torch.log(memberships.clamp(min=MIN_PROBABILITY)) - log_shares, dim=1)  # (V, K)
    return ((without - memberships) * log_shares).sum(1)


@dataclass(frozen=True)
class OwnViews:
    """The users' own fresh views (V pairs) and how leaving each out changes its fresh and taste terms."""

    rows: torch.Tensor
    """(V,) the user's row"""
    items: torch.Tensor
    """(V,) the viewed video"""
    fresh_change: torch.Tensor
    """(V,) change of fresh_i"""
    taste_change: torch.Tensor | None
    """(V,) change of the taste term (0 for a watched video); None where the taste term is not read"""

    @classmethod
    def of(cls, users: UserState, items: ItemState, taste: bool) -> OwnViews:
        """The own views of `users`; their taste changes only with `taste` (which needs `users.log_shares`)."""
        assert items.fresh is not None
        rows, viewed, fresh_change = items.fresh.own_view_changes(users.users)
        taste_change = None
        if taste and users.log_shares is not None:
            taste_change = torch.zeros(len(rows))
            own_new = items.new[viewed]  # a watched video's membership holds no fresh views
            taste_change[own_new] = own_view_taste_changes(items.membership[viewed[own_new]],
                                                           users.log_shares[rows[own_new]])
        return cls(rows, viewed, fresh_change, taste_change)


@dataclass(frozen=True)
class ScoreInputs:
    """The terms of the scores of B users for C videos before their coefficients; `score` combines them."""

    new: torch.Tensor
    """(C,) bool: which of the C videos are scored as new"""
    cosine: torch.Tensor
    """(B, C) cos(u, e_i)"""
    taste: torch.Tensor | None
    """(B, C) sum_k m_ik log(share_uk + EPSILON) of new videos (0 for watched ones); None: not read"""
    fresh: torch.Tensor | None
    """(B, C) fresh_i, each user's own fresh views left out; None: not read"""

    @cached_property
    def all_new(self) -> bool:
        return bool(self.new.all())

    def columns(self, positions: torch.Tensor) -> ScoreInputs:
        """The inputs of the videos at `positions` among the C: indices (C',) or a (C,) bool mask."""
        return ScoreInputs(self.new[positions], self.cosine[:, positions],
                           None if self.taste is None else self.taste[:, positions],
                           None if self.fresh is None else self.fresh[:, positions])

    def score(self, scoring: NewVideoScoring) -> torch.Tensor:
        """(B, C) the score (module docstring): the one combination of the terms."""
        coefficients = Coefficients.of_new_videos(scoring) if self.all_new else Coefficients.of(self.new, scoring)
        scores = coefficients.weight * self.cosine
        if self.taste is not None:
            scores = scores + coefficients.taste * self.taste
        if self.fresh is not None:
            scores = scores + coefficients.fresh * self.fresh
        return scores + coefficients.bias


def score_inputs(users: UserState, items: ItemState, taste: bool, fresh: bool) -> ScoreInputs:
    """The terms of the scores of B users for the whole catalogue (N videos); `taste` and `fresh` say which
    of the two optional terms to read (the taste term needs `users.log_shares`, the fresh one fresh views)."""
    cosine = users.embeddings @ items.embeddings.T  # (B, N)
    own = OwnViews.of(users, items, taste) if items.fresh is not None and taste else None
    taste_term = None
    if taste:
        assert users.log_shares is not None, "the taste term needs the users' cluster shares"
        taste_term = torch.zeros_like(cosine)
        taste_term[:, items.new] = users.log_shares @ items.membership[items.new].T  # (B, C_new)
        if own is not None and own.taste_change is not None:
            taste_term[own.rows, own.items] += own.taste_change
    fresh_term = None
    if fresh and items.fresh is not None and users.before is not None:  # the views before each ranking's time
        fresh_term = items.fresh.popularity_before(users.before)  # (B, N)
    elif fresh and items.fresh is not None:  # every fresh view but the user's own
        fresh_term = items.fresh.popularity_for(users.users)  # (B, N)
    return ScoreInputs(items.new, cosine, taste_term, fresh_term)


def score(users: UserState, items: ItemState, scoring: NewVideoScoring) -> torch.Tensor:
    """(B, N) the score of every video for each user, reading only the terms `scoring` weighs."""
    return score_inputs(users, items, scoring.uses_taste(), scoring.uses_fresh()).score(scoring)


# ---------------------------------------------------------------------------------------------- inner-product form


def item_vectors(items: ItemState, scoring: NewVideoScoring) -> torch.Tensor:
    """(N, D [+ K] + 1) [w_i e_i, t_i m_i, f_i fresh_i + b_i]: the item side of the score's inner-product form."""
    coefficients = Coefficients.of(items.new, scoring)
    parts = [items.embeddings * coefficients.weight[:, None]]  # (N, D)
    if scoring.uses_taste():
        parts.append(items.membership * coefficients.taste[:, None])  # (N, K)
    popularity = items.fresh.popularity if items.fresh is not None else torch.zeros(len(items.new))
    parts.append((coefficients.fresh * popularity + coefficients.bias)[:, None])  # (N, 1)
    return torch.cat(parts, 1)


def user_vectors(users: UserState, scoring: NewVideoScoring) -> torch.Tensor:
    """(B, D [+ K] + 1) [u, log(share_u + EPSILON), 1]: the user side of the score's inner-product form."""
    parts = [users.embeddings]
    if scoring.uses_taste():
        assert users.log_shares is not None, "the taste term needs the users' cluster shares"
        parts.append(users.log_shares)  # (B, K)
    parts.append(torch.ones(len(users.embeddings), 1))
    return torch.cat(parts, 1)


def later_view_corrections(items: ItemState, scoring: NewVideoScoring, before: torch.Tensor) -> torch.Tensor:
    """(B, N) what `user_vectors @ item_vectors.T` must lose for each of B rankings made at time `before` (B,):
    the fresh views from then on are the future, so f_i fresh_i is read from the earlier ones only
    (`FreshViews.popularity_before`). The test protocol ranks so; serving needs none (every view is past)."""
    if items.fresh is None or not scoring.uses_fresh():
        return torch.zeros(len(before), len(items.new))
    coefficients = Coefficients.of(items.new, scoring)
    return coefficients.fresh * (items.fresh.popularity_before(before) - items.fresh.popularity)


def own_view_corrections(users: UserState, items: ItemState, scoring: NewVideoScoring
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, items, change) (V,): what `user_vectors @ item_vectors.T` misses at each user's own fresh views."""
    if items.fresh is None:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0)
    own = OwnViews.of(users, items, scoring.uses_taste())
    coefficients = Coefficients.of(items.new[own.items], scoring)
    # Ranked as of a time, the fresh term counts the views before it (`later_view_corrections`), none left out.
    change = coefficients.fresh * own.fresh_change if users.before is None else torch.zeros(len(own.items))
    if own.taste_change is not None:
        change = change + coefficients.taste * own.taste_change
    return own.rows, own.items, change
