"""The two towers and their TorchRec inputs: shapes, order sensitivity, cold items, unknown users."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.twotower.sparse import HISTORY_FEATURE, ITEM_FEATURE, USER_FEATURE, collate_histories
from recsys.twotower.towers import TwoTower, TwoTowerSpec

N_USERS, N_ITEMS, DIM, CONTENT = 12, 30, 8, 6


def make_model(encoder: str = "gru", use_ids: bool = True, content_dim: int = CONTENT, seed: int = 0,
               known: torch.Tensor | None = None, dropout: float = 0.1) -> TwoTower:
    torch.manual_seed(seed)
    spec = TwoTowerSpec(n_users=N_USERS, n_items=N_ITEMS, dim=DIM, max_history=5, encoder=encoder,  # type: ignore[arg-type]
                        layers=2 if encoder == "attention" else 1, use_ids=use_ids, content_dim=content_dim,
                        content_source="title" if content_dim else "none", dropout=dropout)
    content = torch.randn(N_ITEMS, content_dim) if content_dim else None
    return TwoTower(spec, content=content, known_items=known).eval()


def users(model: TwoTower, user_idx: list[int], histories: list[list[int]]) -> torch.Tensor:
    features = collate_histories(np.array(user_idx), None, [np.array(h, dtype=np.int64) for h in histories],
                                 model.spec.max_history)
    with torch.no_grad():
        return model.user_embeddings(features)


def items(model: TwoTower, ids: list[int]) -> torch.Tensor:
    features = collate_histories(None, np.array(ids), [np.empty(0, np.int64)] * len(ids), model.spec.max_history)
    with torch.no_grad():
        return model.item_embeddings(features)


def test_collate_builds_one_jagged_batch_with_unknown_users_and_truncated_histories() -> None:
    features = collate_histories(np.array([3, -1]), np.array([7, 8]), [np.arange(10), np.array([4])], max_history=5)
    assert features.users.keys() == [USER_FEATURE]
    assert features.users.lengths().tolist() == [1, 0]  # the unknown user has an empty ID bag
    jagged = features.items.to_dict()
    assert jagged[ITEM_FEATURE].values().tolist() == [7, 8]
    assert jagged[HISTORY_FEATURE].lengths().tolist() == [5, 1]
    assert jagged[HISTORY_FEATURE].values().tolist() == [5, 6, 7, 8, 9, 4]  # the most recent five, in order


@pytest.mark.parametrize("encoder", ["gru", "attention"])
def test_towers_embed_into_the_unit_sphere_and_read_history_in_order(encoder: str) -> None:
    model = make_model(encoder)
    u = users(model, [0, 0, 1], [[1, 2, 3, 4], [4, 3, 2, 1], []])
    i = items(model, [0, 5, 29])
    assert u.shape == (3, DIM) and i.shape == (3, DIM)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(i.norm(dim=1), torch.ones(3))
    # Same items, other order: a sequence model must tell them apart.
    assert not torch.allclose(u[0], u[1], atol=1e-4)


@pytest.mark.parametrize("encoder", ["gru", "attention"])
def test_a_users_embedding_does_not_depend_on_the_rest_of_the_batch(encoder: str) -> None:
    model = make_model(encoder)
    alone = users(model, [2], [[5, 6]])
    batched = users(model, [2, 3], [[5, 6], [1, 2, 3, 4, 7, 8]])  # padding to a longer history
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)


def test_cold_items_are_embedded_from_content_alone() -> None:
    known = torch.ones(N_ITEMS, dtype=torch.bool)
    known[[10, 11]] = False
    model = make_model(known=known)
    model.item_tower.content[11] = model.item_tower.content[10]
    before = items(model, [10, 11, 12])
    with torch.no_grad():
        model.sparse.item_embeddings.embeddings["item"].weight.add_(torch.randn(N_ITEMS, DIM))
    after = items(model, [10, 11, 12])
    torch.testing.assert_close(before[:2], after[:2])  # untrained ID rows are never read for cold items
    torch.testing.assert_close(after[0], after[1])  # same content, no ID: same embedding
    assert not torch.allclose(before[2], after[2])  # a warm item does use its ID embedding


def test_unknown_user_is_embedded_from_history_and_id_dropout_hides_user_ids() -> None:
    model = make_model(dropout=0.0)
    unknown = users(model, [-1, -1], [[1, 2, 3], [7, 8, 9]])
    assert not torch.allclose(unknown[0], unknown[1])  # different histories, different users
    with torch.no_grad():
        model.sparse.user_bags.embedding_bags["user"].weight.add_(1.0)
    torch.testing.assert_close(unknown, users(model, [-1, -1], [[1, 2, 3], [7, 8, 9]]))

    model.spec.user_id_dropout, model.spec.item_id_dropout = 0.5, 0.0
    model.train()
    torch.manual_seed(1)
    features = collate_histories(np.full(400, 4), None, [np.array([1, 2])] * 400, 5)
    with torch.no_grad():
        rows = model.user_embeddings(features)
    distinct = torch.unique(rows.round(decimals=5), dim=0)
    assert len(distinct) == 2  # rows with and without the user ID embedding (other dropout is off)


def test_model_variants_content_only_and_id_only() -> None:
    content_only = make_model(use_ids=False)
    assert content_only.sparse.user_bags is None and content_only.sparse.item_embeddings is None
    torch.testing.assert_close(items(content_only, [3])[0].norm(), torch.tensor(1.0))
    id_only = make_model(content_dim=0)
    assert id_only.item_tower.content_proj is None
    with pytest.raises(ValueError, match="needs ID embeddings, content, or both"):
        make_model(use_ids=False, content_dim=0)
