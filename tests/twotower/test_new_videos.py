"""New-video scoring parts on hand-made data: cluster memberships read from content and sharpened by fresh
viewers, cluster shares of histories."""

from __future__ import annotations

import numpy as np
import torch

from recsys.twotower.batch import RetrievalBatch
from recsys.twotower.new_videos import add_fresh_viewers, fit_membership
from recsys.twotower.scoring import EPSILON, log_cluster_shares, own_view_taste_changes
from recsys.twotower.sparse import HISTORY_FEATURE, collate


def test_new_videos_get_the_cluster_their_content_points_to() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(3), 40)  # (120,) three groups of videos watched by different people
    centres = np.eye(3) * 5
    embeddings = centres[groups] + rng.normal(0, 0.3, (120, 3))  # (120, 3) the trained item embeddings
    # The content shows the group in its first three columns, among noise columns.
    content = np.hstack([np.eye(3)[groups] + rng.normal(0, 0.2, (120, 3)), rng.normal(0, 1, (120, 5))])
    known = np.ones(120, bool)
    known[[0, 1, 40, 41, 80, 81]] = False  # two new videos per group; their embeddings are not trusted
    embeddings[~known] = rng.normal(0, 1, (6, 3))
    membership = fit_membership(embeddings, known, content, clusters=3)
    assert membership.shape == (120, 3)
    # Watched videos belong to one cluster each, and the clusters are the groups.
    assert set(np.unique(membership[known])) == {0.0, 1.0}
    cluster_of = membership[known].argmax(axis=1)
    assert all(len(set(cluster_of[groups[known] == g])) == 1 for g in range(3))
    # New videos: probabilities, highest for their group's cluster, read from content alone.
    np.testing.assert_allclose(membership[~known].sum(axis=1), 1.0, atol=1e-5)
    group_cluster = {g: cluster_of[groups[known] == g][0] for g in range(3)}
    assert [membership[i].argmax() for i in np.flatnonzero(~known)] == [group_cluster[g] for g in groups[~known]]
    assert membership[~known].max(axis=1).min() > 0.8


def test_too_few_watched_videos_leave_memberships_empty() -> None:
    known = np.array([True, False, False])
    membership = fit_membership(np.eye(3), known, np.eye(3), clusters=4)
    assert membership.shape == (3, 4) and not membership.any()


def test_cluster_shares_count_every_view_of_a_history_alike() -> None:
    membership = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # videos 0, 1 watched; 2 new
    values = torch.tensor([0, 0, 1, 2])  # history A = [0, 0, 1] (oldest first), history B = [2]
    lengths = torch.tensor([3, 1, 0])  # and an empty history C
    shares = torch.exp(log_cluster_shares(membership, values, lengths)) - EPSILON  # (3, 2)
    torch.testing.assert_close(shares[0], torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(shares[1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(shares[2], torch.tensor([0.0, 0.0]), atol=1e-6, rtol=0)


def test_a_model_saved_with_the_removed_recency_half_life_still_loads() -> None:
    from recsys.twotower.towers import TwoTowerSpec

    spec = TwoTowerSpec(n_users=3, n_items=4, taste_clusters=2)
    assert TwoTowerSpec.from_dict({**spec.to_dict(), "taste_half_life": 20.0}) == spec


def fresh_view_batch(histories: list[list[int]], viewed: list[int]) -> RetrievalBatch:
    """One row per fresh view: the viewer's history before it, the viewed video as target."""
    values = np.concatenate([np.array(h, np.int64) for h in histories])
    lengths = np.array([len(h) for h in histories], np.int64)
    targets = torch.tensor(viewed)
    features = collate(np.arange(len(viewed)), targets.numpy(), values, lengths)
    empty = torch.empty(0, dtype=torch.long)
    return RetrievalBatch(features, targets, torch.arange(len(viewed)), torch.from_numpy(lengths), empty, empty)


def test_fresh_viewers_sharpen_a_new_videos_cluster_and_a_users_own_view_comes_out_again() -> None:
    membership = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.4], [0.5, 0.5]])  # 0, 1 watched; 2, 3 new
    new = torch.tensor([False, False, True, True])
    # Video 2's content leans to cluster 0, but its two fresh viewers watch cluster 1 (video 1) almost only.
    batch = fresh_view_batch([[1, 1, 1, 0], [1, 1]], viewed=[2, 2])
    updated = add_fresh_viewers(membership, new, [batch])
    torch.testing.assert_close(updated[:2], membership[:2])  # watched videos keep theirs
    torch.testing.assert_close(updated[3], membership[3])  # nobody watched video 3 yet
    history = batch.features.items[HISTORY_FEATURE]
    log_shares = log_cluster_shares(membership, history.values(), history.lengths())  # (2, 2)
    by_hand = torch.softmax(torch.log(membership[2]) + log_shares.sum(0), dim=0)
    torch.testing.assert_close(updated[2], by_hand)
    assert updated[2, 1] > 0.99
    # Ranking for the second viewer, their own view leaves video 2's membership: only the first remains.
    change = own_view_taste_changes(updated[[2]], log_shares[[1]])
    without = torch.softmax(torch.log(membership[2]) + log_shares[0], dim=0)
    torch.testing.assert_close(change, ((without - updated[2]) * log_shares[1]).sum()[None])
