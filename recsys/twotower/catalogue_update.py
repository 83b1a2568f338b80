"""A trained two-tower model grown without a gradient step: new videos, and views after its training.

- `with_videos`: the catalogue gets M more rows (or new content for existing ones). A new video is
  embedded by the item tower from its content alone, as every video without training
  interactions is (`ItemTower`); its cluster membership comes from the same logistic read-out of
  content that training fitted (`recsys.twotower.new_videos.fit_membership`), refitted here on the
  watched videos' content and clusters, which no update changes.
- `with_views`: views after the training cut-off become more fresh views
  (`recsys.twotower.fresh_views`): they change every video's fresh popularity, and the views of a
  video without training interactions sharpen its cluster membership by the viewers' cluster
  shares (Bayes' rule, as `add_fresh_viewers` does at training time).

Both return a new `TwoTower`; the model passed in is left as it was.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from recsys.twotower.new_videos import MIN_PROBABILITY, content_clusters, log_cluster_shares
from recsys.twotower.towers import TwoTower

ITEM_ROWS = ("sparse.item_embeddings.embeddings.item.weight", "item_tower.content", "item_tower.known_items",
             "cluster_membership")
"""State entries with one row per catalogue video."""


def _grown(model: TwoTower, n_items: int, fresh: tuple[torch.Tensor, torch.Tensor]) -> TwoTower:
    """A copy of `model` for `n_items` videos (new rows zero) holding the fresh views `fresh`."""
    spec = dataclasses.replace(model.spec, n_items=n_items, fresh_views=len(fresh[0]))
    content = torch.zeros(n_items, spec.content_dim) if spec.content_dim else None
    grown = TwoTower(spec, content=content, known_items=torch.zeros(n_items, dtype=torch.bool), fresh_views=fresh)
    state = grown.state_dict()
    for name, value in model.state_dict().items():
        if name in ("fresh_view_users", "fresh_view_items"):
            continue
        if name in ITEM_ROWS:
            state[name][: len(value)] = value
        else:
            state[name] = value
    grown.load_state_dict(state)
    return grown.eval()


def membership_of_content(model: TwoTower, content: np.ndarray) -> np.ndarray:
    """(M, K) cluster probabilities of videos with content `content` (M, C), read as training read new videos'.

    The watched videos keep the one-hot k-means clusters training gave them; the logistic read-out
    from content to cluster is fitted on them again (`content_clusters`: deterministic, and nothing
    an update does changes its inputs).
    """
    membership = model.cluster_membership.numpy()  # (N, K)
    watched = np.flatnonzero(model.item_tower.known_items.numpy() & (membership.sum(1) > 0))
    return content_clusters(model.item_tower.content.numpy()[watched], membership[watched].argmax(1), content,
                            membership.shape[1])


@torch.no_grad()
def with_videos(model: TwoTower, content: np.ndarray, rows: np.ndarray) -> TwoTower:
    """The model with content `content` (M, C) at catalogue rows `rows` (M,): rows >= n_items are new videos.

    New rows must follow the catalogue without gaps (n_items, n_items + 1, ...). An existing row
    keeps its ID embedding and training status, and takes the new content (its video or title changed).
    """
    if not model.spec.content_dim:
        raise ValueError("this model has no content encoder, so it cannot embed videos it never trained on; "
                         "train it with content (--content auto) to add videos without retraining")
    if content.shape[1] != model.spec.content_dim:
        raise ValueError(f"content of width {content.shape[1]}, the model reads {model.spec.content_dim}")
    n_old = model.spec.n_items
    new_rows = np.sort(rows[rows >= n_old])
    if not np.array_equal(new_rows, np.arange(n_old, n_old + len(new_rows))):
        raise ValueError(f"new videos must take rows {n_old}..{n_old + len(new_rows) - 1}")
    grown = _grown(model, n_old + len(new_rows), (model.fresh_view_users, model.fresh_view_items))
    index = torch.from_numpy(rows.astype(np.int64))
    grown.item_tower.content[index] = torch.from_numpy(content.astype(np.float32))
    unknown = rows[~grown.item_tower.known_items.numpy()[rows]]  # new, or existing but never trained on
    if grown.spec.taste_clusters and len(unknown):
        probabilities = membership_of_content(model, grown.item_tower.content.numpy()[unknown])
        grown.cluster_membership[torch.from_numpy(unknown)] = torch.from_numpy(probabilities)
    return grown


@torch.no_grad()
def with_views(model: TwoTower, users: np.ndarray, items: np.ndarray, histories: list[np.ndarray]) -> TwoTower:
    """The model with V more fresh views: `users` (V,) user_idx (-1: a user the model does not know),
    `items` (V,) item_idx, and each viewer's history before the view (item_idx, oldest first)."""
    fresh = (torch.cat([model.fresh_view_users, torch.from_numpy(users.astype(np.int64))]),
             torch.cat([model.fresh_view_items, torch.from_numpy(items.astype(np.int64))]))
    grown = _grown(model, model.spec.n_items, fresh)
    membership = grown.cluster_membership  # (N, K)
    new = ~grown.item_tower.known_items[torch.from_numpy(items.astype(np.int64))]  # (V,)
    if grown.spec.taste_clusters and bool(new.any()) and bool(membership.any()):
        viewed = torch.from_numpy(items.astype(np.int64))[new]
        chosen = [torch.from_numpy(np.asarray(h, dtype=np.int64)[-grown.spec.max_history:])
                  for h, n in zip(histories, new.tolist(), strict=True) if n]
        values = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)
        log_shares = log_cluster_shares(membership, values, torch.tensor([len(h) for h in chosen]))  # (V', K)
        evidence = torch.zeros_like(membership).index_add_(0, viewed, log_shares)
        touched = torch.unique(viewed)
        membership[touched] = torch.softmax(torch.log(membership[touched].clamp(min=MIN_PROBABILITY))
                                            + evidence[touched], dim=1)
    return grown
