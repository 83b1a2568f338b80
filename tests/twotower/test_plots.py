"""The figures a two-tower training run logs."""

from __future__ import annotations

from tests.plot_artifacts import plot_artifacts
from tests.tiny_model import TinyModel


def test_a_two_tower_training_run_logs_its_curves_and_item_map(trained_tiny_model: TinyModel) -> None:
    logged = plot_artifacts(trained_tiny_model.result.run_id)
    assert logged == ["plots/item_embeddings.png", "plots/training_curves.png"]
