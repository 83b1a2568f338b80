"""Folding a new video in from its viewers: the fitted embedding is the likelihood's maximum, placed by who
watched it, and the content prior is picked on held-out viewers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys.twotower.catalogue_update import DEFAULT_FOLD_IN_PRIOR, FoldInSoftmax, fit_fold_in, pick_fold_in_prior

DIM = 16
T = 0.1


def groups(seed: int = 0, per_group: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Users of two tastes (near axis 0 and axis 1), their view weights, and other videos of both tastes."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.eye(DIM)[0], torch.eye(DIM)[1]
    noise = lambda n: 0.3 * torch.randn(n, DIM, generator=gen)  # noqa: E731
    users = F.normalize(torch.cat([a + noise(per_group), b + noise(per_group)]), dim=-1)
    others = F.normalize(torch.cat([a + noise(20), b + noise(20), noise(20)]), dim=-1)
    return users, torch.full((len(users),), 20.0), others


def log_likelihood(embedding: torch.Tensor, pull: torch.Tensor, users: torch.Tensor, views: torch.Tensor,
                   others: torch.Tensor) -> torch.Tensor:
    """The objective `fit_fold_in` maximises, for one video."""
    rest = torch.logsumexp(users @ others.T / T, dim=1)
    logits = users @ embedding / T
    return pull @ embedding / T - (views * torch.logaddexp(rest, logits)).sum()


def test_the_fitted_embedding_is_the_maximum_and_the_forward_formula_gives_it_exactly() -> None:
    users, views, others = groups()
    content = F.normalize(torch.randn(1, DIM, generator=torch.Generator().manual_seed(1)), dim=-1)
    viewer_sums = users[:12].sum(0, keepdim=True)  # twelve users of taste A watched it
    prior = 2.0
    sums = fit_fold_in(content, viewer_sums, prior, FoldInSoftmax(users, views, others, T))
    embedding = F.normalize(prior * content + sums, dim=-1)[0]
    best = log_likelihood(embedding, (prior * content + viewer_sums)[0], users, views, others)
    for step in range(20):  # any nearby point on the sphere is less likely
        moved = F.normalize(embedding + 0.05 * torch.randn(DIM, generator=torch.Generator().manual_seed(step)), dim=0)
        assert log_likelihood(moved, (prior * content + viewer_sums)[0], users, views, others) < best


def test_a_video_watched_by_one_taste_is_placed_near_it_and_not_lifted_for_the_other() -> None:
    users, views, others = groups()
    content = F.normalize(torch.randn(1, DIM, generator=torch.Generator().manual_seed(2)), dim=-1)
    viewer_sums = users[:12].sum(0, keepdim=True)
    sums = fit_fold_in(content, viewer_sums, 1.0, FoldInSoftmax(users, views, others, T))
    embedding = F.normalize(content + sums, dim=-1)[0]
    taste_a, taste_b = users[:40] @ embedding, users[40:] @ embedding
    assert float(taste_a.mean()) > float(taste_b.mean()) + 0.3
    # Calibrated: the views the model expects it to get are of the order of the 12 it got, not of every view.
    rest = torch.logsumexp(users @ others.T / T, dim=1)
    logits = users @ embedding / T
    expected = float((views * torch.exp(logits - torch.logaddexp(rest, logits))).sum())
    assert 4.0 < expected < 36.0


def test_the_prior_is_small_when_content_points_away_from_the_viewers_and_large_when_it_agrees() -> None:
    users, views, others = groups()
    viewed = torch.arange(8).repeat_interleave(5)  # 8 videos, 5 viewers of taste A each, in time order
    states = users[:40]
    sums = torch.zeros(8, DIM).index_add_(0, viewed, states)
    misleading = F.normalize(torch.eye(DIM)[1].expand(8, DIM).clone(), dim=-1)  # content says taste B
    agreeing = F.normalize(torch.eye(DIM)[0].expand(8, DIM).clone(), dim=-1)  # content says taste A
    softmax = FoldInSoftmax(users, views, others, T)
    low = pick_fold_in_prior(misleading, sums, viewed, states, softmax)
    high = pick_fold_in_prior(agreeing, sums, viewed, states, softmax)
    assert low < high
    assert low <= 2.0
    # One view per video leaves nothing to hold out: content counts as one view.
    single = torch.arange(8)
    assert pick_fold_in_prior(agreeing, sums, single, states[:8], softmax) == DEFAULT_FOLD_IN_PRIOR
