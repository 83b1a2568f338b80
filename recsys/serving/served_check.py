"""Served == evaluated: whether the ranking the served model returns is the ranking `recsys evaluate` scores.

The served model ranks through the item index over the inner-product form of the one scorer
(user vectors against item vectors, `recsys.twotower.scoring`); evaluation ranks by the scorer's
direct score (`TwoTowerScorer.score`). `served_mismatches` asks both for the same users and
histories and names every user whose top-k differs: the tests assert it names none, and
`benchmarks/quality.py` reports it for every trained dataset.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl

from recsys.errors import check_finite
from recsys.serving.pyfunc_model import Ranker


def served_mismatches(ranker: Ranker, users: list[str], k: int = 10) -> list[str]:
    """The users of `users` (known to the model) whose served top-k differs from the top-k of the scorer's
    scores (`TwoTowerScorer.score`, what evaluate ranks by) for the same histories, seen videos left out."""
    import torch

    from recsys.metrics import mask_excluded, top_k

    recommender = ranker.recommender
    served = ranker.rank(pd.DataFrame({"user_id": users, "k": [k] * len(users)}))
    rows = [recommender.user_lookup[u] for u in users]
    histories = [recommender.histories[r] for r in rows]
    scores = torch.from_numpy(ranker.scorer.score(np.array(rows), histories))  # (B, N)
    check_finite(scores, "the scorer", np.array(rows), "user_idx", "no ranking is made from them")
    mask_excluded(scores, histories)
    best = top_k(scores, k).numpy()  # (B, k)
    return [user for user, ids in zip(users, best, strict=True)
            if served.filter(pl.col("user_id") == user)["item_id"].to_list() != recommender.item_ids[ids].tolist()]
