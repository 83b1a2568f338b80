"""The same two-tower model trained sharded over two CPU processes (TorchRec DMP, gloo, torchrun)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from recsys.twotower.train import train_retrieval
from recsys.twotower.trained_model import load_trained
from tests.twotower.test_module import DATASET, quick_config, write_topic_dataset

NDCG_TOLERANCE = 0.1
"""Largest gap allowed between the validation NDCG@10 of sharded and single-process training.

Measured on this dataset and these settings, seeds 0, 1, 2: one process 0.654, 0.635, 0.666 (its best
epoch), two processes 0.592, 0.589, 0.603 (the last epoch), gaps 0.062, 0.045, 0.064. Two processes
are not expected to match exactly: each step averages twice as many targets, so an epoch has half the
steps, and the ID tables learn by row-wise Adagrad instead of AdamW. 0.1 leaves 0.04 of margin over the
largest measured gap, while a sharded run that learnt nothing ranks near chance (NDCG@10 below 0.1
among this catalogue's 66 videos) and falls far outside it."""


@pytest.mark.slow
def test_sharded_training_over_two_processes_trains_like_the_single_process_model(tmp_path: Path) -> None:
    paths = write_topic_dataset(tmp_path)
    settings = {"max_epochs": 4, "batch_size": 32, "learning_rate": 5e-3}
    single = train_retrieval(quick_config(paths, **settings))
    sharded = train_retrieval(quick_config(paths, world_size=2, **settings))

    losses = [epoch["train_loss"] for epoch in sharded.history]
    assert len(losses) == 4
    assert losses[-1] < 0.6 * losses[0]
    logged = mlflow.MlflowClient().get_metric_history(sharded.run_id, "train_loss")
    assert [m.step for m in logged] == [0, 1, 2, 3]

    plan = load_trained(paths.root.parent, DATASET, sharded.run_id).info["sharded"]
    assert plan["world_size"] == 2 and "table_wise" in plan["plan"]

    # The gathered model is an ordinary TwoTower: same files, same embedding shapes, a real ranking.
    one = load_trained(paths.root.parent, DATASET, single.run_id)
    two = load_trained(paths.root.parent, DATASET, sharded.run_id)
    assert two.item_embeddings().shape == one.item_embeddings().shape == (one.n_items, one.dim)
    histories = [np.array([0, 1, 2]), np.array([10, 11])]
    assert two.user_embeddings(np.array([0, -1]), histories).shape == one.user_embeddings(
        np.array([0, -1]), histories).shape == (2, one.dim)
    assert sharded.best_val_ndcg > 0.5  # the topic sequences are learnt under sharding too
    # The same validation NDCG@10 as one process, within NDCG_TOLERANCE.
    assert abs(sharded.best_val_ndcg - single.best_val_ndcg) <= NDCG_TOLERANCE, (sharded.best_val_ndcg,
                                                                                single.best_val_ndcg)
