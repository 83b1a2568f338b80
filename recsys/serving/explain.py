"""Why each video is recommended: the history video behind it and what its score is made of.

For every recommended video, `explain_ranking` adds to a ranking:

- `because_of`, `because_of_title`: the video of the user's history nearest to it in the item
  space (cosine of the model's item embeddings), the one that pulled it up the most;
- `share_collaborative`, `share_content`, `share_popularity`, `share_offset`: how much of its
  score each group of terms makes, from the terms of the one scorer
  (`recsys.twotower.explain.score_terms`; they add up to 1);
- `from_content`: the video has no trained ID embedding (a new or cold video), so it was ranked
  from what its content shows and sounds like;
- `reason`: the above as one sentence, for the CLI table and the REST response.

A popularity fallback (an unknown user without a history) is explained as such.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys.config import ConfigError
from recsys.twotower.explain import SHARES, score_terms
from recsys.twotower.trained_model import TwoTowerScorer

EXPLANATION_SCHEMA: dict[str, type[pl.DataType] | pl.DataType] = {
    "because_of": pl.String,
    "because_of_title": pl.String,
    **{f"share_{name}": pl.Float32 for name in SHARES},
    "from_content": pl.Boolean,
    "reason": pl.String,
}
"""Columns `explain_ranking` and `explain_popular` add to a ranking."""


def explain_ranking(
    ranking: pl.DataFrame,
    scorer: object,
    user_vector: np.ndarray,
    items: np.ndarray,
    history: np.ndarray,
    unit_items: np.ndarray,
    item_ids: np.ndarray,
    titles: np.ndarray,
) -> pl.DataFrame:
    """`ranking` of videos `items` (k,) for one user (`user_vector` (1, D')) with the explanation columns.

    `history`: the item indices the user watched; `unit_items` (N, D): unit item embeddings.
    """
    if not isinstance(scorer, TwoTowerScorer):
        raise ConfigError("explanations need the trained two-tower model (`recsys train retrieval` first)")
    items = np.asarray(items, dtype=np.int64)
    terms = score_terms(scorer, user_vector, items[None, :])
    shares = terms.shares()[0]  # (k, 4)
    watched = np.unique(np.asarray(history, dtype=np.int64))
    nearest = np.full(len(items), -1, dtype=np.int64)
    if len(watched) and len(items):
        cosine = unit_items[items] @ unit_items[watched].T  # (k, H)
        nearest = watched[cosine.argmax(axis=1)]  # (k,)
    because = [str(item_ids[i]) if i >= 0 else None for i in nearest]
    because_titles = [str(titles[i]) if i >= 0 else None for i in nearest]
    from_content = terms.from_content[0]
    reasons = [_reason(row, cold, vid, title) for row, cold, vid, title
               in zip(shares, from_content, because, because_titles, strict=True)]
    columns = {
        "because_of": because,
        "because_of_title": because_titles,
        **{f"share_{name}": shares[:, j] for j, name in enumerate(SHARES)},
        "from_content": from_content,
        "reason": reasons,
    }
    return ranking.hstack(pl.DataFrame(columns, schema=EXPLANATION_SCHEMA))


def explain_popular(ranking: pl.DataFrame) -> pl.DataFrame:
    """A popularity ranking with the explanation columns: all of its score is popularity."""
    n = ranking.height
    columns = {
        "because_of": [None] * n,
        "because_of_title": [None] * n,
        **{f"share_{name}": [float(name == "popularity")] * n for name in SHARES},
        "from_content": [False] * n,
        "reason": ["among the most watched videos (no watch history to go by)"] * n,
    }
    return ranking.hstack(pl.DataFrame(columns, schema=EXPLANATION_SCHEMA))


def _reason(shares: np.ndarray, from_content: bool, because: str | None, title: str | None) -> str:
    parts = ", ".join(f"{name} {share:.0%}" for name, share in zip(SHARES, shares, strict=True) if share >= 0.005)
    origin = "new video ranked from its content" if from_content else f"mostly {SHARES[int(np.argmax(shares))]}"
    near = f"; closest to {because} ({title}) you watched" if because is not None else ""
    return f"{origin} ({parts}){near}"
