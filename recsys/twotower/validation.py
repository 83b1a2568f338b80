"""How the two-tower model is validated: full-ranking NDCG@K/HR@K of held-out targets (no Lightning).

Checkpoint selection, early stopping and the new-video coefficient fit all rank with these, by the
score that is served (`recsys.twotower.scoring`) with the coefficients in force at the time: the
default `NewVideoScoring` during training, the fitted one after.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from recsys.metrics import mask_pairs, metrics_from_ranks, target_ranks
from recsys.twotower.batch import RetrievalBatch
from recsys.twotower.scoring import ItemState, NewVideoScoring, UserState, score
from recsys.twotower.sparse import collate
from recsys.twotower.towers import TwoTower

K = 10
"""Cut-off of the validation metrics."""
VAL_METRIC = "val_ndcg_10"
"""The metric that picks the best checkpoint and stops training (MLflow names allow no '@')."""


def rank_of_targets(scores: torch.Tensor, targets: torch.Tensor, exclude_rows: torch.Tensor,
                    exclude_items: torch.Tensor) -> torch.Tensor:
    """0-based rank (B,) of each row's target among all items (B, N), excluded pairs (E,) pushed to the end.

    The ranking of `recsys.evaluation` (`recsys.metrics`): ties go to the lower item index, so equal
    scores earn no credit. `scores` is left as it is.
    """
    scores = scores.clone()
    mask_pairs(scores, exclude_rows, exclude_items)
    return target_ranks(scores, targets)


def ndcg_and_hits(scores: torch.Tensor, batch: RetrievalBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """NDCG@K and HR@K (B,) of each row's target in the full ranking by scores (B, N)."""
    rank = rank_of_targets(scores, batch.targets, batch.exclude_rows, batch.exclude_items)  # (B,)
    metrics = metrics_from_ranks(rank, (K,))
    return metrics[f"ndcg@{K}"], metrics[f"hr@{K}"]


def ranking_metrics(model: TwoTower, items: ItemState, batch: RetrievalBatch, scoring: NewVideoScoring
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """NDCG@K and HR@K (B,) of each row's target in the full ranking of `items` by the served score."""
    users = UserState.of(model, batch.features, scoring.uses_taste(), batch.times)
    return ndcg_and_hits(score(users, items, scoring), batch)


@torch.no_grad()
def catalogue_embeddings(model: TwoTower, device: torch.device | str = "cpu", chunk: int = 4096) -> torch.Tensor:
    """(N, D) item tower over the whole catalogue, in chunks."""
    n_items = model.spec.n_items
    parts = []
    for start in range(0, n_items, chunk):
        ids = np.arange(start, min(start + chunk, n_items))
        features = collate(None, ids, np.empty(0, np.int64), np.zeros(len(ids), np.int64)).to(device)
        parts.append(model.item_embeddings(features))  # (b, D)
    return torch.cat(parts)  # (N, D)


@torch.no_grad()
def validate(model: TwoTower, batches: Iterable[RetrievalBatch], scoring: NewVideoScoring | None = None
             ) -> dict[str, float]:
    """Mean NDCG@K and HR@K of a model (in eval mode) over validation batches, full ranking by the score.

    `scoring`: the coefficients of the score; None for the default (cosine alone), as in training.
    """
    scoring = scoring if scoring is not None else NewVideoScoring()
    was_training = model.training
    model.eval()
    items = ItemState.of(model, catalogue_embeddings(model))
    ndcg_sum = hit_sum = rows = 0.0
    for batch in batches:
        ndcg, hit = ranking_metrics(model, items, batch, scoring)  # (B,), (B,)
        ndcg_sum, hit_sum, rows = ndcg_sum + float(ndcg.sum()), hit_sum + float(hit.sum()), rows + len(batch)
    model.train(was_training)
    return {VAL_METRIC: ndcg_sum / max(rows, 1), "val_hr_10": hit_sum / max(rows, 1)}
