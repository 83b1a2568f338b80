"""Saving and loading a trained two-tower model without pickle, and the scorer's contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from recsys.errors import DataFormatError, MissingInputError
from recsys.twotower.towers import TwoTower, TwoTowerSpec
from recsys.twotower.trained_model import (
    LATER_BUFFERS,
    LATEST_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
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


def test_a_model_saved_before_the_later_buffers_still_loads_and_a_mismatched_one_does_not(tmp_path: Path) -> None:
    model = small_model(0)
    folder = save_trained(model, tmp_path, "synth", "run-a", {"cold_item_bias": 0.25})
    # What a model trained before cluster memberships and fresh views were saved looks like.
    document = json.loads((folder / MODEL_FILE).read_text())
    for key in ("taste_clusters", "fresh_views"):
        del document["spec"][key]
    (folder / MODEL_FILE).write_text(json.dumps(document))
    weights = load_file(folder / WEIGHTS_FILE)
    save_file({name: t for name, t in weights.items() if name not in LATER_BUFFERS}, folder / WEIGHTS_FILE)
    histories = [np.array([1, 2, 3]), np.array([11])]
    plain = TwoTowerScorer(model).score(np.array([0, -1]), histories)
    legacy = load_trained(tmp_path, "synth").score(np.array([0, -1]), histories)
    np.testing.assert_allclose(legacy - plain, np.broadcast_to(0.25 * (np.arange(12) >= 10), plain.shape), atol=1e-5)
    # A weights file missing anything else, or holding more, does not fit its model.json.
    save_file({name: t for name, t in weights.items() if "sparse" not in name}, folder / WEIGHTS_FILE)
    with pytest.raises(DataFormatError, match="does not fit its model.json: missing"):
        load_trained(tmp_path, "synth")


def test_scorer_rejects_indices_outside_the_model(tmp_path: Path) -> None:
    scorer = TwoTowerScorer(small_model(0))
    with pytest.raises(DataFormatError, match="user index out of range"):
        scorer.score(np.array([5]), [np.array([1])])
    with pytest.raises(DataFormatError, match="history item index out of range"):
        scorer.score(np.array([0]), [np.array([12])])
    with pytest.raises(ValueError, match="2 user indices but 1 histories"):
        scorer.score(np.array([0, 1]), [np.array([1])])
