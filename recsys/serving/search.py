"""Text → video search over a dataset's fused content embeddings, blended with BM25 on titles.

A query is embedded the way titles were: the offline MiniLM sentence model (`recsys.media.titles`)
then the trained title projection of the content model (`recsys.content.title_encoder`, saved by
`recsys train content` into the feature store). The content model aligns the title embedding
with the fused embedding of frames, motion, sound and title, so the cosine between the query
and a video's fused content embedding finds videos by what they show and sound like, cold ones
and ones without a title included. A lexical match adds what the title literally says: BM25
(`bm25s`, Lucene variant, English stop words) over each video's title and description.

    score = (1 - w) * cos(query, content_i) + w * bm25_i / max_j bm25_j

`w` (`lexical_weight`) is the grid value with the best mean NDCG@10 on the synthetic corpus'
validation queries (`fit_lexical_weight`, `recsys.evaluation.search`: the first two title words
of each topic group, relevant = the group's videos); `benchmarks/search.py` fits it and scores
the other words and paraphrases. A value fitted for a dataset is kept in its feature store
(`search.json`); otherwise `DEFAULT_LEXICAL_WEIGHT` applies.

Only candidates are scored exactly: the `candidates` (100, or k when more) best by content (item
index, FAISS "pq" from 200k videos) and as many best by BM25. On 200k videos, 100 candidates
search the index in 7 ms where 1000 take 39 ms (`benchmarks/search.py` conditions, one thread);
on 1M, 100 take "pq" 1.8 ms at recall@100 0.996 against exact search, where FAISS IVF (1024
lists) reaches only 0.66 at nprobe 128 on the benchmark's random content (`latency.semantic_index`).
A query costs no pass over the catalogue: BM25 reads only the posting lists of the query's words
from bm25s' index (`bm25_matches`), and the blend scores only the union of both candidate lists.
Query embeddings are kept in a small LRU cache (`query_cache_size`), which helps repeated queries
only; `benchmarks/search.py` reports cold (distinct) and warm latency apart, per stage.

Each match also says where in the clip it matches (`start_s`, `end_s`): for a clip longer than
one window, the span of its window nearest to the query (`recsys.content.windows`), else the whole
clip; null for a video without one (or a store trained before windows were written).

With a user, the best `rerank_depth` matches are re-ranked by the user's two-tower score (the
one scorer, through `Recommender`); an unknown user gets the plain matches and a warning.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import bm25s
import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from recsys.config import ConfigError
from recsys.content.title_encoder import TITLE_PROJECTION_FILE, load_title_projection
from recsys.content.title_encoder import TitleEncoder as TitleProjection
from recsys.content.windows import WINDOW_FILES, ClipWindows, read_windows
from recsys.data.paths import PreparedPaths
from recsys.errors import DataFormatError, MissingInputError
from recsys.evaluation.search import Query, search_metrics
from recsys.files import read_json, write_json
from recsys.media.titles import TitleEncoder as SentenceEncoder
from recsys.serving.index import IndexKind, ItemIndex, make_index
from recsys.serving.recommend import Recommender, UnknownUserWarning
from recsys.threads import torch_threads

CONTENT_EMBEDDING_FILE = "content_embedding.npy"
"""The fused content embeddings `recsys train content` writes into the feature store."""
SEARCH_JSON = "search.json"
"""Feature-store file holding a dataset's fitted lexical weight."""
SEARCH_FILES = (CONTENT_EMBEDDING_FILE, TITLE_PROJECTION_FILE, SEARCH_JSON, *WINDOW_FILES)
"""The feature-store files search reads (besides the catalogue's titles and texts in items.parquet),
which an exported bundle carries so that the served model searches too (`recsys.serving.pyfunc_model`)."""
DEFAULT_LEXICAL_WEIGHT = 0.25
"""Weight of BM25 in the blend when none was fitted for the dataset. `benchmarks/search.py` fits 0.25
on the --quick synthetic corpus and 0.4 to 0.6 on builds of the default one (its content model
trained anew), where validation NDCG@10 stays within 0.01 of its best from 0.35 to 0.5 on the latest
(`benchmarks/results/search.json`, `validation_ndcg_10_by_weight`)."""
WEIGHT_GRID = tuple(round(0.05 * step, 2) for step in range(21))
"""Lexical weights `fit_lexical_weight` tries (0: content only, 1: BM25 only)."""
QUERY_THREADS = 1
"""Threads one query runs on. The MiniLM forward of a 5-10 token query is too small to split: on the
shared 2-core machine (load average 2-6) 2 threads took a p50 of 36-63 ms against 4-8 ms on one, as
OpenMP threads wait for busy cores, and a whole search 27 ms against 12 (`benchmarks/results/search.json`,
`latency.query_encoder`, `latency.cold_2_threads`); switching per query costs nothing measurable."""
STOPWORDS = "en"
"""bm25s' English stop-word list: words that never count as a match."""


class SearchWarning(UserWarning):
    """The query could only be partly understood: the ranking shown is a fallback."""


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-case word tokens without English stop words, one list per text (bm25s' tokenizer)."""
    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)  # type: ignore[return-value]


def check_query(query: str, strict: bool = False) -> None:
    """ConfigError for an empty query; for one of only stop words a `SearchWarning` (`strict`: a ConfigError)."""
    if not query.strip():
        raise ConfigError("the search query is empty: give some words that say what the videos show, e.g. \"guitar\"")
    if not tokenize([query])[0]:
        words = f"the query {query!r} holds only stop words: no title words to match"
        if strict:
            raise ConfigError(f"{words}; add a word that says what the videos show, e.g. \"guitar\"")
        warnings.warn(f"{words}, so the videos are ranked by content alone", SearchWarning, stacklevel=3)


@dataclass
class SearchRanking:
    """Scores of every video for one query (N,) and what made them."""

    content: np.ndarray
    """cosine of query and content embedding"""
    lexical: np.ndarray
    """BM25 / the best BM25 of the query (0 where nothing matches)"""


class VideoSearch:
    """Ranks a catalogue's videos for text queries (see the module docstring)."""

    def __init__(
        self,
        item_ids: np.ndarray,
        titles: np.ndarray,
        texts: list[str],
        content: np.ndarray,
        projection: TitleProjection,
        lexical_weight: float = DEFAULT_LEXICAL_WEIGHT,
        sentences: SentenceEncoder | None = None,
        index_kind: IndexKind = "auto",
        candidates: int = 100,
        query_cache_size: int = 1024,
        threads: int = QUERY_THREADS,
        windows: ClipWindows | None = None,
        traced_queries: bool = False,
    ) -> None:
        """`content` (N, D): fused content embeddings, row i = item_ids[i]; `texts`: what BM25 reads per video.

        `windows`: the per-window embeddings and durations of the clips, for the spans (None: no spans).
        `traced_queries`: embed queries by MiniLM's forward traced per token count, which gives the same
        vectors faster once each count was traced (~0.3 s the first time): for long-lived searches
        such as the served model's (`recsys.media.titles.SentenceModel.traced_forward`).

        `query_cache_size`: distinct query texts whose embedding is kept (least recently used out; 0: none).
        `threads`: torch/OpenMP threads a query runs on (0: the process setting), see `QUERY_THREADS`.
        """
        if not len(item_ids) == len(titles) == len(texts) == len(content):
            raise DataFormatError(f"{len(item_ids)} video IDs, {len(titles)} titles, {len(texts)} texts and "
                                  f"{len(content)} content embeddings: they must describe the same catalogue")
        if not 0.0 <= lexical_weight <= 1.0:
            raise ConfigError(f"lexical_weight must be between 0 and 1, got {lexical_weight}")
        if windows is not None and len(windows.seconds) != len(item_ids):
            raise DataFormatError(f"the clip durations cover {len(windows.seconds)} videos, the catalogue has "
                                  f"{len(item_ids)}: train the content model again to rewrite them")
        self.windows = windows
        self.item_ids = np.asarray(item_ids).astype(str)
        self.titles = np.asarray(titles).astype(str)
        content = np.asarray(content, dtype=np.float32)
        self.content = content / np.maximum(np.linalg.norm(content, axis=1, keepdims=True), 1e-12)  # (N, D)
        self.projection = projection.eval()
        self.lexical_weight = lexical_weight
        self.sentences = sentences or SentenceEncoder(cache_dir=None, traced=traced_queries)
        self.index_kind: IndexKind = index_kind
        self.candidates = candidates
        self.query_cache_size = query_cache_size
        self.threads = threads
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._query_lock = threading.Lock()  # the REST server may search from several threads
        # Lucene BM25 has no score for absent words (no non-occurrence term), so a video's score is
        # the sum over the query's words that it holds: what `bm25_matches` reads from the index.
        self.bm25 = bm25s.BM25(method="lucene")
        logging.getLogger("bm25s").setLevel(logging.WARNING)  # its per-index DEBUG line is noise in the CLI
        self.bm25.index(tokenize(list(texts)), show_progress=False)

    @classmethod
    def load(cls, dataset: str, processed_dir: Path = Path("data/processed"), lexical_weight: float | None = None,
             index_kind: IndexKind = "auto", traced_queries: bool = False) -> VideoSearch:
        """The search of a prepared dataset whose content model is trained (`recsys train content`)."""
        paths = PreparedPaths.of(processed_dir, dataset).require()
        folder = paths.features
        if not (folder / CONTENT_EMBEDDING_FILE).exists():
            raise MissingInputError(f"no content embeddings in {folder}: run `recsys ingest {dataset}` and "
                                    f"`recsys train content {dataset}` first")
        columns = pl.read_parquet_schema(paths.items)
        wanted = ["item_idx", "item_id", "title", *(["text"] if "text" in columns else [])]
        items = pl.read_parquet(paths.items, columns=wanted).sort("item_idx")
        titles = items["title"].fill_null("").to_list()
        notes = items["text"].fill_null("").to_list() if "text" in items.columns else [""] * items.height
        texts = [f"{title} {note}".strip() for title, note in zip(titles, notes, strict=True)]
        if lexical_weight is None:
            fitted = folder / SEARCH_JSON
            lexical_weight = float(read_json(fitted)["lexical_weight"]) if fitted.exists() else DEFAULT_LEXICAL_WEIGHT
        return cls(items["item_id"].to_numpy(), np.array(titles), texts, np.load(folder / CONTENT_EMBEDDING_FILE),
                   load_title_projection(folder), lexical_weight, index_kind=index_kind, windows=read_windows(folder),
                   traced_queries=traced_queries)

    @cached_property
    def index(self) -> ItemIndex:
        """Inner-product index over the unit content embeddings."""
        return make_index(self.content, self.index_kind)

    @torch.inference_mode()
    def embed(self, queries: list[str]) -> np.ndarray:
        """Unit query embeddings (Q, D) in the content space: MiniLM, then the trained title projection."""
        sentences = torch.from_numpy(self.sentences.encode(queries))  # (Q, 384)
        return F.normalize(self.projection(sentences), dim=-1).numpy()  # (Q, D)

    def query_vector(self, query: str) -> np.ndarray:
        """The unit embedding (D,) of one query, from the LRU cache when it was asked recently."""
        with self._query_lock:
            vector = self._query_cache.get(query)
            if vector is not None:
                self._query_cache.move_to_end(query)
                return vector
        vector = self.embed([query])[0]  # (D,)
        vector.setflags(write=False)  # shared by every later hit
        if self.query_cache_size > 0:
            with self._query_lock:
                self._query_cache[query] = vector
                while len(self._query_cache) > self.query_cache_size:
                    self._query_cache.popitem(last=False)
        return vector

    def bm25_matches(self, tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The videos holding any of `tokens` (M,), ascending, and their BM25 (M,) float32.

        Read from bm25s' index itself (a CSC matrix: per word, the ascending IDs of the videos that
        hold it and their score), so the cost grows with M, not with the catalogue: no (N,) array
        per query. The same sum over query words (repeats included) as `bm25s.BM25.get_scores`.
        """
        words = self.bm25.get_tokens_ids(tokens)
        index = self.bm25.scores
        indptr, indices, data = index["indptr"], index["indices"], index["data"]
        if not words:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if len(words) == 1:
            start, end = indptr[words[0]], indptr[words[0] + 1]
            return indices[start:end].astype(np.int64), data[start:end].astype(np.float32)
        docs = np.concatenate([indices[indptr[w] : indptr[w + 1]] for w in words])  # (M',) with repeats
        scores = np.concatenate([data[indptr[w] : indptr[w + 1]] for w in words])  # (M',)
        order = np.argsort(docs, kind="stable")  # a few ascending runs: timsort merges them (np.unique: 1.3x slower)
        docs, scores = docs[order], scores[order]
        first = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])  # (M,) where each video's run starts
        return docs[first].astype(np.int64), np.add.reduceat(scores, first).astype(np.float32)

    def lexical(self, query: str) -> np.ndarray:
        """(N,) BM25 of the query's words against every video, divided by the best (all 0 without a match)."""
        docs, raw = self.bm25_matches(tokenize([query])[0])
        scores = np.zeros(len(self.item_ids), np.float32)  # (N,)
        if len(docs):
            scores[docs] = raw / raw.max() if raw.max() > 0 else raw
        return scores

    def rank_all(self, query: str) -> SearchRanking:
        """Content and lexical scores of every video (N,) for one query (evaluation reads both)."""
        return SearchRanking(content=self.content @ self.embed([query])[0], lexical=self.lexical(query))

    def blend(self, ranking: SearchRanking, lexical_weight: float | None = None) -> np.ndarray:
        """(N,) the blended score (see the module docstring)."""
        w = self.lexical_weight if lexical_weight is None else lexical_weight
        return (1.0 - w) * ranking.content + w * ranking.lexical

    def search(
        self,
        query: str,
        k: int = 10,
        user_id: str | None = None,
        recommender: Recommender | None = None,
        rerank_depth: int | None = None,
        strict: bool = False,
    ) -> pl.DataFrame:
        """The k best videos for `query`: rank, item_id, title, score, content_score, lexical_score.

        With `user_id` (and a `recommender` whose catalogue holds these videos), the best
        `rerank_depth` matches (default 3k) are ordered by the user's two-tower score, shown as
        `taste_score`. An empty query is a ConfigError; a query of only stop words is ranked by
        content alone, with a `SearchWarning`, or is a ConfigError too when `strict` (a REST
        client sees no warning, so it gets the message instead of a fallback).
        """
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        check_query(query, strict)
        depth = max(k, rerank_depth or 3 * k) if user_id is not None else k
        with torch_threads(self.threads):
            q = self.query_vector(query)  # (D,)
            ids, content, lexical = self._candidates(query, q, depth)
        frame = self._frame(ids, (1 - self.lexical_weight) * content + self.lexical_weight * lexical, content,
                            lexical, q)
        if user_id is None:
            return frame.head(k)
        if recommender is None:
            raise ConfigError("re-ranking for a user needs the dataset's recommender (its two-tower model)")
        # By external ID: the served model's catalogue may have grown since (`recsys catalogue add`).
        taste = user_scores(recommender, user_id, recommender.item_indices(self.item_ids[ids].tolist()))
        if taste is None:
            return frame.head(k)
        order = np.argsort(-taste, kind="stable")[:k]
        return (frame[order.tolist()].with_columns(pl.Series("taste_score", taste[order], dtype=pl.Float32))
                .with_columns(pl.int_range(1, len(order) + 1, dtype=pl.Int64).alias("rank")))

    def _candidates(self, query: str, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k best videos by the blend among the best by content and by BM25: ids, content, lexical.

        q (D,): the query's unit embedding."""
        depth = min(len(self.item_ids), max(k, self.candidates))
        _, by_content = self.index.search(q[None].copy(), depth)  # (1, depth); the cached vector is read-only
        docs, raw = self.bm25_matches(tokenize([query])[0])  # (M,) each
        return self.blend_candidates(q, by_content[0], docs, raw, k)

    def blend_candidates(self, q: np.ndarray, by_content: np.ndarray, docs: np.ndarray, raw: np.ndarray, k: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k best by the blend among `by_content` and the `len(by_content)` best of BM25's `docs`.

        q (D,): the query; docs (M,) ascending with their BM25 `raw` (M,). Only the union of both
        lists (C <= 2 x depth) is scored; ties go to the lower index.
        """
        depth = len(by_content)
        matched = docs if len(docs) <= depth else docs[np.argpartition(-raw, depth - 1)[:depth]]
        pool = np.union1d(by_content[by_content >= 0], matched)  # (C,)
        content = self.content[pool] @ q  # (C,) exact cosines
        lexical = np.zeros(len(pool), np.float32)
        if len(docs) and raw.max() > 0:
            at = np.minimum(np.searchsorted(docs, pool), len(docs) - 1)  # (C,) where each would sit in docs
            lexical = np.where(docs[at] == pool, raw[at], 0.0).astype(np.float32) / raw.max()
        blended = (1 - self.lexical_weight) * content + self.lexical_weight * lexical
        best = np.lexsort((pool, -blended))[:k]  # best first, ties to the lower index
        return pool[best], content[best], lexical[best]

    def spans(self, ids: np.ndarray, q: np.ndarray) -> list[tuple[float, float] | None]:
        """Where each video `ids` matches the unit query `q` (D,): (start_s, end_s) of its best window, the whole
        clip, or None (no video, or no window files)."""
        if self.windows is None:
            return [None] * len(ids)
        return [self.windows.span(int(i), q) for i in ids]

    def _frame(self, ids: np.ndarray, scores: np.ndarray, content: np.ndarray, lexical: np.ndarray, q: np.ndarray
               ) -> pl.DataFrame:
        spans = self.spans(ids, q)
        return pl.DataFrame(
            {
                "rank": np.arange(1, len(ids) + 1, dtype=np.int64),
                "item_id": self.item_ids[ids].tolist(),
                "title": self.titles[ids].tolist(),
                "score": scores.astype(np.float32),
                "content_score": content.astype(np.float32),
                "lexical_score": lexical.astype(np.float32),
                "start_s": [span[0] if span else None for span in spans],
                "end_s": [span[1] if span else None for span in spans],
            },
            schema={"rank": pl.Int64, "item_id": pl.String, "title": pl.String, "score": pl.Float32,
                    "content_score": pl.Float32, "lexical_score": pl.Float32, "start_s": pl.Float32,
                    "end_s": pl.Float32},
        )


def user_scores(recommender: Recommender, user_id: str, item_ids: np.ndarray) -> np.ndarray | None:
    """(n,) the two-tower score of videos `item_ids` (internal indices) for a user; None, with an
    `UnknownUserWarning`, for a user the model does not know."""
    if user_id not in recommender.user_lookup:
        warnings.warn(f"user {user_id!r} is not known to the {recommender.paths.root.name} model "
                      f"({len(recommender.user_lookup)} users); showing the matches without their taste",
                      UnknownUserWarning, stacklevel=3)
        return None
    user = int(recommender.user_lookup[user_id])
    vector = recommender.model.user_vectors(np.array([user]), [recommender.histories[user]])  # (1, D')
    return (recommender.model.item_vectors()[item_ids] @ vector[0]).astype(np.float32)  # (n,)


def fit_lexical_weight(search: VideoSearch, queries: list[Query], groups: np.ndarray, k: int = 10
                       ) -> tuple[float, dict[float, float]]:
    """The `WEIGHT_GRID` value with the best mean NDCG@k over `queries`, and NDCG@k of every value.

    `groups` (N,): each video's topic group (its relevance to a query of that group). Ties go to
    the smaller weight (the content path, which also finds videos without a title).
    """
    rankings = [search.rank_all(q.text) for q in queries]
    relevant = np.stack([groups == q.group for q in queries])  # (Q, N)
    table = {}
    for w in WEIGHT_GRID:
        scores = np.stack([search.blend(r, w) for r in rankings])  # (Q, N)
        table[w] = search_metrics(scores, relevant, k)[f"ndcg_{k}"]
    best = max(WEIGHT_GRID, key=lambda w: (round(table[w], 6), -w))
    return best, table


def save_lexical_weight(folder: Path, weight: float, fitted_on: str) -> Path:
    """Keep a fitted lexical weight in a feature store (`search.json`), where `VideoSearch.load` reads it."""
    return write_json(Path(folder) / SEARCH_JSON, {"lexical_weight": weight, "fitted_on": fitted_on})


def search(
    dataset: str,
    query: str,
    k: int = 10,
    user_id: str | None = None,
    processed_dir: Path = Path("data/processed"),
    run_id: str | None = None,
    lexical_weight: float | None = None,
    rerank_depth: int | None = None,
) -> pl.DataFrame:
    """The k best videos of a prepared dataset for a text query (see `VideoSearch.search`); loads each call."""
    engine = VideoSearch.load(dataset, processed_dir, lexical_weight)
    recommender = Recommender.load(dataset, processed_dir, run_id) if user_id is not None else None
    return engine.search(query, k, user_id, recommender, rerank_depth)


def format_matches(ranking: pl.DataFrame) -> str:
    """Search results as aligned text: rank, video ID, score, content and title match (and taste), title."""
    if ranking.is_empty():
        return "(no videos match)"
    id_width = max(len("video"), *(len(i) for i in ranking["item_id"]))
    taste = "taste_score" in ranking.columns
    spans = ranking["start_s"].is_not_null().any()
    lines = [f"{'rank':>4}  {'video':<{id_width}}  {'score':>7}  {'content':>7}  {'words':>5}"
             + ("  taste " if taste else "") + ("  span (s)   " if spans else "") + "  title"]
    for row in ranking.iter_rows(named=True):
        line = (f"{row['rank']:>4}  {row['item_id']:<{id_width}}  {row['score']:>7.4f}  {row['content_score']:>7.4f}"
                f"  {row['lexical_score']:>5.2f}")
        if taste:
            line += f"  {row['taste_score']:>6.3f}"
        if spans:
            shown = f"{row['start_s']:.1f}-{row['end_s']:.1f}" if row["start_s"] is not None else "-"
            line += f"  {shown:<11}"
        lines.append(f"{line}  {row['title']}")
    return "\n".join(lines)
