"""Recommendations and similar videos for notebooks and the CLI, in external IDs with titles.

`Recommender` holds one prepared dataset's catalogue (IDs, titles, popularity, every user's
watch history) and a model giving user and item embeddings (the trained two-tower, loaded only
when a ranking needs it), with an item index over its item embeddings.

- A known user: ranked by the model from the whole watch history (plus any `history` given).
- A user the model does not know: a warning saying so, then the popularity ranking, or, when a
  `history` is given, the model's ranking for that history (an anonymous user).
- `similar`: nearest videos by cosine similarity of item embeddings, cold-start videos included.

Internal indices never leave this module: inputs and outputs are external IDs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl
import torch

from recsys.config import ConfigError
from recsys.data.histories import UNKNOWN_USER, histories_by_user, train_counts
from recsys.data.paths import PreparedPaths
from recsys.errors import check_finite
from recsys.metrics import top_k
from recsys.serving.explain import explain_popular, explain_ranking
from recsys.serving.index import IndexKind, ItemIndex, make_index

RANKED_SCHEMA = {"row": pl.Int64, "rank": pl.Int64, "item_id": pl.String, "title": pl.String, "score": pl.Float32}
"""Columns of `Recommender.recommend_many`: the query's row, then its ranking."""


ADDED_VIEWS_SCHEMA = {"user_id": pl.String, "item_idx": pl.Int64, "timestamp": pl.Int64}
"""Columns of `PreparedPaths.added_views`, the views `recsys views add` gave the model after training."""
ALL_USERS_SCHEMA = {"user_id": pl.String, **{name: kind for name, kind in RANKED_SCHEMA.items() if name != "row"}}
"""Columns of the file `write_all_users` writes."""


FINITE_OR_NOTHING = "its scores would rank nothing: retrain or export another model"
"""What `check_finite` says of a model whose vectors are not finite."""
LATER = 1 << 40
"""Added to an added view's time when it joins a history: it sorts after every split's views."""


class UnknownUserWarning(UserWarning):
    """The requested user is not in the dataset: the ranking shown is a fallback."""


class EmbeddingModel(Protocol):
    """A model with user and item vectors whose inner product scores a video for a user."""

    def item_embeddings(self) -> np.ndarray:
        """(n_items, D) float32, row i = item_idx i: what `similar` compares videos by."""
        ...

    def item_vectors(self) -> np.ndarray:
        """(n_items, D') float32, row i = item_idx i: what user vectors are matched against."""
        ...

    def user_vectors(self, user_idx: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        """(B, D') float32 for user indices (-1: unknown) and their histories (item_idx, oldest first)."""
        ...


class Recommender:
    """Top-k videos for users and nearest videos for videos, over one prepared dataset."""

    def __init__(
        self,
        paths: PreparedPaths,
        model: EmbeddingModel | None = None,
        run_id: str | None = None,
        index_kind: IndexKind = "auto",
    ) -> None:
        """Use `model` as given; when None, load the trained two-tower (`run_id`, else the newest) on first use."""
        self.paths = paths.require()
        self._model = model
        self.run_id = run_id
        self.index_kind = index_kind
        items = pl.read_parquet(paths.items, columns=["item_idx", "item_id", "title"]).sort("item_idx")
        self.item_ids = items["item_id"].to_numpy().astype(str)  # (N,)
        self.titles = items["title"].fill_null("").to_numpy().astype(str)  # (N,)
        self.item_lookup = {item: idx for idx, item in enumerate(self.item_ids.tolist())}
        users = pl.read_parquet(paths.user_map).sort("user_idx")
        self.user_lookup = dict(zip(users["user_id"].to_list(), users["user_idx"].to_list(), strict=True))

    @classmethod
    def load(
        cls,
        dataset: str,
        processed_dir: Path = Path("data/processed"),
        run_id: str | None = None,
        index_kind: IndexKind = "auto",
    ) -> Recommender:
        """The recommender of a prepared dataset with its trained model (`run_id`, else the newest)."""
        return cls(PreparedPaths.of(processed_dir, dataset), run_id=run_id, index_kind=index_kind)

    @property
    def model(self) -> EmbeddingModel:
        if self._model is None:
            from recsys.twotower.trained_model import load_trained

            self._model = load_trained(self.paths.root.parent, self.paths.root.name, self.run_id)
        return self._model

    @cached_property
    def popularity(self) -> np.ndarray:
        """(N,) train interactions per item."""
        return train_counts(self.paths)

    @cached_property
    def added_views(self) -> pl.DataFrame:
        """Views added after training (`recsys views add`), in time order; empty when there are none."""
        if not self.paths.added_views.exists():
            return pl.DataFrame(schema=ADDED_VIEWS_SCHEMA)
        return pl.read_parquet(self.paths.added_views).cast(ADDED_VIEWS_SCHEMA)

    @cached_property
    def histories(self) -> list[np.ndarray]:
        """Every known user's watch history (train, valid, test, then added views), oldest first, by user_idx."""
        frames = [pl.scan_parquet(p) for p in (self.paths.train, self.paths.valid, self.paths.test) if p.exists()]
        known = self.added_views.filter(pl.col("user_id").is_in(list(self.user_lookup)))
        if known.height:
            # After every split: an added view happened after training's cut-off.
            later = known.select(pl.col("user_id").replace_strict(self.user_lookup, return_dtype=pl.Int64)
                                 .alias("user_idx"), "item_idx", pl.col("timestamp") + LATER)
            frames.append(later.lazy())
        return histories_by_user(frames, len(self.user_lookup))

    @cached_property
    def new_user_histories(self) -> dict[str, np.ndarray]:
        """Histories of users the model never trained on who have added views (item_idx, oldest first)."""
        new = self.added_views.filter(~pl.col("user_id").is_in(list(self.user_lookup)))
        grouped = new.group_by("user_id", maintain_order=True).agg("item_idx")
        return {str(user): np.asarray(items, dtype=np.int64) for user, items in grouped.iter_rows()}

    def watched_by(self, user_id: str) -> np.ndarray:
        """Everything a user has watched (known or added-views user), oldest first; empty for anyone else."""
        if user_id in self.user_lookup:
            return self.histories[int(self.user_lookup[user_id])]
        return self.new_user_histories.get(user_id, np.zeros(0, dtype=np.int64))

    @cached_property
    def user_index(self) -> ItemIndex:
        """Inner-product index over the model's item vectors (what user vectors are matched against)."""
        vectors = self.model.item_vectors()
        check_finite(vectors, "the model's item vectors", np.arange(len(vectors)), "item_idx", FINITE_OR_NOTHING)
        return make_index(vectors, self.index_kind)

    @cached_property
    def unit_items(self) -> np.ndarray:
        """(N, D) unit-length item embeddings: `similar` ranks by cosine, so popular items' norms do not dominate."""
        items = np.asarray(self.model.item_embeddings(), dtype=np.float32)  # (N, D)
        return items / np.maximum(np.linalg.norm(items, axis=1, keepdims=True), 1e-12)

    @cached_property
    def item_index(self) -> ItemIndex:
        """Cosine index over the model's item embeddings (for `similar`)."""
        return make_index(self.unit_items, self.index_kind)

    def item_indices(self, item_ids: Sequence[str], what: str = "video") -> np.ndarray:
        """Internal indices of external video IDs; a ConfigError lists the unknown ones."""
        unknown = [i for i in item_ids if i not in self.item_lookup]
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ConfigError(
                f"unknown {what} ID(s) {shown}: not in the {self.paths.root.name} catalogue "
                f"({len(self.item_ids)} videos, e.g. {', '.join(self.item_ids[:3])})"
            )
        return np.array([self.item_lookup[i] for i in item_ids], dtype=np.int64)

    def recommend(
        self,
        user_id: str | None = None,
        k: int = 10,
        exclude_seen: bool = True,
        history: Sequence[str] = (),
        explain: bool = False,
    ) -> pl.DataFrame:
        """Top-k videos: rank, item_id, title, score (best first).

        With `explain`, each video also says why (`recsys.serving.explain`): the history video
        nearest to it, the shares of its score and whether it was ranked from its content.

        `history` adds videos just watched (oldest first) to a known user's history, or is the
        whole history of a user the dataset does not know. With `exclude_seen`, videos in the
        history are never recommended. An unknown user without a history gets the most popular
        videos, with an `UnknownUserWarning` saying so.
        """
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        query = self._query(user_id, history)
        ranking = self._rank_table([query], np.array([k]), exclude_seen).drop("row")
        if not explain:
            return ranking
        if query is None:
            return explain_popular(ranking)
        user_idx, watched = query
        vector = self.model.user_vectors(np.array([user_idx]), [watched])  # (1, D') as `_rank` scored it
        found = self.item_indices(ranking["item_id"].to_list())
        return explain_ranking(ranking, self.model, vector, found, watched, self.unit_items, self.item_ids, self.titles)

    def recommend_many(
        self,
        user_ids: Sequence[str | None],
        ks: Sequence[int],
        histories: Sequence[Sequence[str]],
        exclude_seen: bool = True,
    ) -> pl.DataFrame:
        """`recommend` for many users at once: one table with a `row` column (0-based query), then
        rank, item_id, title, score; the model embeds the users in one batch and one index search
        ranks them all.

        Errors name the row (0-based) of the query they are about.
        """
        if not len(user_ids) == len(ks) == len(histories):
            raise ValueError(f"{len(user_ids)} user IDs, {len(ks)} k values and {len(histories)} histories")
        queries = []
        for row, (user_id, k, history) in enumerate(zip(user_ids, ks, histories, strict=True)):
            try:
                if k < 1:
                    raise ConfigError(f"k must be at least 1, got {k}")
                queries.append(self._query(user_id, history))
            except ConfigError as err:
                raise ConfigError(f"row {row}: {err}") from None
        return self._rank_table(queries, np.asarray(ks, dtype=np.int64), exclude_seen)

    def recommend_all(self, k: int = 10, exclude_seen: bool = True, batch_size: int = 4096
                      ) -> Iterator[pl.DataFrame]:
        """Top-k of every user (known, then new users with added views), `batch_size` users at a time:
        user_id, rank, item_id, title, score."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        known = sorted(self.user_lookup, key=self.user_lookup.__getitem__)
        user_ids = np.array(known + list(self.new_user_histories), dtype=object)
        for start in range(0, len(user_ids), batch_size):
            users = np.arange(start, min(start + batch_size, len(user_ids)))
            queries = [(int(u) if u < len(known) else UNKNOWN_USER, self.watched_by(user_ids[u])) for u in users]
            table = self._rank_table(queries, np.full(len(users), k), exclude_seen)
            names = pl.Series("user_id", user_ids[users].tolist(), dtype=pl.String)
            yield table.select(names.gather(table["row"]), pl.exclude("row"))

    def _query(self, user_id: str | None, history: Sequence[str]) -> tuple[int, np.ndarray] | None:
        """(user_idx, watched item_idx) the model ranks for; None: the popularity fallback.

        user_idx is UNKNOWN_USER for a user the dataset does not know (warned about).
        """
        extra = self.item_indices(list(history), "history video")
        if user_id is None and not len(extra):
            raise ConfigError("give a user ID, a history of watched video IDs, or both")
        if user_id is not None and user_id in self.user_lookup:
            user_idx = int(self.user_lookup[user_id])
            return user_idx, np.concatenate([self.histories[user_idx], extra])
        if user_id is not None and user_id in self.new_user_histories:  # a new user with added views
            return UNKNOWN_USER, np.concatenate([self.new_user_histories[user_id], extra])
        if user_id is not None:
            fallback = "ranking from the given history" if len(extra) else "most popular videos"
            warnings.warn(
                f"user {user_id!r} is not known to the {self.paths.root.name} model "
                f"({len(self.user_lookup)} users); showing the {fallback} instead",
                UnknownUserWarning,
                stacklevel=3,
            )
        return (UNKNOWN_USER, extra) if len(extra) else None  # nothing watched, so nothing to exclude

    def _rank_table(self, queries: list[tuple[int, np.ndarray] | None], ks: np.ndarray, exclude_seen: bool
                    ) -> pl.DataFrame:
        """Every query's top-k in one table: row (0-based query), rank, item_id, title, score.

        One `user_vectors` call embeds every modelled query and one index search ranks them; the
        queries without a model ranking (None) get the popularity ranking. No Python loop over users
        builds the answer: it is cut from the (B, max k) result arrays at once.
        """
        width = int(ks.max()) if len(ks) else 1
        ids = np.full((len(queries), width), -1, dtype=np.int64)  # (B, K)
        scores = np.full((len(queries), width), -np.inf, dtype=np.float32)  # (B, K)
        modelled = np.array([query is not None for query in queries], dtype=bool)  # (B,)
        if modelled.any():
            rows = np.flatnonzero(modelled)
            users = np.array([queries[r][0] for r in rows], dtype=np.int64)  # (b,)
            watched = [queries[r][1] for r in rows]
            vectors = self.model.user_vectors(users, watched)  # (b, D')
            check_finite(vectors, "the model's user vectors", users, "user_idx", FINITE_OR_NOTHING)
            exclude = [np.unique(items) for items in watched] if exclude_seen else None
            found_scores, found_ids = self.user_index.search(vectors, width, exclude)  # (b, K) each
            scores[rows], ids[rows] = found_scores, found_ids
        if not modelled.all():
            popular_ids, popular_scores = self._popular(width)
            ids[~modelled], scores[~modelled] = popular_ids, popular_scores
        keep = (ids >= 0) & (np.arange(width)[None, :] < ks[:, None])  # (B, K)
        row, place = np.nonzero(keep)
        found = ids[row, place]
        return pl.DataFrame(
            {
                "row": row.astype(np.int64),
                "rank": place.astype(np.int64) + 1,
                "item_id": self.item_ids[found],
                "title": self.titles[found],
                "score": scores[row, place],
            },
            schema=RANKED_SCHEMA,
        )

    def similar(self, item_id: str, k: int = 10) -> pl.DataFrame:
        """The k videos nearest to `item_id` by cosine similarity: rank, item_id, title, score."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        (item,) = self.item_indices([item_id])
        scores, ids = self.item_index.search(self.unit_items[item : item + 1], k, exclude=[np.array([item])])
        return self._frame(ids[0], scores[0])

    def _popular(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (k,), scores (k,)): the most watched videos first, ties to the lower index."""
        counts = torch.from_numpy(self.popularity.astype(np.float32))[None, :]  # (1, N)
        ids = top_k(counts, k)[0].numpy()  # (k',) with k' = min(k, N)
        padded = np.full(k, -1, dtype=np.int64)
        padded[: len(ids)] = ids
        return padded, np.where(padded >= 0, counts[0].numpy()[padded.clip(min=0)], -np.inf).astype(np.float32)

    def _frame(self, ids: np.ndarray, scores: np.ndarray) -> pl.DataFrame:
        found = ids >= 0  # an index pads with -1 when fewer than k videos are left
        ids, scores = ids[found], scores[found]
        return pl.DataFrame(
            {
                "rank": np.arange(1, len(ids) + 1, dtype=np.int64),
                "item_id": self.item_ids[ids],
                "title": self.titles[ids],
                "score": scores.astype(np.float32),
            },
            schema={name: kind for name, kind in RANKED_SCHEMA.items() if name != "row"},
        )


def recommend(
    dataset: str,
    user_id: str | None = None,
    k: int = 10,
    exclude_seen: bool = True,
    history: Sequence[str] = (),
    processed_dir: Path = Path("data/processed"),
    run_id: str | None = None,
    index_kind: IndexKind = "auto",
    explain: bool = False,
) -> pl.DataFrame:
    """Top-k videos for a user of a prepared dataset (see `Recommender.recommend`); loads everything each call."""
    recommender = Recommender.load(dataset, processed_dir, run_id, index_kind)
    return recommender.recommend(user_id, k, exclude_seen, history, explain)


def similar(
    dataset: str,
    item_id: str,
    k: int = 10,
    processed_dir: Path = Path("data/processed"),
    run_id: str | None = None,
    index_kind: IndexKind = "auto",
) -> pl.DataFrame:
    """The k videos nearest to a video (see `Recommender.similar`); loads everything each call."""
    return Recommender.load(dataset, processed_dir, run_id, index_kind).similar(item_id, k)


def write_all_users(recommender: Recommender, out: Path, k: int = 10, exclude_seen: bool = True,
                    batch_size: int = 4096, progress: bool = True) -> tuple[int, int]:
    """Every user's top-k (`Recommender.recommend_all`) into the Parquet file `out` (user_id, rank, item_id,
    title, score).

    Users are ranked `batch_size` at a time and each batch is appended as it comes, so memory
    holds one batch; the file appears whole or not at all. Returns (rows written, users ranked).
    """
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from recsys.files import atomic_path

    rows = 0
    users = len(recommender.user_lookup) + len(recommender.new_user_histories)
    with atomic_path(out) as tmp, tqdm(total=users, unit="user", disable=not progress,
                                       desc=f"top-{k} of every user") as bar:
        writer = None
        for batch in recommender.recommend_all(k, exclude_seen, batch_size):
            table = batch.to_arrow()
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += batch.height
            bar.update(batch["user_id"].n_unique())
        if writer is None:  # no users: still a valid, empty file
            pq.write_table(pl.DataFrame(schema=ALL_USERS_SCHEMA).to_arrow(), tmp)
        else:
            writer.close()
    return rows, users


def format_ranking(ranking: pl.DataFrame) -> str:
    """A ranking as aligned text: rank, video ID, score, title (and `why:` lines when it is explained)."""
    if ranking.is_empty():
        return "(no videos left to recommend)"
    id_width = max(len("video"), *(len(i) for i in ranking["item_id"]))
    lines = [f"{'rank':>4}  {'video':<{id_width}}  {'score':>8}  title"]
    for row in ranking.iter_rows(named=True):
        lines.append(f"{row['rank']:>4}  {row['item_id']:<{id_width}}  {row['score']:>8.4f}  {row['title']}")
        if "reason" in row:
            lines.append(f"{'':>4}  {'':<{id_width}}  {'':>8}  why: {row['reason']}")
    return "\n".join(lines)
