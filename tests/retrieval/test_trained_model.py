"""Saving and loading a trained two-tower model without pickle, and the scorer's contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.errors import DataFormatError, MissingInputError
from recsys.models.towers import TwoTower, TwoTowerSpec
from recsys.retrieval.trained_model import (
    LATEST_FILE,
    MODEL_FILE,
    TwoTowerScorer,
    load_trained,
    models_dir,
    save_trained,
)


def small_model(seed: int) -> TwoTower:
    torch.manual_seed(seed)
    spec = TwoTowerSpec(n_users=5, n_items=12, dim=8, max_history=4, content_dim=3, content_source="title")
    known = torch.arange(12) < 10  # items 10 and 11 are cold
    return TwoTower(spec, content=torch.randn(12, 3), known_items=known).eval()


def test_a_saved_model_scores_exactly_like_the_trained_one(tmp_path: Path) -> None:
    model = small_model(0)
    folder = save_trained(model, tmp_path, "synth", "run-a", {"best_val_ndcg_10": 0.5})
    assert sorted(p.name for p in folder.iterdir()) == ["item_embeddings.npy", "model.json", "weights.safetensors"]
    loaded = load_trained(tmp_path, "synth")
    assert loaded.run_id == "run-a" and loaded.info["best_val_ndcg_10"] == 0.5
    histories = [np.array([1, 2, 3, 4, 5]), np.array([], dtype=np.int64), np.array([11])]
    users = np.array([0, 4, -1])
    expected = TwoTowerScorer(model).score(users, histories)
    np.testing.assert_allclose(loaded.score(users, histories), expected, rtol=1e-5, atol=1e-6)
    assert loaded.item_embeddings().shape == (12, 8)
    assert loaded.user_embeddings(users, histories).dtype == np.float32


def test_latest_points_at_the_newest_model_and_older_ones_stay_loadable(tmp_path: Path) -> None:
    save_trained(small_model(0), tmp_path, "synth", "run-a")
    save_trained(small_model(1), tmp_path, "synth", "run-b")
    pointer = json.loads((models_dir(tmp_path, "synth") / LATEST_FILE).read_text())
    assert pointer["run_id"] == "run-b"
    assert load_trained(tmp_path, "synth").run_id == "run-b"
    older = load_trained(tmp_path, "synth", "run-a")
    assert not np.allclose(older.item_embeddings(), load_trained(tmp_path, "synth").item_embeddings())


def test_missing_or_foreign_models_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="run `recsys train retrieval synth` first"):
        load_trained(tmp_path, "synth")
    folder = save_trained(small_model(0), tmp_path, "synth", "run-a")
    with pytest.raises(MissingInputError, match="no trained model 'run-x'"):
        load_trained(tmp_path, "synth", "run-x")
    document = json.loads((folder / MODEL_FILE).read_text())
    (folder / MODEL_FILE).write_text(json.dumps({**document, "format": 99}))
    with pytest.raises(DataFormatError, match="model format 99"):
        load_trained(tmp_path, "synth")


def test_scorer_rejects_indices_outside_the_model(tmp_path: Path) -> None:
    scorer = TwoTowerScorer(small_model(0))
    with pytest.raises(DataFormatError, match="user index out of range"):
        scorer.score(np.array([5]), [np.array([1])])
    with pytest.raises(DataFormatError, match="history item index out of range"):
        scorer.score(np.array([0]), [np.array([12])])
    with pytest.raises(ValueError, match="2 user indices but 1 histories"):
        scorer.score(np.array([0, 1]), [np.array([1])])
