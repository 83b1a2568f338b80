"""Served == evaluated: the check that the REST ranking is the ranking `recsys evaluate` scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl

from recsys.serving.pyfunc_model import Ranker


def served_equals_scored(ranker: Ranker, users: list[str], k: int = 10) -> None:
    """The served top-k (index over user and item vectors) equals the top-k of the evaluation scorer
    (`TwoTowerScorer.score`, the one evaluate ranks by) for the same users and histories."""
    import torch

    from recsys.metrics import mask_excluded, top_k

    recommender = ranker.recommender
    served = ranker.rank(pd.DataFrame({"user_id": users, "k": [k] * len(users)}))
    rows = [recommender.user_lookup[u] for u in users]
    histories = [recommender.histories[r] for r in rows]
    scores = torch.from_numpy(ranker.scorer.score(np.array(rows), histories))  # (B, N)
    assert torch.isfinite(scores).all()
    mask_excluded(scores, histories)
    best = top_k(scores, k).numpy()  # (B, k)
    for user, ids in zip(users, best, strict=True):
        expected = recommender.item_ids[ids].tolist()
        assert served.filter(pl.col("user_id") == user)["item_id"].to_list() == expected, user
