"""The exported ranking model: a self-contained bundle and the MLflow pyfunc that serves it.

The bundle is a folder (an artifact of the logged model) laid out like a prepared dataset with
one trained model, so that `recsys.serving.recommend.Recommender` ranks from it exactly as
`recsys recommend` ranks from `data/processed`:

```
bundle/
  ranker.json                         dataset, training run ID, index kind, k limit
  <dataset>/meta.json items.parquet user_map.parquet popularity.parquet
  <dataset>/train.parquet valid.parquet test.parquet       every user's watch history
  <dataset>/models/<run_id>/
      weights.safetensors             user and item towers (no pickle)
      model.json                      the towers' spec
      item_embeddings.npy             the item tower over the whole catalogue (the index's vectors)
  <dataset>/features/                 what text search reads (when the content model was trained):
      content_embedding.npy           every video's fused content embedding
      title_projection.safetensors    the trained projection of a query's MiniLM embedding
      search.json                     the fitted lexical weight (when one was fitted)
      window_embedding.npy windows.parquet clip_seconds.npy    per-window embeddings, clip lengths (spans)
```

`Ranker` answers request tables from a bundle; `RankingModel` wraps it as an MLflow
`PythonModel` (logged as code by `recsys/serving/pyfunc_entry.py`, so loading never unpickles anything).
Requests are a DataFrame with `user_id` (str) and optional `k` (int), `history` (list of item
IDs, oldest first) and `query` (str), at most `MAX_ROWS` rows; the answer has one row per
recommended video: user_id, rank, item_id, score, title. A known user is ranked from their whole
watch log (plus `history`), watched videos excluded; an unknown user is ranked from `history`, or
gets the most popular videos (score = number of training views) when there is none.

A row with a `query` is a text search (`recsys.serving.search.VideoSearch`, what `recsys search`
runs, over the bundle's `features/`): its rows add query, content_score, lexical_score, the
matching time span start_s and end_s, and, when the row has a `user_id`, taste_score, by which
the best matches are re-ranked (score stays the search blend, as in `recsys search --user-id`).
`user_id` is optional in such a row.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, REQUEST_LIMIT_EXCEEDED

from recsys.config import ConfigError
from recsys.data.paths import PreparedPaths
from recsys.errors import MissingInputError, RecsysError
from recsys.files import read_json, write_json

if TYPE_CHECKING:
    from recsys.serving.search import VideoSearch

FORMAT_VERSION = 2
RANKER_FILE = "ranker.json"
DEFAULT_K = 10
MAX_K = 1000
"""Largest k a request may ask for (larger lists are not recommendations, they are the catalogue)."""
MAX_ROWS = 1000
"""Most rows (users) one request may hold, unless the server sets another limit (`recsys serve --max-request-rows`)."""
REQUEST_DEADLINE: ContextVar[float | None] = ContextVar("recsys_request_deadline", default=None)
"""`time.monotonic()` by which the request being answered must be done (set by the serving app)."""


SEARCH_COLUMNS = ("content_score", "lexical_score", "taste_score", "start_s", "end_s")
"""What a search row's answer adds (`recsys.serving.search`): the parts of its score and where in the clip it
matches."""


class RequestError(RecsysError, ValueError):
    """A ranking request is malformed: the message says which row and what to send instead."""


class RequestTooLarge(RequestError):
    """A ranking request holds more rows than the limit (the message says it); HTTP 413."""


class RequestTimeout(RecsysError):
    """A request's deadline passed before it was answered: its work is abandoned (HTTP 504)."""


@dataclass
class Request:
    """One validated row of a ranking request."""

    user_id: str | None
    """None only in a search row"""
    k: int
    history: list[str] | None
    query: str | None = None
    """The text of a search row; None: recommendations"""


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return False


def _whole_k(value: Any, floats_allowed: bool) -> int | None:
    """`value` as a k if it is an integer (bool, str and, unless allowed, float are not); else None."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if floats_allowed and isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    return None


def parse_requests(frame: Any, max_k: int, max_rows: int = MAX_ROWS) -> list[Request]:
    """Validate a request DataFrame (pandas or polars) row by row into `Request`s.

    More than `max_rows` rows is a `RequestTooLarge`. `k` must be an integer: a bool, a string or a
    fraction is an error, never rounded or converted. JSON integers of a request where some rows
    have no k reach pandas as floats (the missing ones are NaN), so in such a column a whole float
    counts as an integer; a column of floats without missing values was sent as floats and is
    refused.
    """
    if not hasattr(frame, "columns") or not hasattr(frame, "__len__"):
        raise RequestError("send a table with a user_id column (and optional k, history and query columns)")
    if len(frame) > max_rows:
        raise RequestTooLarge(f"the request has {len(frame)} rows; at most {max_rows} rows (users) per request: "
                              f"split it into several requests")
    if isinstance(frame, pl.DataFrame):
        records = frame.to_dicts()
        k_floats_allowed = False
    elif hasattr(frame, "to_dict"):  # pandas, as MLflow passes it
        records = frame.to_dict("records")
        k_floats_allowed = "k" in frame.columns and bool(frame["k"].isna().any())
    else:
        raise RequestError("send a table with a user_id column (and optional k, history and query columns)")
    if not records:
        raise RequestError("the request has no rows: send at least one user_id")
    if "user_id" not in records[0] and "query" not in records[0]:
        raise RequestError("the request has no user_id column (nor a query column for a search)")
    requests = []
    for row_number, row in enumerate(records):
        query = row.get("query")
        if _is_missing(query):
            query = None
        elif not isinstance(query, str):
            raise RequestError(f"row {row_number}: query must be a string of words, got {query!r}")
        user_id = row.get("user_id")
        if query is not None and _is_missing(user_id):
            user_id = None  # a search for nobody in particular
        elif _is_missing(user_id) or not isinstance(user_id, str) or not user_id.strip():
            raise RequestError(f"row {row_number}: user_id must be a non-empty string, got {user_id!r}")
        k = row.get("k")
        if _is_missing(k):
            k = DEFAULT_K
        whole = _whole_k(k, k_floats_allowed)
        if whole is None or not 1 <= whole <= max_k:
            raise RequestError(f"row {row_number}: k must be a whole number from 1 to {max_k}, got {k!r}")
        history = row.get("history")
        if _is_missing(history):
            history = None
        else:
            if isinstance(history, np.ndarray):
                history = history.tolist()
            if not isinstance(history, list) or not all(isinstance(v, str) for v in history):
                raise RequestError(f"row {row_number}: history must be a list of item IDs (strings), got {history!r}")
            history = history or None
        if query is not None and history is not None:
            raise RequestError(f"row {row_number}: a search (query) re-ranks by the user's own watch log and takes "
                               "no history; send the history without the query to rank from it")
        requests.append(Request(user_id.strip() if user_id is not None else None, whole, history, query))
    return requests


def check_deadline(deadline: float | None) -> None:
    """RequestTimeout when `deadline` (`time.monotonic()` seconds) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise RequestTimeout("the request's time ran out before it was answered; its work was stopped")


class Ranker:
    """Top-k recommendations for request tables, from a bundle (see the module docstring)."""

    def __init__(self, bundle: Path, max_rows: int = MAX_ROWS, index_kind: str | None = None) -> None:
        """`index_kind` overrides the item index the bundle was exported with."""
        from recsys.serving.recommend import Recommender
        from recsys.twotower.trained_model import load_trained

        bundle = Path(bundle)
        self.info = read_json(bundle / RANKER_FILE)
        if self.info.get("format") != FORMAT_VERSION:
            raise RecsysError(f"{bundle / RANKER_FILE}: bundle format {self.info.get('format')!r}, this recsys "
                              f"reads format {FORMAT_VERSION}; export the model again")
        self.dataset = str(self.info["dataset"])
        self.scorer = load_trained(bundle, self.dataset, self.info["train_run_id"])
        self.recommender = Recommender(
            PreparedPaths.of(bundle, self.dataset), model=self.scorer, index_kind=index_kind or self.info["index"]
        )
        self.max_k = min(int(self.info["max_k"]), len(self.recommender.item_ids))
        self.max_rows = max_rows
        self.version: str | None = None
        """The registered version this bundle is, when it was loaded from the registry"""
        self.bundle = bundle
        self._search: VideoSearch | None = None
        self._search_lock = threading.Lock()

    @property
    def search(self) -> VideoSearch:
        """The text search over the bundle's catalogue, built on the first query (MiniLM and BM25 load then)."""
        from recsys.serving.search import CONTENT_EMBEDDING_FILE, VideoSearch

        with self._search_lock:  # REST answers from several threads: build it once
            if self._search is None:
                if not (PreparedPaths.of(self.bundle, self.dataset).features / CONTENT_EMBEDDING_FILE).exists():
                    raise RequestError(f"this {self.dataset} model was exported without a trained content model, "
                                       "so it cannot search by query: train one (`recsys train content "
                                       f"{self.dataset}`) and export again")
                # A served model answers many queries: its query encoder runs traced (same vectors, faster).
                self._search = VideoSearch.load(self.dataset, self.bundle, traced_queries=True)
            return self._search

    def rank(self, frame: Any, deadline: float | None = None) -> pl.DataFrame:
        """Answer a request table: rows user_id, rank (1-based), item_id, score, title per user, best first.

        The rows are ranked together, as one batch of users. Past `deadline` (`time.monotonic()`
        seconds) the work stops with a RequestTimeout at the next step.
        """
        from recsys.serving.recommend import UnknownUserWarning

        check_deadline(deadline)
        requests = parse_requests(frame, self.max_k, self.max_rows)
        check_deadline(deadline)
        wanted = [row for row, r in enumerate(requests) if r.query is None]
        try:
            with warnings.catch_warnings():
                # An unknown user is an ordinary request here: the fallback is the documented answer.
                warnings.simplefilter("ignore", UnknownUserWarning)
                ranked = self.recommender.recommend_many([requests[r].user_id for r in wanted],
                                                         [requests[r].k for r in wanted],
                                                         [requests[r].history or () for r in wanted])
        except ConfigError as err:
            # Its rows are counted among the recommendation rows: name the request's row instead.
            message = re.sub(r"^row (\d+):", lambda m: f"row {wanted[int(m.group(1))]}:", str(err))
            raise RequestError(message) from None
        check_deadline(deadline)
        users = pl.Series("user_id", [requests[r].user_id for r in wanted], dtype=pl.String)
        answer = ranked.select(pl.Series("row", wanted, dtype=pl.Int64).gather(ranked["row"]),
                               users.gather(ranked["row"]), "rank", "item_id", pl.col("score").cast(pl.Float64),
                               "title")
        searched = [self._search_row(row, r, deadline) for row, r in enumerate(requests) if r.query is not None]
        if not searched:
            return answer.drop("row")
        return pl.concat([answer, *searched], how="diagonal_relaxed").sort("row", maintain_order=True).drop("row")

    def _search_row(self, row: int, request: Request, deadline: float | None) -> pl.DataFrame:
        """The search results of one query row: row, user_id, rank, item_id, score, title, query and the score parts."""
        from recsys.serving.recommend import UnknownUserWarning
        from recsys.serving.search import check_query

        assert request.query is not None
        check_deadline(deadline)
        try:
            check_query(request.query, strict=True)  # a bad query is the client's to fix, whatever the model
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnknownUserWarning)  # an unknown user gets the plain matches
                found = self.search.search(request.query, request.k, request.user_id, self.recommender, strict=True)
        except ConfigError as err:
            raise RequestError(f"row {row}: {err}") from None
        parts = [(pl.col(c) if c in found.columns else pl.lit(None)).cast(pl.Float64).alias(c)
                 for c in SEARCH_COLUMNS]  # taste_score: null without a user (or for one the model does not know)
        return found.select(pl.lit(row, pl.Int64).alias("row"), pl.lit(request.user_id, pl.String).alias("user_id"),
                            "rank", "item_id", pl.col("score").cast(pl.Float64), "title",
                            pl.lit(request.query, pl.String).alias("query"), *parts)


BUNDLED_FILES = ("meta", "items", "user_map", "popularity", "train", "valid", "test")
"""The prepared files a bundle carries (`PreparedPaths` attributes): catalogue, users, their histories."""


def write_bundle(
    folder: Path,
    processed_dir: Path,
    dataset: str,
    train_run_id: str,
    max_k: int = MAX_K,
    index: str = "auto",
) -> Path:
    """Write a bundle for a trained model of a prepared dataset into `folder` (created)."""
    from recsys.serving.search import SEARCH_FILES
    from recsys.twotower.trained_model import ITEM_EMBEDDINGS_FILE, MODEL_FILE, WEIGHTS_FILE, models_dir

    source = PreparedPaths.of(processed_dir, dataset).require()
    target = PreparedPaths.of(folder, dataset)
    target.root.mkdir(parents=True, exist_ok=True)
    for name in BUNDLED_FILES:
        shutil.copy2(getattr(source, name), getattr(target, name))
    model_src = models_dir(processed_dir, dataset) / train_run_id
    if not (model_src / WEIGHTS_FILE).exists():
        raise MissingInputError(f"no trained model {train_run_id!r} in {model_src.parent}: train one with "
                                f"`recsys train retrieval {dataset}` or pick an existing run ID")
    model_dst = models_dir(folder, dataset) / train_run_id
    model_dst.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, MODEL_FILE, ITEM_EMBEDDINGS_FILE):
        shutil.copy2(model_src / name, model_dst / name)
    searched = [source.features / name for name in SEARCH_FILES if (source.features / name).exists()]
    if searched:  # a dataset whose content model is trained: REST can search it by query
        target.features.mkdir(exist_ok=True)
        for path in searched:
            shutil.copy2(path, target.features / path.name)
    write_json(
        Path(folder) / RANKER_FILE,
        {"format": FORMAT_VERSION, "dataset": dataset, "train_run_id": train_run_id, "max_k": max_k,
         "default_k": DEFAULT_K, "index": index},
    )
    return Path(folder)


class RankingModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc model serving a `Ranker` from the model's `bundle` artifact.

    Request errors become MLflow INVALID_PARAMETER_VALUE errors, which the model server answers
    with HTTP 400 and the message (and keeps serving). Too many rows is REQUEST_LIMIT_EXCEEDED:
    MLflow's table of codes has no 413, so its scoring server answers 429, and the app of `recsys
    serve` (`recsys.serving.app`) 413. A request past its deadline (`REQUEST_DEADLINE`, set by that
    app) is DEADLINE_EXCEEDED, 504.
    """

    def load_context(self, context: Any) -> None:
        self.ranker = Ranker(Path(context.artifacts["bundle"]))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        try:
            answer = self.ranker.rank(model_input, REQUEST_DEADLINE.get()).to_pandas()
        except RequestTooLarge as err:
            raise MlflowException(str(err), error_code=REQUEST_LIMIT_EXCEEDED) from None
        except RequestError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from None
        except RequestTimeout as err:
            raise MlflowException(str(err), error_code=DEADLINE_EXCEEDED) from None
        if not answer.isna().any(axis=None):
            return answer
        # The search columns are null in other rows: None, which MLflow writes as JSON null (NaN it writes as NaN)
        return answer.astype(object).where(answer.notna(), None)
