"""The one score on a hand-made model with every term switched on: its inner-product form, its column
subsets and the validation metric all give the score `TwoTowerScorer` serves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.twotower.batch import RetrievalBatch
from recsys.twotower.fresh_views import FreshViews
from recsys.twotower.scoring import Coefficients, NewVideoScoring, score, score_inputs
from recsys.twotower.sparse import collate_histories
from recsys.twotower.towers import TwoTower, TwoTowerSpec
from recsys.twotower.trained_model import NEW_VIDEO_SCORING, TwoTowerScorer
from recsys.twotower.validation import VAL_METRIC, validate

N_ITEMS, NEW = 14, [10, 11, 12, 13]
SCORING = NewVideoScoring(weight=0.5, taste_weight=0.2, bias=0.25, fresh_weight=0.1, watched_fresh_weight=0.05)
# Fresh (user, item) views: user 0 watched new video 10 and watched video 3, user 2 new video 10 too,
# user 1 watched video 5, and someone the model does not know (-1) new video 12.
FRESH_USERS, FRESH_ITEMS = [0, 0, 2, 1, -1], [10, 3, 10, 5, 12]
USERS = np.array([0, 1, 2, -1, 4])
HISTORIES = [np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8, 9]), np.array([0]), np.array([6, 7]), np.array([2, 9])]
TARGETS = np.array([10, 5, 4, 12, 1])  # users 0 and 1: their own fresh view, as in validation


def hand_made_model() -> TwoTower:
    torch.manual_seed(0)
    spec = TwoTowerSpec(n_users=6, n_items=N_ITEMS, dim=8, max_history=5, content_dim=3, content_source="title",
                        taste_clusters=3, fresh_views=len(FRESH_USERS))
    new = torch.zeros(N_ITEMS, dtype=torch.bool)
    new[NEW] = True
    model = TwoTower(spec, content=torch.randn(N_ITEMS, 3), known_items=~new,
                     fresh_views=(torch.tensor(FRESH_USERS), torch.tensor(FRESH_ITEMS))).eval()
    membership = torch.eye(3)[torch.arange(N_ITEMS) % 3]  # (N, 3) one cluster per watched video
    membership[new] = torch.softmax(torch.randn(len(NEW), 3) * 2, dim=1)  # new videos: probabilities
    model.cluster_membership.copy_(membership)
    return model


def scorer_of(model: TwoTower, scoring: NewVideoScoring) -> TwoTowerScorer:
    return TwoTowerScorer(model, info={NEW_VIDEO_SCORING: scoring.to_dict()})


def test_the_inner_product_form_plus_own_view_corrections_is_the_score() -> None:
    scorer = scorer_of(hand_made_model(), SCORING)
    users = scorer.user_state(USERS, HISTORIES, taste=True)
    direct = score(users, scorer.item_state(), SCORING).numpy()  # (B, N)
    np.testing.assert_allclose(scorer.score(USERS, HISTORIES), direct, rtol=1e-5, atol=1e-6)
    # The product alone differs exactly at each known user's own fresh views (user 0: 10 and 3, ...).
    product = scorer.user_vectors(USERS, HISTORIES) @ scorer.item_vectors().T  # (B, N)
    differs = ~np.isclose(product, direct, rtol=1e-5, atol=1e-6)
    assert sorted(zip(*np.nonzero(differs), strict=True)) == [(0, 3), (0, 10), (1, 5), (2, 10)]


def test_a_subset_of_columns_scores_as_the_whole_catalogue() -> None:
    scorer = scorer_of(hand_made_model(), SCORING)
    users, items = scorer.user_state(USERS, HISTORIES, taste=True), scorer.item_state()
    inputs = score_inputs(users, items, taste=True, fresh=True)
    full = inputs.score(SCORING)  # (B, N)
    assert torch.equal(inputs.columns(items.new).score(SCORING), full[:, items.new])
    assert torch.equal(inputs.columns(torch.tensor([2, 11, 3])).score(SCORING), full[:, [2, 11, 3]])
    assert torch.equal(score(users, items, SCORING), full)


def served_ndcg(scorer: TwoTowerScorer) -> float:
    """NDCG@10 of the targets in the rankings by `TwoTowerScorer.score`, each history but the target excluded."""
    scores = scorer.score(USERS, HISTORIES)  # (B, N)
    gains = []
    for row, (history, target) in enumerate(zip(HISTORIES, TARGETS, strict=True)):
        scores[row, history[history != target]] = -np.inf
        rank = int(np.flatnonzero(np.argsort(-scores[row], kind="stable") == target)[0])  # ties: lower index
        gains.append(1 / np.log2(rank + 2) if rank < 10 else 0.0)
    return float(np.mean(gains))


@pytest.mark.parametrize("scoring", [NewVideoScoring(), SCORING], ids=["training", "fitted"])
def test_the_validation_metric_is_the_ndcg_of_the_served_ranking(scoring: NewVideoScoring) -> None:
    model = hand_made_model()
    features = collate_histories(USERS, TARGETS, HISTORIES, model.spec.max_history)
    seen = [(row, item) for row, history in enumerate(HISTORIES) for item in history if item != TARGETS[row]]
    rows, items = torch.tensor(seen).T
    lengths = torch.tensor([len(h) for h in HISTORIES])
    batch = RetrievalBatch(features, torch.from_numpy(TARGETS), torch.arange(len(USERS)), lengths, rows, items)
    validated = validate(model, [batch], scoring)[VAL_METRIC]
    assert validated == pytest.approx(served_ndcg(scorer_of(model, scoring)), abs=1e-6)
    assert 0 < validated < 1


def test_a_ranking_made_before_some_fresh_views_reads_only_the_earlier_ones() -> None:
    model = hand_made_model()
    model.fresh_view_times.copy_(torch.tensor([10, 20, 30, 40, 50]))
    scorer = scorer_of(model, SCORING)
    now = scorer.score(USERS, HISTORIES)
    own = np.zeros_like(now, dtype=bool)  # each known user's own fresh views: counted as of a time, not left out
    own[[0, 0, 1, 2], [3, 10, 5, 10]] = True
    after_all = scorer.score_before(USERS, HISTORIES, np.full(len(USERS), 51))
    np.testing.assert_allclose(after_all[~own], now[~own], rtol=1e-5, atol=1e-6)
    early = scorer.score_before(USERS, HISTORIES, np.full(len(USERS), 25))  # the views at 30, 40 and 50 not yet
    items = scorer.item_state()
    earlier = FreshViews(torch.tensor(FRESH_USERS[:2]), torch.tensor(FRESH_ITEMS[:2]), N_ITEMS).popularity
    coefficients = Coefficients.of(items.new, SCORING)
    expected = after_all + (coefficients.fresh * (earlier - items.fresh.popularity)).numpy()[None, :]
    np.testing.assert_allclose(early, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(early, now)
    # The direct score, ranked as of those times, is the same.
    users = scorer.user_state(USERS, HISTORIES, taste=True, before=np.full(len(USERS), 25))
    np.testing.assert_allclose(score(users, items, SCORING).numpy(), early, rtol=1e-5, atol=1e-6)
