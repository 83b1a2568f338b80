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
```

`Ranker` answers request tables from a bundle; `RankingModel` wraps it as an MLflow
`PythonModel` (logged as code by `recsys/serving/pyfunc_entry.py`, so loading never unpickles anything).
Requests are a DataFrame with `user_id` (str) and optional `k` (int) and `history` (list of item
IDs, oldest first); the answer has one row per recommended video: user_id, rank, item_id, score,
title. A known user is ranked from their whole watch log (plus `history`), watched videos
excluded; an unknown user is ranked from `history`, or gets the most popular videos
(score = number of training views) when there is none.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
from mlflow.exceptions import MlflowException

from recsys.config import ConfigError
from recsys.data.paths import PreparedPaths
from recsys.errors import MissingInputError, RecsysError
from recsys.files import read_json, write_json

FORMAT_VERSION = 2
RANKER_FILE = "ranker.json"
DEFAULT_K = 10
MAX_K = 1000
"""Largest k a request may ask for (larger lists are not recommendations, they are the catalogue)."""


class RequestError(RecsysError, ValueError):
    """A ranking request is malformed: the message says which row and what to send instead."""


@dataclass
class Request:
    """One validated row of a ranking request."""

    user_id: str
    k: int
    history: list[str] | None


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return False


def parse_requests(frame: Any, max_k: int) -> list[Request]:
    """Validate a request DataFrame (pandas or polars) row by row into `Request`s."""
    if isinstance(frame, pl.DataFrame):
        records = frame.to_dicts()
    elif hasattr(frame, "to_dict"):  # pandas, as MLflow passes it
        records = frame.to_dict("records")
    else:
        raise RequestError("send a table with a user_id column (and optional k and history columns)")
    if not records:
        raise RequestError("the request has no rows: send at least one user_id")
    if "user_id" not in records[0]:
        raise RequestError("the request has no user_id column")
    requests = []
    for row_number, row in enumerate(records):
        user_id = row.get("user_id")
        if _is_missing(user_id) or not isinstance(user_id, str) or not user_id.strip():
            raise RequestError(f"row {row_number}: user_id must be a non-empty string, got {user_id!r}")
        k = row.get("k")
        if _is_missing(k):
            k = DEFAULT_K
        whole = isinstance(k, int | np.integer) or (isinstance(k, float | np.floating) and float(k).is_integer())
        if isinstance(k, bool) or not whole or not 1 <= int(k) <= max_k:
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
        requests.append(Request(user_id.strip(), int(k), history))
    return requests


class Ranker:
    """Top-k recommendations for request tables, from a bundle (see the module docstring)."""

    def __init__(self, bundle: Path) -> None:
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
            PreparedPaths.of(bundle, self.dataset), model=self.scorer, index_kind=self.info["index"]
        )
        self.max_k = min(int(self.info["max_k"]), len(self.recommender.item_ids))

    def rank(self, frame: Any) -> pl.DataFrame:
        """Answer a request table: rows user_id, rank (1-based), item_id, score, title per user, best first."""
        from recsys.serving.recommend import UnknownUserWarning

        parts = []
        for row_number, request in enumerate(parse_requests(frame, self.max_k)):
            try:
                with warnings.catch_warnings():
                    # An unknown user is an ordinary request here: the fallback is the documented answer.
                    warnings.simplefilter("ignore", UnknownUserWarning)
                    ranking = self.recommender.recommend(request.user_id, request.k, True, request.history or ())
            except ConfigError as err:
                raise RequestError(f"row {row_number}: {err}") from None
            parts.append(ranking.select(
                pl.lit(request.user_id).alias("user_id"), "rank", "item_id",
                pl.col("score").cast(pl.Float64), "title",
            ))
        return pl.concat(parts)


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
    write_json(
        Path(folder) / RANKER_FILE,
        {"format": FORMAT_VERSION, "dataset": dataset, "train_run_id": train_run_id, "max_k": max_k,
         "default_k": DEFAULT_K, "index": index},
    )
    return Path(folder)


class RankingModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc model serving a `Ranker` from the model's `bundle` artifact.

    Request errors become MLflow INVALID_PARAMETER_VALUE errors, which the model server answers
    with HTTP 400 and the message (and keeps serving).
    """

    def load_context(self, context: Any) -> None:
        self.ranker = Ranker(Path(context.artifacts["bundle"]))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        try:
            return self.ranker.rank(model_input).to_pandas()
        except RequestError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from None
