"""`recommend --explain`: the history video behind each recommendation and the shares of its score."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from recsys.cli import main
from recsys.data.paths import PreparedPaths
from recsys.serving.recommend import Recommender, UnknownUserWarning
from recsys.twotower.explain import SHARES, embedding_parts, score_terms
from recsys.twotower.towers import TwoTower, TwoTowerSpec
from recsys.twotower.trained_model import NEW_VIDEO_SCORING, TwoTowerScorer, save_trained
from tests.evaluation.grouped_data import COLD_ITEM, UNWATCHED_ITEM, USERS, build_prepared, group_of_item

SCORING = {"weight": 0.5, "taste_weight": 0.2, "bias": 0.3, "fresh_weight": 0.1, "watched_fresh_weight": 0.05}
"""New-video coefficients with every term switched on."""


def explained_model(paths: PreparedPaths) -> tuple[TwoTower, dict[str, dict[str, float]]]:
    """A two-tower model with IDs, content (each video's group, noisy) and cluster tastes, untrained."""
    torch.manual_seed(0)
    items = pl.read_parquet(paths.items).sort("item_idx")
    groups = np.array([group_of_item(int(i)) for i in items["item_id"]])
    content = torch.from_numpy(np.eye(4)[groups] + np.random.default_rng(0).normal(0, 0.1, (len(groups), 4)))
    known = torch.from_numpy(items["train_count"].to_numpy() > 0)
    spec = TwoTowerSpec(n_users=USERS, n_items=len(groups), dim=8, max_history=10, content_dim=4,
                        content_source="fused", taste_clusters=4)
    model = TwoTower(spec, content=content.float(), known_items=known).eval()
    model.cluster_membership.copy_(torch.from_numpy(np.eye(4)[groups]).float())
    return model, {NEW_VIDEO_SCORING: SCORING}


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> PreparedPaths:
    return build_prepared(tmp_path_factory.mktemp("grouped"))


@pytest.fixture(scope="module")
def recommender(paths: PreparedPaths) -> Recommender:
    model, info = explained_model(paths)
    return Recommender(paths, model=TwoTowerScorer(model, info=info), index_kind="exact")


def test_embedding_parts_add_up_to_the_item_embeddings(recommender: Recommender) -> None:
    scorer = recommender.model
    assert isinstance(scorer, TwoTowerScorer)
    parts = embedding_parts(scorer, np.arange(scorer.n_items))  # (N, 3, D)
    np.testing.assert_allclose(parts.sum(1), scorer.item_embeddings(), atol=1e-5)
    cold = recommender.item_lookup[COLD_ITEM]
    assert not parts[cold, 0].any() and parts[cold, 1].any()  # a cold video has no ID part


def test_terms_add_up_to_the_score_the_ranking_shows(recommender: Recommender) -> None:
    user = recommender.user_lookup["3"]
    ranking = recommender.recommend("3", k=1000)
    items = np.array([recommender.item_lookup[i] for i in ranking["item_id"]])[None, :]
    query = recommender.model.user_vectors(np.array([user]), [recommender.histories[user]])
    terms = score_terms(recommender.model, query, items)  # type: ignore[arg-type]
    np.testing.assert_allclose(terms.total()[0], ranking["score"].to_numpy(), atol=1e-5)
    assert np.abs(terms.popularity).max() < 1e-6  # this model holds no fresh views
    assert np.abs(terms.collaborative).sum() > 0 and np.abs(terms.content).sum() > 0


def test_explanation_names_a_watched_video_and_shares_add_up_to_one(recommender: Recommender) -> None:
    user = "3"
    ranking = recommender.recommend(user, k=1000, explain=True)
    watched = set(recommender.item_ids[recommender.histories[recommender.user_lookup[user]]])
    assert set(ranking["because_of"]) <= watched
    shares = ranking.select([f"share_{name}" for name in SHARES]).to_numpy()
    np.testing.assert_allclose(shares.sum(1), 1.0, atol=1e-5)
    # The history video named is the one nearest in the item space.
    first = ranking.row(0, named=True)
    unit = recommender.unit_items
    cosine = {v: float(unit[recommender.item_lookup[first["item_id"]]] @ unit[recommender.item_lookup[v]])
              for v in watched}
    assert first["because_of"] == max(cosine, key=cosine.__getitem__)
    # Videos never seen in training are ranked from their content, and only they are.
    cold = set(ranking.filter(pl.col("from_content"))["item_id"])
    assert cold == {COLD_ITEM, UNWATCHED_ITEM} - watched
    for row in ranking.filter(pl.col("from_content")).iter_rows(named=True):
        assert row["reason"].startswith("new video ranked from its content")
        assert row["share_content"] > 0


def test_unknown_user_explanation_is_popularity(recommender: Recommender) -> None:
    with pytest.warns(UnknownUserWarning):
        ranking = recommender.recommend("nobody", k=3, explain=True)
    assert ranking["share_popularity"].to_list() == [1.0, 1.0, 1.0]
    assert ranking["because_of"].to_list() == [None, None, None]


def test_cli_explain_table_and_json(paths: PreparedPaths, capsys: pytest.CaptureFixture[str]) -> None:
    model, info = explained_model(paths)
    save_trained(model, paths.root.parent, paths.root.name, "run-explain", info)
    base = ["recommend", "--user-id", "3", "-k", "3", "--processed-dir", str(paths.root.parent), "--explain",
            "--run-id", "run-explain"]
    assert main(base) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 and all(line.strip().startswith("why: ") for line in lines[2::2])
    assert main([*base, "--output", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and {"because_of", "share_content", "from_content", "reason"} <= set(rows[0])
    watched = Recommender(paths).histories[Recommender(paths).user_lookup["3"]]
    ids = pl.read_parquet(paths.items).sort("item_idx")["item_id"].to_numpy()
    assert {row["because_of"] for row in rows} <= set(ids[watched])
