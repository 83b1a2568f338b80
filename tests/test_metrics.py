"""Ranking metrics on rankings small enough to check by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.metrics import (
    CoverageCounter,
    mask_excluded,
    metrics_from_ranks,
    target_ranks,
    top_k,
)


def test_target_rank_counts_higher_scores_and_ties_before_the_target() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.7],  # target 2 (0.5): beaten by items 0 and 3
            [0.2, 0.2, 0.2, 0.2],  # all tied: items 0..2 come first by index
            [0.2, 0.2, 0.2, 0.2],  # all tied, target 0 is first
            [0.0, 1.0, 1.0, 0.5],  # target 2 tied with item 1 which has the lower index
        ]
    )
    ranks = target_ranks(scores, torch.tensor([2, 3, 0, 2]))
    assert ranks.tolist() == [2, 3, 0, 1]


def test_hr_ndcg_mrr_from_ranks_by_hand() -> None:
    ranks = torch.tensor([0, 1, 9, 10, 49, 50])
    m = metrics_from_ranks(ranks, ks=(10, 50))
    assert m["hr@10"].tolist() == [1, 1, 1, 0, 0, 0]
    assert m["hr@50"].tolist() == [1, 1, 1, 1, 1, 0]
    expected_ndcg10 = [1.0, 1 / math.log2(3), 1 / math.log2(11), 0, 0, 0]
    assert m["ndcg@10"].tolist() == pytest.approx(expected_ndcg10)
    assert m["ndcg@50"][4].item() == pytest.approx(1 / math.log2(51))
    assert m["mrr@10"].tolist() == pytest.approx([1.0, 0.5, 0.1, 0, 0, 0])
    assert m["mrr@50"][3].item() == pytest.approx(1 / 11)


def test_excluded_items_drop_out_of_the_ranking_but_the_target_stays() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    targets = torch.tensor([3])
    # Items 0 and 1 were watched before (excluded); item 3 was watched before too but is the target.
    mask_excluded(scores, [np.array([0, 1, 3])], keep=targets)
    assert scores[0, :2].isneginf().all() and scores[0, 3].item() == 2.0
    assert target_ranks(scores, targets).tolist() == [1]  # only item 2 is left above it


def test_top_k_is_best_first_with_ties_to_the_lower_index() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0]])
    assert top_k(scores, 4).tolist() == [[1, 2, 4, 5]]
    generator = torch.Generator().manual_seed(0)
    tied = torch.randint(0, 5, (64, 300), generator=generator).float()  # many ties
    reference = torch.sort(tied, dim=1, descending=True, stable=True).indices[:, :20]
    assert torch.equal(top_k(tied, 20), reference)
    # The rank of the item at position p of the top-k list is p: metrics and lists agree.
    assert (target_ranks(tied, reference[:, 7]) == 7).all()


def test_coverage_counts_items_shown_in_any_top_k_list() -> None:
    counter = CoverageCounter(n_items=10, ks=(1, 2))
    counter.update(torch.tensor([[9.0, 8.0] + [0.0] * 8, [0.0, 8.0, 9.0] + [0.0] * 7]))
    assert counter.result() == {"coverage@1": pytest.approx(0.2), "coverage@2": pytest.approx(0.3)}
