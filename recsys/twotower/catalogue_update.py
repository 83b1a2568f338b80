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
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from recsys.twotower.new_videos import content_clusters
from recsys.twotower.sparse import collate_histories
from recsys.twotower.towers import TwoTower
from recsys.twotower.validation import catalogue_embeddings

ITEM_ROWS = ("sparse.item_embeddings.embeddings.item.weight", "item_tower.content", "item_tower.known_items",
             "cluster_membership")
"""State entries with one row per catalogue video."""
FOLDED = ("item_tower.folded_items", "item_tower.folded_sums", "item_tower.folded_viewer_sums")
"""State entries of the videos embedded from their viewers (`ItemTower` fold-in)."""


def _grown(model: TwoTower, n_items: int, fresh: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
           folded: tuple[torch.Tensor, ...] | None = None, **spec_changes: float) -> TwoTower:
    """A copy of `model` for `n_items` videos (new rows zero) holding the fresh views `fresh` and, when given,
    the fold-in (items, collaborative parts, viewer sums) `folded`."""
    tower = model.item_tower
    folded = folded or (tower.folded_items, tower.folded_sums, tower.folded_viewer_sums)
    spec = dataclasses.replace(model.spec, n_items=n_items, fresh_views=len(fresh[0]), folded_items=len(folded[0]),
                               **spec_changes)
    content = torch.zeros(n_items, spec.content_dim) if spec.content_dim else None
    grown = TwoTower(spec, content=content, known_items=torch.zeros(n_items, dtype=torch.bool), fresh_views=fresh)
    state = grown.state_dict()
    replaced = dict(zip(FOLDED, folded, strict=True))
    for name, value in model.state_dict().items():
        if name in ("fresh_view_users", "fresh_view_items", "fresh_view_times"):
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
    grown = _grown(model, n_old + len(new_rows), (model.fresh_view_users, model.fresh_view_items,
                                                   model.fresh_view_times))
    index = torch.from_numpy(rows.astype(np.int64))
    grown.item_tower.content[index] = torch.from_numpy(content.astype(np.float32))
    unknown = rows[~grown.item_tower.known_items.numpy()[rows]]  # new, or existing but never trained on
    if grown.spec.taste_clusters and len(unknown):
        probabilities = membership_of_content(model, grown.item_tower.content.numpy()[unknown])
        grown.cluster_membership[torch.from_numpy(unknown)] = torch.from_numpy(probabilities)
    return grown


FOLD_IN_STEPS = 100
"""Most L-BFGS iterations of `fit_fold_in`."""


@dataclass(frozen=True)
class FoldInSoftmax:
    """The catalogue softmax a folded-in video is fitted under, with everything but that video held fixed."""

    population: torch.Tensor
    """(S, D) user embeddings standing for every view of the log (a sample)"""
    population_views: torch.Tensor
    """(S,) the views each of them stands for"""
    others: torch.Tensor
    """(M, D) the embeddings of every video not being folded in"""
    temperature: float
    """The model's softmax temperature"""

    def log_partition_of_others(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) log sum over the other videos of exp(u . e / T) for users (B, D); -inf without other videos."""
        if not len(self.others):
            return torch.full((len(users),), float("-inf"))
        return torch.logsumexp(users @ self.others.T / self.temperature, dim=1)

    @cached_property
    def population_rest(self) -> torch.Tensor:
        """(S,) `log_partition_of_others` of the population, read by every fit under this softmax."""
        return self.log_partition_of_others(self.population)


def fit_fold_in(content: torch.Tensor, viewer_sums: torch.Tensor, prior: float, softmax: FoldInSoftmax
                ) -> torch.Tensor:
    """(F, D) collaborative parts s of F folded-in videos: each embedding e = normalise(prior c + s) is the
    most likely one under the softmax the model was trained with, the rest of the catalogue held fixed.

    content (F, D): the videos' content-only embeddings c (unit norm); viewer_sums (F, D): the sum of
    their viewers' user embeddings; `softmax`: the population of users standing for every view of the
    log, and the other videos. Each video's embedding maximises, on the unit sphere,

        (prior c + viewer_sums) . e / T - sum_u views_u log(Z_u + exp(u . e / T))

    the log likelihood of its views under the softmax over the catalogue (temperature T; Z_u: the
    other videos' share of user u's partition), with its content counting as `prior` views. Its
    viewers pull it towards them, and every user pushes it away by as much as the model expects them
    to watch it, so a video is not lifted for everyone like its viewers, as a bare sum of their
    embeddings is (that over-promoted new videos for other users). At the maximum e is parallel to
    the gradient prior c + s, with s = viewer_sums - sum_u views_u p_u(e) u: s is returned, scaled so
    that normalise(prior c + s) gives e exactly.
    """
    if not len(viewer_sums):
        return viewer_sums
    population, views, temperature = softmax.population, softmax.population_views, softmax.temperature
    rest = softmax.population_rest  # (S,) log partition over the other videos
    pull = prior * content + viewer_sums  # (F, D)
    with torch.enable_grad():
        direction = pull.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([direction], max_iter=FOLD_IN_STEPS, line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            embedding = F.normalize(direction, dim=-1)
            logits = population @ embedding.T / temperature  # (S, F)
            push = (views[:, None] * torch.logaddexp(rest[:, None], logits)).sum(0)  # (F,)
            value = (push - (pull * embedding).sum(1) / temperature).sum()
            value.backward()
            return value

        optimizer.step(loss)
    embedding = F.normalize(direction.detach(), dim=-1)  # (F, D)
    logits = population @ embedding.T / temperature
    expected = torch.exp(logits - torch.logaddexp(rest[:, None], logits)) * views[:, None]  # (S, F)
    gradient = pull - expected.T @ population  # (F, D) prior c + s at the maximum
    return gradient.norm(dim=1, keepdim=True) * embedding - prior * content


FOLD_IN_PRIORS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
"""Views a folded-in video's content may count as; `pick_fold_in_prior` picks one on held-out views."""
DEFAULT_FOLD_IN_PRIOR = 1.0
"""What content counts as when no video has two views to validate on: as much as one view."""


def pick_fold_in_prior(content: torch.Tensor, viewer_sums: torch.Tensor, viewed: torch.Tensor,
                       view_states: torch.Tensor, softmax: FoldInSoftmax) -> float:
    """The prior of `FOLD_IN_PRIORS` under which folded-in videos best predict a viewer held out of their views.

    content (F, D), viewer_sums (F, D): the videos' content-only embeddings and the sums of their
    viewers; viewed (V,): the video (row of those) of each of the update's views, in time order, and
    view_states (V, D): the viewer's user embedding at that view (the rest as in `fit_fold_in`). The
    last view of each video with two or more in the update is held out; each prior fits those videos
    without it and is scored by the mean log probability the held-out viewers then give them under
    the catalogue softmax: the content weight that best tells who watches a video next, read from the
    added views themselves. `DEFAULT_FOLD_IN_PRIOR` when no video has two views.
    """
    last = torch.full((len(viewer_sums),), -1, dtype=torch.long).scatter_reduce_(
        0, viewed, torch.arange(len(viewed)), reduce="amax")  # (F,) each video's last view
    validated = torch.nonzero(torch.bincount(viewed, minlength=len(viewer_sums)) >= 2).squeeze(1)  # (Q,)
    if not len(validated):
        return DEFAULT_FOLD_IN_PRIOR
    held_out = view_states[last[validated]]  # (Q, D)
    content, viewer_sums = content[validated], viewer_sums[validated] - held_out
    rest = softmax.log_partition_of_others(held_out)  # (Q,)

    def held_out_log_likelihood(prior: float) -> float:
        sums = fit_fold_in(content, viewer_sums, prior, softmax)
        logit = (held_out * F.normalize(prior * content + sums, dim=-1)).sum(1) / softmax.temperature  # (Q,)
        return float((logit - torch.logaddexp(rest, logit)).mean())

    return max(FOLD_IN_PRIORS, key=held_out_log_likelihood)


@torch.no_grad()
def with_views(model: TwoTower, users: np.ndarray, items: np.ndarray, histories: list[np.ndarray],
               population: torch.Tensor, population_views: torch.Tensor, times: np.ndarray, fresh: np.ndarray,
               batch_size: int = 4096) -> TwoTower:
    """The model with V more views: `users` (V,) user_idx (-1: a user the model does not know), `items` (V,)
    item_idx, each viewer's history before the view (item_idx, oldest first), `times` (V,) when they
    happened, and `fresh` (V,) bool: the views after the training cut-off, which join the fresh views (the
    others only fold videos in). `population` (S, D) and `population_views` (S,): user embeddings standing
    for every view (`FoldInSoftmax`).

    A video without training interactions is folded in from its viewers (`ItemTower.forward`): the
    user embedding of each viewer just before the view joins the video's viewer sum, and its
    embedding is fitted to all its viewers so far (`fit_fold_in`), its content counting as
    the views `pick_fold_in_prior` picks on held-out views (`TwoTowerSpec.fold_in_prior`).
    """
    users, items = users.astype(np.int64), items.astype(np.int64)
    fresh_views = (torch.cat([model.fresh_view_users, torch.from_numpy(users[fresh])]),
                   torch.cat([model.fresh_view_items, torch.from_numpy(items[fresh])]),
                   torch.cat([model.fresh_view_times, torch.from_numpy(times[fresh].astype(np.int64))]))
    tower = model.item_tower
    untrained = np.flatnonzero(~tower.known_items.numpy()[items])  # the views that fold a video in
    states = [tower.folded_viewer_sums]  # the sums so far, then each new viewer just before the view (V', D)
    for start in range(0, len(untrained), batch_size):
        rows = untrained[start:start + batch_size]
        features = collate_histories(users[rows], None, [histories[r] for r in rows], model.spec.max_history)
        states.append(model.user_embeddings(features))
    viewed = torch.cat([tower.folded_items, torch.from_numpy(items[untrained])])
    order, inverse = torch.unique(viewed, return_inverse=True)  # sorted, as `ItemTower` looks them up
    states = torch.cat(states)
    viewer_sums = torch.zeros(len(order), model.spec.dim).index_add_(0, inverse, states)
    if not len(order):  # nothing to fold in (every video viewed had training views)
        return _grown(model, model.spec.n_items, fresh_views)
    nothing = torch.zeros(0, dtype=torch.long), torch.zeros(0, model.spec.dim), torch.zeros(0, model.spec.dim)
    unfolded = _grown(model, model.spec.n_items, fresh_views, nothing)
    embeddings = catalogue_embeddings(unfolded)  # (N, D)
    content_only = F.normalize(unfolded.item_tower.represent(order, None), dim=-1)  # (F, D) the videos to fold in
    others = torch.ones(len(embeddings), dtype=torch.bool)
    others[order] = False
    softmax = FoldInSoftmax(population, population_views, embeddings[others], model.spec.temperature)
    old = len(tower.folded_items)
    prior = pick_fold_in_prior(content_only, viewer_sums, inverse[old:], states[old:], softmax)
    sums = fit_fold_in(content_only, viewer_sums, prior, softmax)
    return _grown(model, model.spec.n_items, fresh_views, (order, sums, viewer_sums), fold_in_prior=prior)
