"""New-video scoring parts on hand-made data: cluster memberships read from content, cluster shares of histories."""

from __future__ import annotations

import numpy as np
import torch

from recsys.models.new_videos import EPSILON, fit_membership, log_cluster_shares


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


def test_cluster_shares_weigh_recent_views_more() -> None:
    membership = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # videos 0, 1 watched; 2 new
    values = torch.tensor([0, 0, 1, 2])  # history A = [0, 0, 1] (oldest first), history B = [2]
    lengths = torch.tensor([3, 1, 0])  # and an empty history C
    shares = torch.exp(log_cluster_shares(membership, values, lengths)) - EPSILON  # (3, 2)
    half = 0.5 ** (1 / 20)
    a = torch.tensor([half**2 + half, 1.0]) / (half**2 + half + 1)
    torch.testing.assert_close(shares[0], a)
    torch.testing.assert_close(shares[1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(shares[2], torch.tensor([0.0, 0.0]), atol=1e-6, rtol=0)
