"""Fresh-view popularity by hand, and the fast ranking that fits scorings against the full one."""

from __future__ import annotations

import math

import pytest
import torch

from recsys.twotower.batch import RetrievalBatch
from recsys.twotower.fresh_views import FreshViews
from recsys.twotower.new_videos import TargetRanks
from recsys.twotower.validation import rank_of_targets


def test_fresh_popularity_is_the_log_share_of_fresh_views_against_an_even_share() -> None:
    # Four videos, four fresh views: user 0 watched videos 0 and 1, users 1 and 2 video 0.
    fresh = FreshViews(torch.tensor([0, 1, 0, 2]), torch.tensor([0, 0, 1, 0]), n_items=4)
    # log(N (c + 1) / (T + N)) with c = 3, 1, 0, 0 and T = N = 4.
    expected = torch.log(torch.tensor([16 / 8, 8 / 8, 4 / 8, 4 / 8]))
    torch.testing.assert_close(fresh.popularity, expected)
    # A user's own views do not count for them; an unknown user (-1) and one without views see all.
    per_user = fresh.popularity_for(torch.tensor([0, 2, -1, 7]))
    torch.testing.assert_close(per_user[0], torch.log(torch.tensor([12 / 8, 4 / 8, 4 / 8, 4 / 8])))
    torch.testing.assert_close(per_user[1], torch.log(torch.tensor([12 / 8, 8 / 8, 4 / 8, 4 / 8])))
    torch.testing.assert_close(per_user[2], expected)
    torch.testing.assert_close(per_user[3], expected)
    rows, items, change = fresh.own_view_changes(torch.tensor([7, 0]))
    assert rows.tolist() == [1, 1] and sorted(items.tolist()) == [0, 1]
    assert sorted(change.tolist()) == pytest.approx([math.log(1 / 2), math.log(3 / 4)])


def test_target_ranks_match_the_full_ranking_with_exclusions_and_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    n_items, rows = 40, 64
    new = torch.zeros(n_items, dtype=torch.bool)
    new[[3, 17, 18, 30, 39]] = True
    watched_scores = torch.randn(rows, n_items, generator=generator).round(decimals=1)  # ties among watched
    targets = torch.randint(0, n_items, (rows,), generator=generator)
    targets[:20] = torch.tensor([3, 17, 18, 30, 39] * 4)  # new targets too
    pairs = torch.randint(0, n_items, (rows, 6), generator=generator)
    exclude_rows = torch.arange(rows).repeat_interleave(6)
    exclude_items = pairs.reshape(-1)
    keep = exclude_items != targets[exclude_rows]  # the target itself stays rankable
    batch = RetrievalBatch(None, targets, torch.arange(rows), torch.zeros(rows, dtype=torch.long),  # type: ignore[arg-type]
                           exclude_rows[keep], exclude_items[keep])
    ranks = TargetRanks(watched_scores, batch, new)
    for new_scores in (torch.randn(rows, 5, generator=generator), torch.zeros(rows, 5),  # all new videos tie
                       watched_scores[:, new] + 0.05):
        full = watched_scores.clone()
        full[:, new] = new_scores
        expected = rank_of_targets(full, targets, batch.exclude_rows, batch.exclude_items)
        assert torch.equal(ranks.ranks(new_scores), expected)


def test_popularity_before_a_time_counts_only_the_earlier_fresh_views() -> None:
    generator = torch.Generator().manual_seed(1)
    users = torch.randint(0, 20, (200,), generator=generator)
    items = torch.randint(0, 15, (200,), generator=generator)
    times = torch.randint(0, 50, (200,), generator=generator)
    fresh = FreshViews(users, items, n_items=15, times=times)
    before = torch.tensor([0, 25, 49, 50, 10, 25])
    got = fresh.popularity_before(before)
    for row, t in enumerate(before.tolist()):
        earlier = items[times < t]
        by_hand = FreshViews(users[times < t], earlier, n_items=15).popularity  # the fresh views up to then
        torch.testing.assert_close(got[row], by_hand)
    torch.testing.assert_close(got[3], fresh.popularity)  # after the last view: all of them
    torch.testing.assert_close(got[0], torch.zeros(15))  # before the first: an even share for every video
