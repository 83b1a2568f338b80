"""The figures of a two-tower training run: its per-epoch curves and its item embeddings in 2-D."""

from __future__ import annotations

import polars as pl

from recsys.data.paths import PreparedPaths
from recsys.synthetic.truth import truth_items
from recsys.tracking.plots import embedding_map, item_labels, log_figure, log_training_curves
from recsys.twotower.towers import TwoTower
from recsys.twotower.validation import catalogue_embeddings


def log_retrieval_plots(run_id: str, model: TwoTower, paths: PreparedPaths) -> None:
    """Log a two-tower training run's figures into run `run_id` (open or not, so that rank 0 of sharded
    training can log through a client): its per-epoch curves (`plots/training_curves.png`) and the
    trained item embeddings in 2-D (`plots/item_embeddings.png`), coloured by latent topic on the
    synthetic corpus and by first genre elsewhere."""
    dataset = paths.root.name
    log_training_curves(run_id, title=f"{dataset}: two-tower training")
    items = pl.read_parquet(paths.items).sort("item_idx")
    embeddings = catalogue_embeddings(model.eval()).numpy()  # (N, D), cold items from their content
    labels = item_labels(items, truth_items(paths))
    log_figure(embedding_map(embeddings, labels, title=f"{dataset}: two-tower item embeddings"), "item_embeddings",
               run_id)
