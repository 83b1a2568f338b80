"""`recsys evaluate`: trained two-tower runs and the baselines, ranked by one protocol on one split.

Returns (and logs to MLflow) a table with one row per model and one column per metric:
HR/NDCG/MRR@K over all held-out interactions, the same on the cold-start slice (`cold_…`),
catalogue coverage@K, and on the synthetic corpus each model's NDCG@K as a share of the oracle's;
and what each model cost: `fit_s` (a baseline's fit on train and the pick of its setting on
validation) and `rank_s` (ranking the split's cases).
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import numpy as np
import polars as pl

from recsys.config import EvaluateConfig, to_dict
from recsys.data.paths import PreparedPaths
from recsys.errors import MissingInputError
from recsys.evaluation.baselines import (
    EASE,
    ALSSettings,
    ImplicitALS,
    ItemKNN,
    OracleScorer,
    Popularity,
    Transitions,
    item_cosine,
    item_gram,
    train_matrix,
    transition_counts,
)
from recsys.evaluation.protocol import EvalCases, Scorer, evaluate_scorer, load_cases
from recsys.evaluation.tuning import Tuned, pick_on_validation
from recsys.files import read_json
from recsys.metrics import METRICS
from recsys.tracking.inputs import log_tables
from recsys.tracking.store import fingerprint_files, start_run


class SkippedModelWarning(UserWarning):
    """A model was left out of the evaluation (no trained model yet, no oracle truth); the message says why."""


TIMINGS = ("fit_s", "rank_s")
"""The table's columns that are wall times, not results: two runs of the same evaluation differ in them only."""


class FittedBaselines(NamedTuple):
    """What `fit_baselines` returns."""

    scorers: dict[str, Scorer]
    tuning: dict[str, Tuned]
    """name → its pick on validation, for the baselines with a grid of settings"""
    notes: list[str]
    """why a configured baseline was left out"""
    fit_seconds: dict[str, float]
    """name → wall time of its fit, with the pick of its setting on validation"""


def fit_baselines(config: EvaluateConfig, paths: PreparedPaths) -> FittedBaselines:
    """The configured baselines fitted on the train split.

    Every baseline with a grid of settings is fitted once per setting and the one best on the
    validation cases is kept (`pick_on_validation`); a grid of one value is taken as given. EASE is
    skipped, with a note saying why, on catalogues above `ease_max_items`.
    """
    meta = read_json(paths.meta)
    n_items = int(meta["n_items"])
    scorers: dict[str, Scorer] = {}
    tuning: dict[str, Tuned] = {}
    notes: list[str] = []
    fit_seconds: dict[str, float] = {}
    needs_matrix = {"itemknn", "mf", "ease"} & set(config.baselines)
    matrix = train_matrix(paths, meta["n_users"], n_items) if needs_matrix else None
    valid: EvalCases | None = None
    reading = 0.0  # seconds spent reading the validation cases, which no one baseline's fit is charged for

    def pick(name: str, candidates: list[tuple[str, Callable[[], Scorer]]]) -> None:
        nonlocal valid, reading
        if len(candidates) == 1:  # nothing to choose: the validation split is not read
            label, fit = candidates[0]
            scorers[name], tuning[name] = (scorer := fit()), Tuned(scorer, label, {})
            return
        if valid is None:
            started = time.perf_counter()
            valid = load_cases(paths, "valid")
            reading = time.perf_counter() - started
        tuning[name] = pick_on_validation(name, candidates, valid, config.batch_size)
        scorers[name] = tuning[name].scorer

    for name in config.baselines:
        started = time.perf_counter()
        if name == "popularity":
            scorers[name] = Popularity.fit(paths)
        elif name == "itemknn":
            similarity = item_cosine(matrix)
            pick(name, [(f"neighbours={k}", partial(ItemKNN.from_similarity, similarity, k))
                        for k in config.knn_neighbours])
            del similarity
        elif name == "mf":
            pick(name, [(s.label(), partial(ImplicitALS.fit, matrix, s)) for s in ALSSettings.grid(config)])
        elif name == "ease":
            if n_items > config.ease_max_items:
                notes.append(f"ease skipped: {n_items} items is above ease_max_items={config.ease_max_items} "
                             f"(its dense {n_items}x{n_items} inverse would take {4 * n_items ** 2 / 1e9:.1f} GB "
                             "per copy)")
                continue
            gram = item_gram(matrix)
            pick(name, [(f"lambda={lam:g}", partial(EASE.from_gram, gram, lam)) for lam in config.ease_lambdas])
            del gram
        elif name == "transitions":
            counts, popularity = transition_counts(paths, n_items), Popularity.fit(paths).counts
            pick(name, [(f"window={w} decay={d:g}", partial(Transitions, counts, popularity, w, d))
                        for w in config.transition_windows for d in config.transition_decays])
        fit_seconds[name] = time.perf_counter() - started - reading
        reading = 0.0
    return FittedBaselines(scorers, tuning, notes, fit_seconds)


def model_name(use_ids: bool, content_dim: int, content_source: str) -> str:
    """A readable name for a two-tower variant: the full model or one of its ablations."""
    if not use_ids:
        return f"two-tower content-only ({content_source})"
    if content_dim == 0:
        return "two-tower no-content"
    return f"two-tower ({content_source})"


def load_models(config: EvaluateConfig) -> tuple[dict[str, Scorer], dict[str, str], list[str]]:
    """(name → scorer, name → run ID, notes) for the requested runs, or the newest when none is requested."""
    from recsys.twotower.trained_model import load_trained

    scorers: dict[str, Scorer] = {}
    run_of: dict[str, str] = {}
    notes: list[str] = []
    run_ids: Sequence[str | None] = config.run_ids or [None]
    for run_id in run_ids:
        try:
            scorer = load_trained(config.processed_dir, config.dataset, run_id)
        except MissingInputError as err:
            if config.run_ids:
                raise
            notes.append(f"no trained two-tower model evaluated: {err}")
            continue
        spec = scorer.spec
        name = model_name(spec.use_ids, spec.content_dim, spec.content_source)
        if name in scorers:  # two runs of the same variant: tell them apart by run
            name = f"{name} [{scorer.run_id[:8]}]"
        scorers[name] = scorer
        run_of[name] = str(scorer.run_id)
    return scorers, run_of, notes


def sample_cases(cases: EvalCases, max_cases: int | None, seed: int) -> EvalCases:
    """All cases, or a seeded random sample of `max_cases` of them (in their original order)."""
    if max_cases is None or max_cases >= len(cases):
        return cases
    rows = np.sort(np.random.default_rng(seed).choice(len(cases), size=max_cases, replace=False))
    return cases.subset(rows)


def evaluate_models(
    scorers: dict[str, Scorer], cases: EvalCases, ks: Sequence[int], batch_size: int
) -> pl.DataFrame:
    """One row per model: its metrics on the cases and `rank_s`, the seconds their ranking took, plus
    `ndcg@K/oracle` columns when an oracle is among them."""
    rows = []
    for name, scorer in scorers.items():
        started = time.perf_counter()
        metrics = evaluate_scorer(scorer, cases, ks, batch_size, name=name)
        rows.append({"model": name, **metrics, "rank_s": time.perf_counter() - started})
    table = pl.DataFrame(rows)
    if "oracle" in scorers:
        oracle = table.filter(pl.col("model") == "oracle").row(0, named=True)
        table = table.with_columns(
            (pl.col(f"ndcg@{k}") / oracle[f"ndcg@{k}"]).alias(f"ndcg@{k}/oracle") for k in ks
        )
    return table


def slug(name: str) -> str:
    """A model name as MLflow accepts in metric and tag keys: runs of other characters become '-'."""
    return re.sub(r"[^\w.\-]+", "-", name).strip("-")


def metric_key(model: str, metric: str) -> str:
    """An MLflow metric name `<model>/<metric>`, '@K' spelled '_at_K' (e.g. `itemknn/ndcg_at_10`)."""
    return f"{slug(model)}/{slug(metric.replace('@', '_at_').replace('/oracle', '_over_oracle'))}"


HEADLINE = ("ndcg", "hr", "mrr", "cold_ndcg", "coverage")
"""The metrics a person compares across training runs, logged as `<split>_<metric>_<K>` (`test_ndcg_10`)."""


def headline_metrics(row: dict[str, float], split: str, ks: Sequence[int]) -> dict[str, float]:
    """One model's headline metrics at K=10 (else the first K) under stable names: `test_ndcg_10`,
    `test_hr_10`, `test_mrr_10`, `test_cold_ndcg_10`, `test_coverage_10` (`valid_...` on validation).

    The same names whichever run, model variant or evaluation logged them, so the MLflow UI's
    charts and compare view line up across training runs.
    """
    k = 10 if 10 in ks else ks[0]
    return {f"{split}_{name}_{k}": float(row[f"{name}@{k}"]) for name in HEADLINE
            if row.get(f"{name}@{k}") is not None}


def log_to_training_runs(table: pl.DataFrame, run_of: dict[str, str], split: str, ks: Sequence[int]) -> None:
    """Each evaluated two-tower model's headline metrics, logged into its own training run too:
    comparing training runs in the UI (or with `recsys runs compare`) then shows their test figures."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    for row in table.filter(pl.col("model").is_in(list(run_of))).iter_rows(named=True):
        metrics = headline_metrics(row, split, ks)
        now = int(time.time() * 1000)
        client.log_batch(run_of[row["model"]], metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])


def run_name(config: EvaluateConfig, run_of: dict[str, str]) -> str:
    """The evaluate run's name: its split and the training runs it evaluated, by their run names
    (`evaluate test gru fused d64 s0`), or `evaluate test baselines`."""
    from mlflow import MlflowClient

    client = MlflowClient()
    names = [client.get_run(run_id).info.run_name.removeprefix("train_retrieval ") for run_id in run_of.values()]
    return " ".join(["evaluate", config.split, *(names or ["baselines"])])[:250]


def log_plots(table: pl.DataFrame, two_towers: Sequence[str], ks: Sequence[int], split: str) -> None:
    """Log to the active run `plots/metrics_at_k.png` (HR/NDCG/MRR against K, one line per model) and,
    when two-tower models were evaluated, `plots/modality_ablation.png`: NDCG@10 (else @ the first K)
    of each two-tower variant (IDs + content, IDs only, content only: whichever runs were given)."""
    from recsys.tracking.plots import at_k_table, log_figure, metric_at_k, modality_ablation

    log_figure(metric_at_k(at_k_table(table, METRICS), title=f"ranking quality at K ({split} split)"),
               "metrics_at_k")
    k = 10 if 10 in ks else ks[0]
    scores = {row["model"]: row[f"ndcg@{k}"] for row in table.iter_rows(named=True) if row["model"] in two_towers}
    if scores:
        log_figure(modality_ablation(scores, metric=f"NDCG@{k}", title=f"two-tower modality ablation ({split} split)"),
                   "modality_ablation")


def evaluate(config: EvaluateConfig) -> pl.DataFrame:
    """Evaluate trained runs and baselines on one split; log every metric, the table and plots to MLflow.

    One row per model; besides the metrics, `run_id` names a two-tower row's training run (null for
    baselines), `setting` a tuned baseline's chosen setting (e.g. `lambda=500`; its grid's validation
    NDCG@10 is logged as `baseline_tuning.json`) and `mlflow_run_id` is this evaluation's run.
    """
    paths = PreparedPaths.of(config.processed_dir, config.dataset).require()
    cases = sample_cases(load_cases(paths, config.split), config.max_cases, config.seed)
    models, run_of, notes = load_models(config)
    baselines, tuning, baseline_notes, fit_seconds = fit_baselines(config, paths)
    notes += baseline_notes
    scorers: dict[str, Scorer] = {**models, **baselines}
    if config.oracle and config.dataset == "synth":
        try:
            scorers["oracle"] = OracleScorer.for_split(paths, config.raw_dir / "synth", config.split)
        except MissingInputError as err:  # the truth lives beside the raw corpus, which may be elsewhere
            notes.append(f"oracle skipped (give --raw-dir): {err}")
    for note in notes:
        warnings.warn(note, SkippedModelWarning, stacklevel=2)
    inputs = {
        "prepared": fingerprint_files([paths.train, paths.valid, paths.test]),
        **{f"model.{slug(name)}": run_id for name, run_id in run_of.items()},
    }
    with start_run(config.dataset, "evaluate", to_dict(config), inputs, run_name(config, run_of)) as run:
        import mlflow

        splits = ("train", "valid", "test") if config.split == "test" else ("train", "valid")
        log_tables(config.dataset, {**{s: getattr(paths, s) for s in splits}, "catalogue": paths.items})
        settings = {name: tuned.setting for name, tuned in tuning.items()}
        table = evaluate_models(scorers, cases, config.ks, config.batch_size).with_columns(
            pl.col("model").replace_strict(fit_seconds, default=None, return_dtype=pl.Float64).alias("fit_s"),
            pl.col("model").replace_strict(settings, default=None, return_dtype=pl.String).alias("setting"))
        if tuning:
            mlflow.log_params({f"{slug(name)}.setting": tuned.setting for name, tuned in tuning.items()})
            mlflow.log_dict({name: {"setting": tuned.setting, "valid_ndcg@10": tuned.valid}
                             for name, tuned in tuning.items()}, "baseline_tuning.json")
        for row in table.iter_rows(named=True):
            mlflow.log_metrics({metric_key(row["model"], k): v for k, v in row.items()
                                if k not in ("model", "setting") and v is not None})
        if len(run_of) == 1:  # one trained model: its figures under the stable names in this run too
            (model,) = run_of
            mlflow.log_metrics(headline_metrics(table.filter(pl.col("model") == model).row(0, named=True),
                                                config.split, config.ks))
        log_to_training_runs(table, run_of, config.split, config.ks)
        mlflow.log_table(table.to_pandas(), "evaluation.json")
        log_plots(table, list(models), config.ks, config.split)
        if notes:
            mlflow.set_tag("recsys.notes", "; ".join(notes))
        mlflow.set_tag("recsys.split", config.split)
    return table.with_columns(
        pl.col("model").replace_strict(run_of, default=None, return_dtype=pl.String).alias("run_id"),
        pl.lit(run.info.run_id).alias("mlflow_run_id"),
    )


def format_results(table: pl.DataFrame, ks: Sequence[int] = (10, 20, 50)) -> str:
    """The main columns of an evaluation table as aligned text for the terminal."""
    wanted = ["model", *(f"{m}@{k}" for k in ks for m in ("ndcg", "hr")), f"mrr@{ks[0]}", f"coverage@{ks[0]}"]
    wanted += [c for c in (f"cold_ndcg@{ks[0]}", f"cold_hr@{ks[-1]}", f"ndcg@{ks[0]}/oracle", "setting", "fit_s",
                           "rank_s") if c in table.columns]
    shown = table.select([c for c in wanted if c in table.columns])
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                   float_precision=4, tbl_width_chars=200, fmt_str_lengths=40):
        text = str(shown)
    cases = int(table["cases"][0]) if "cases" in table.columns and table.height else 0
    cold = int(table["cold_cases"][0]) if "cold_cases" in table.columns and table.height else 0
    run = f", MLflow run {table['mlflow_run_id'][0]}" if "mlflow_run_id" in table.columns and table.height else ""
    return f"{text}\n{cases} held-out interactions ({cold} with a cold-start target){run}"

