"""Fresh views: interactions after the training cut-off, which the model did not train on.

A video's views since the cut-off say how popular it is now. For a new video they are the only
sign of its popularity (content says what it is about, not how many people will watch it); for a
watched one, whether it is rising or fading. The model is given the validation interactions as
fresh views: they are in every user's history at test time and in serving, and training never
read them. Each video's fresh popularity is the log of its share of fresh views against an even
share, with p pseudo-views per video (`TwoTowerSpec.fresh_pseudo_views`, 1) so that a video nobody has
watched yet is not impossible:

    fresh_popularity_i = log(N * (c_i + p) / (T + p N))

with c_i the fresh views of video i, T all fresh views and N the catalogue size (0 for a video
with an average share, negative below it).

A ranking for a held-out event (validation and test) reads only the fresh views before it
(`popularity_before`): other users' validation views may come later, and those are the future.

A user's own fresh views do not count when ranking for that user: it is what other people watch
now that the term stands for. This changes nothing in serving or at test time, where a user's own
views are in their history and never recommended, but it is what keeps validation honest: there
a user's fresh view is the held-out target itself.
"""

from __future__ import annotations

import torch


def fresh_popularity(counts: torch.Tensor, total: int, pseudo_views: float = 1.0) -> torch.Tensor:
    """log(N (c_i + p) / (T + p N)) of fresh view counts (..., N), T = `total` fresh views, p = `pseudo_views`."""
    n_items = counts.shape[-1]
    return torch.log(n_items * (counts + pseudo_views) / (total + pseudo_views * n_items))


class FreshViews:
    """The fresh (user, item, time) views of a catalogue of `n_items` videos, and the popularity they give."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor, n_items: int,
                 times: torch.Tensor | None = None, pseudo_views: float = 1.0) -> None:
        order = torch.argsort(users, stable=True)
        self.users = users[order]  # (E,) sorted, for each user's range
        self.items = items[order]  # (E,)
        self.pseudo_views = pseudo_views
        self.counts = torch.bincount(items, minlength=n_items).float()  # (N,)
        self.popularity = fresh_popularity(self.counts, len(items), pseudo_views)  # (N,)
        times = torch.zeros(len(items), dtype=torch.long) if times is None else times.long()
        by_time = torch.argsort(times, stable=True)
        self.times_in_order = times[by_time]  # (E,) ascending
        self.items_in_order = items[by_time]  # (E,)

    def popularity_before(self, before: torch.Tensor) -> torch.Tensor:
        """(B, N) fresh popularity of every video from the fresh views before each time `before` (B,) only.

        One pass over the views in time order, each row taking the counts when its time comes: the
        cost is the (B, N) output, not B passes over the views.
        """
        n_items = len(self.counts)
        out = torch.empty(len(before), n_items)
        seen = torch.searchsorted(self.times_in_order, before.long())  # (B,) views strictly before each time
        counts = torch.zeros(n_items)
        done = 0
        for row in torch.argsort(seen).tolist():
            upto = int(seen[row])
            if upto > done:
                counts.index_add_(0, self.items_in_order[done:upto], torch.ones(upto - done))
                done = upto
            out[row] = fresh_popularity(counts, done, self.pseudo_views)
        return out

    def own_view_changes(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, items, change of fresh popularity): leaving out each row's own fresh views.

        users (B,): user index of each row (-1 for a user the model does not know: no own views).
        Row `rows[j]` sees the popularity of `items[j]` change by `change[j]` (one view fewer).
        """
        starts = torch.searchsorted(self.users, users)  # (B,)
        lengths = torch.searchsorted(self.users, users, right=True) - starts  # (B,)
        # Fresh views of users the model does not know are all stored as -1: they are nobody's own.
        lengths = torch.where(users < 0, 0, lengths)
        rows = torch.repeat_interleave(torch.arange(len(users)), lengths)  # (V,)
        offsets = torch.arange(len(rows)) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        items = self.items[starts[rows] + offsets]  # (V,)
        counts = self.counts[items]  # (V,) >= 1: each includes the row's own view
        p = self.pseudo_views
        change = torch.log((counts - 1.0 + p) / (counts + p))  # (V,) one view fewer: the pseudo-views remain
        return rows, items, change

    def popularity_for(self, users: torch.Tensor) -> torch.Tensor:
        """(B, N) fresh popularity of every video for each user, their own fresh views left out."""
        popularity = self.popularity.expand(len(users), -1).clone()
        rows, items, change = self.own_view_changes(users)
        popularity[rows, items] += change
        return popularity
