"""A trained two-tower model grown without a gradient step: new videos, and views after its training.

- `with_videos`: the catalogue gets M more rows (or new content for existing ones). A new video is
  embedded by the item tower from its content alone, as every video without training
  interactions is (`ItemTower`); its cluster membership comes from the same logistic read-out of
  content that training fitted (`recsys.twotower.new_videos.fit_membership`), refitted here on the
  watched videos' content and clusters, which no update changes.
- `with_views`: views after the training cut-off become more fresh views
  (`recsys.twotower.fresh_views`): they change every video's fresh popularity (earlier views, sent
  late, extend histories but are not fresh: they say nothing of what is watched now). A video without
  training interactions that gets views is folded in: embedded from its viewers' user embeddings
  (and its content), and from then on scored like a watched video (`ItemTower.forward`).

Both return a new `TwoTower`; the model passed in is left as it was.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from recsys.twotower.new_videos import content_clusters
from recsys.twotower.sparse import collate_histories
from recsys.twotower.towers import TwoTower

ITEM_ROWS = ("sparse.item_embeddings.embeddings.item.weight", "item_tower.content", "item_tower.known_items",
             "cluster_membership")
"""State entries with one row per catalogue video."""
FOLDED = ("item_tower.folded_items", "item_tower.folded_sums")
"""State entries of the videos embedded from their viewers (`ItemTower` fold-in)."""


def _grown(model: TwoTower, n_items: int, fresh: tuple[torch.Tensor, torch.Tensor],
           folded: tuple[torch.Tensor, torch.Tensor] | None = None, **spec_changes: float) -> TwoTower:
    """A copy of `model` for `n_items` videos (new rows zero) holding the fresh views `fresh` and, when given,
    the fold-in (items, viewer sums) `folded`."""
    tower = model.item_tower
    folded = folded or (tower.folded_items, tower.folded_sums)
    spec = dataclasses.replace(model.spec, n_items=n_items, fresh_views=len(fresh[0]), folded_items=len(folded[0]),
                               **spec_changes)
    content = torch.zeros(n_items, spec.content_dim) if spec.content_dim else None
    grown = TwoTower(spec, content=content, known_items=torch.zeros(n_items, dtype=torch.bool), fresh_views=fresh)
    state = grown.state_dict()
    replaced = dict(zip(FOLDED, folded, strict=True))
    for name, value in model.state_dict().items():
        if name in ("fresh_view_users", "fresh_view_items"):
            continue
        if name in ITEM_ROWS:
            state[name][: len(value)] = value
        else:
            state[name] = replaced.get(name, value)
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
def with_views(model: TwoTower, users: np.ndarray, items: np.ndarray, histories: list[np.ndarray],
               typical_user: torch.Tensor, fresh: np.ndarray, prior: float, batch_size: int = 4096) -> TwoTower:
    """The model with V more views: `users` (V,) user_idx (-1: a user the model does not know), `items` (V,)
    item_idx, each viewer's history before the view (item_idx, oldest first), and `fresh` (V,) bool: the
    views after the training cut-off, which join the fresh views (the others only fold videos in).
    `prior`: the views a folded-in video's content counts as (`TwoTowerSpec.fold_in_prior`).

    A video without training interactions is folded in from its viewers (`ItemTower.forward`): the
    user embedding of each viewer just before the view, less `typical_user` (D,), the mean user
    embedding, joins the video's sum. What its viewers share with everyone says nothing about the
    video (it would lift it for every user); what sets them apart does: the first step of fitting
    the video's embedding to its views under the training softmax.
    """
    users, items = users.astype(np.int64), items.astype(np.int64)
    fresh_views = (torch.cat([model.fresh_view_users, torch.from_numpy(users[fresh])]),
                   torch.cat([model.fresh_view_items, torch.from_numpy(items[fresh])]))
    tower = model.item_tower
    untrained = np.flatnonzero(~tower.known_items.numpy()[items])  # the views that fold a video in
    states = [tower.folded_sums]  # the sums so far, then each new viewer just before the view (V', D)
    for start in range(0, len(untrained), batch_size):
        rows = untrained[start:start + batch_size]
        features = collate_histories(users[rows], None, [histories[r] for r in rows], model.spec.max_history)
        states.append(model.user_embeddings(features) - typical_user)
    viewed = torch.cat([tower.folded_items, torch.from_numpy(items[untrained])])
    order, inverse = torch.unique(viewed, return_inverse=True)  # sorted, as `ItemTower` looks them up
    sums = torch.zeros(len(order), model.spec.dim).index_add_(0, inverse, torch.cat(states))
    folded = (order, sums)
    return _grown(model, model.spec.n_items, fresh_views, folded, fold_in_prior=prior)
