"""Recommendation quality: dataset × model × metric, full-ranking leave-one-out test split, mean ± sd over seeds.

For each dataset the real pipeline runs in a temporary folder and MLflow store: fetch (from the
shared data folder) or synthesize, prepare, ingest (titles, and videos/audio on the synthetic
corpus), content training (synthetic corpus: all modalities), then three two-tower runs (full;
content off = sequential without content; ID embeddings off = content-only) and `evaluate`
with the baselines (popularity, item-kNN, MF, EASE, next-video transitions; each with its setting
picked on the validation split, reported in the `setting` column) and, on the synthetic corpus,
the oracle.

Every dataset is prepared with all its interactions (no k-core filter), as public tables are.
`--k-core N` prepares with the N-core filter instead (users and videos with fewer than N
interactions removed, repeatedly); its rows are reported under their own name, `DATASET N-core`,
beside the all-interactions rows of earlier runs.

- movielens-100k: titles as content.
- microlens-50k: titles as content (its few raw videos are ingested too but no model reads them alone).
- synth: the default synthetic corpus, all modalities fused.

On the synthetic corpus the table has one more reference row, `topic reference`: it knows every
video's true topic (which no model is told) and the generator's boost for new videos, and ranks by
the generator's own choice weights with what a model can observe in their place: the topic mix of
the user's history (recency-weighted, half-life 20 views) for the taste, training views for the
popularity, and for a video nobody watched in training the average watched video's popularity
times the boost. It shows how much of the oracle a ranker that read topics perfectly could reach
from what a model sees — the oracle also knows each user's drifted taste at the test time and the
true popularity of every video.

Every dataset also gets a `random (expected)` row: the exact expected metrics of a uniformly
random ranking of each case's candidates (`chance_metrics`), the floor of a ranker that knows
nothing about an item.

Targets (issue 5): the full model beats every baseline on NDCG@10 on every dataset; on the
cold-start slice it is far above popularity; on synthetic data its NDCG@10 is >= 0.8 of the
oracle's. "Far above" is read as an order of magnitude: the full model's cold-start NDCG@10 is at
least 10 times that of popularity, or of the random ranking where popularity is below it.
Popularity ranks never-trained videos last, below chance, so on these datasets the random ranking
sets the floor. (An absolute margin cannot serve both datasets: a 0.05 margin, used before, is
above every model's overall NDCG@10 on MicroLens-50k.) And the figures are the served model's: the
full model is exported and registered as `recsys export` does, and for 300 users the top-10 the
registered version returns (what REST answers) must equal the top-10 of the scorer evaluate ranked
by (`served_equals_evaluated`, `recsys.serving.served_check`).

`--quick` runs only the synthetic corpus, at `QUICK_CORPUS` size with fewer epochs: large enough that a random
ranking scores NDCG@10 0.03 and the full run's order of models shows (full model, then its ablations, then the
classic baselines); the oracle ratio stays a full-run figure.
Every dataset is measured over `--seeds` seeds (0 .. N-1, default 3): the seed draws the two-tower
models' initialisation and batches, MF's factors and sampled cases, and on the synthetic corpus the corpus
itself. Each row is the mean over the seeds, with the standard deviation beside it; a setting picked
on validation that differs between seeds is listed per seed (`lambda=100/lambda=200/lambda=100`). The full model
beats the best baseline on a dataset when its mean NDCG@10 is above that baseline's by more than the
seed spread (the larger of the two rows' standard deviations; 0 with one seed).

Writes results/quality.json and quality.md; `--datasets` reruns some datasets and keeps the other
datasets' rows of the last full run (each dataset's rows record the git commit they were measured at,
and how many seeds). A full run keeps each finished seed of a dataset in results/quality-seeds/ with
the version of the code that measured it (`SeedStore`): a later full run of the same code reads it back,
so MicroLens-50k's seeds (each over an hour on 2 cores) can be measured in separate runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from _common import RESULTS, SHARED_DATA, SeedStore, git_commit, report

METRICS = ("ndcg@10", "hr@10", "mrr@10", "ndcg@50", "hr@50", "coverage@10", "cold_ndcg@10", "ndcg@10/oracle")
VARIANTS = {
    "two-tower": {"content": "auto", "ids": True},
    "two-tower no-content": {"content": "none", "ids": True},
    "two-tower content-only": {"content": "auto", "ids": False},
}
"""The full model and its two ablations (the 'sequential without content' and 'content-only' baselines)."""
BASELINES = ("popularity", "itemknn", "mf", "ease", "transitions", "two-tower no-content", "two-tower content-only")
"""The rows the full model must beat on NDCG@10."""
COLD_OVER_FLOOR = 10.0
"""'Far above popularity' on the cold-start slice: this many times popularity's NDCG@10, or chance's if higher."""
ORACLE_SHARE = 0.8
MEASURED_CODE = ("recsys", "benchmarks/quality.py", "benchmarks/_common.py")
"""What a dataset's seed depends on: a stored seed is reused only while none of these has changed (`SeedStore`)."""
CHANCE = "random (expected)"
"""The row of `chance_metrics`: a uniformly random ranking's exact expected metrics."""
SHARED_SOURCES = {
    "movielens-100k": SHARED_DATA / "movielens" / "ml-100k",
    "microlens-50k": SHARED_DATA / "microlens" / "MicroLens-50k",
}


QUICK_CORPUS = {"preset": "small", "n_topics": 8, "n_videos": 200, "n_users": 500, "events_per_user": 30}
"""`--quick`'s synthetic corpus: the small preset's short clips, but enough videos that a random ranking scores
little (NDCG@10 about 0.03, where the small preset's 32 videos give 0.25) and enough users to tell models apart."""


QUICK_RETRIEVAL_EPOCHS = 8
"""`--quick`'s two-tower epochs (the full run trains until validation stops improving)."""


def build_dataset(dataset: str, root: Path, seed: int, quick: bool, seconds: dict[str, float],
                  k_core: int | None = None, synth: dict[str, Any] | None = None) -> None:
    """Raw files, prepared splits and the feature store (plus content embeddings on synth) under root.

    k_core None keeps every interaction; N applies prepare's N-core filter to users and videos.
    synth: generator settings of the synthetic corpus besides its defaults (or `QUICK_CORPUS`).
    """
    from recsys.config import ContentConfig, FetchConfig, IngestConfig, PrepareConfig, SynthConfig
    from recsys.content.train import train_content
    from recsys.data.fetch import fetch
    from recsys.data.prepare import prepare
    from recsys.media.ingest import ingest
    from recsys.synthetic.generator import synthesize

    raw, processed = root / "raw", root / "processed"
    with timed(seconds, "raw data"):
        if dataset == "synth":
            synthesize(SynthConfig(raw_dir=raw, seed=seed, **{**(QUICK_CORPUS if quick else {}), **(synth or {})}))
        else:
            fetch(FetchConfig(dataset=dataset, source=SHARED_SOURCES[dataset], dest=raw))
    with timed(seconds, "prepare"):
        core = k_core or 1  # 1: every user and video with an interaction stays
        prepare(PrepareConfig(dataset=dataset, raw_dir=raw, processed_dir=processed,
                              min_user_interactions=core, min_item_interactions=core))
    with timed(seconds, "ingest"):
        ingest(IngestConfig(dataset=dataset, processed_dir=processed))
    if dataset == "synth":
        with timed(seconds, "train content"):
            train_content(ContentConfig(
                dataset=dataset, processed_dir=processed, seed=seed, checkpoint_dir=root / "checkpoints",
                progress_bar=False, **({"max_epochs": 4} if quick else {}),
            ))


@contextmanager
def timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    """Add the wall time of the block to seconds[step]."""
    start = time.perf_counter()
    yield
    seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - start


def train_variants(dataset: str, root: Path, seed: int, quick: bool) -> dict[str, str]:
    """Train the full two-tower model and its ablations; variant name → training run ID."""
    from recsys.config import RetrievalConfig
    from recsys.twotower.train import train_retrieval

    runs = {}
    for name, options in VARIANTS.items():
        config = RetrievalConfig(
            dataset=dataset, processed_dir=root / "processed", seed=seed, progress_bar=False,
            **({"max_epochs": QUICK_RETRIEVAL_EPOCHS} if quick else {}), **options,
        )
        runs[name] = train_retrieval(config).run_id
    return runs


def evaluate_dataset(dataset: str, root: Path, runs: dict[str, str], seed: int
                     ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(model → metric → value on the test split, notes of models left out), two-tower rows named by variant.

    A tuned baseline's row also holds its validation-picked `setting` (e.g. `lambda=500`).
    """
    from recsys.config import EvaluateConfig
    from recsys.data.paths import PreparedPaths
    from recsys.evaluation.evaluate import SkippedModelWarning, evaluate
    from recsys.evaluation.protocol import chance_metrics, load_cases

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedModelWarning)
        table = evaluate(EvaluateConfig(
            dataset=dataset, processed_dir=root / "processed", raw_dir=root / "raw",
            run_ids=tuple(runs.values()), seed=seed,
        ))
    notes = [str(w.message) for w in caught if issubclass(w.category, SkippedModelWarning)]
    variant_of = {run_id: name for name, run_id in runs.items()}
    results = {}
    for row in table.iter_rows(named=True):
        name = variant_of.get(row["run_id"], row["model"])
        results[name] = {k: v for k, v in row.items()
                         if k not in ("model", "run_id", "mlflow_run_id") and not (k == "setting" and v is None)}
    results[CHANCE] = chance_metrics(load_cases(PreparedPaths.of(root / "processed", dataset), "test"))
    return results, notes


SERVED_CHECK_USERS = 300
"""Users (a seeded sample) whose served top-10 `served_check` compares with the evaluated one."""


def served_check(dataset: str, root: Path, run_id: str, seed: int) -> dict[str, Any]:
    """Export the full model as `recsys export` does and compare, for a sample of users, the top-10 the registered
    version serves (what REST returns) with the top-10 of the scorer evaluate ranks by (`served_mismatches`)."""
    from recsys.config import ExportConfig
    from recsys.serving.export import export
    from recsys.serving.served_check import served_mismatches
    from recsys.serving.served_model import load_ranker

    processed = root / "processed"
    exported = export(ExportConfig(dataset, processed_dir=processed, run_id=run_id, raw_dir=root / "raw"))
    ranker = load_ranker(dataset, processed, version=exported.version)
    known = sorted(ranker.recommender.user_lookup)
    users = [str(u) for u in np.random.default_rng(seed).choice(known, min(SERVED_CHECK_USERS, len(known)),
                                                                  replace=False)]
    mismatches = served_mismatches(ranker, users)
    return {"users": len(users), "mismatches": len(mismatches), "first_mismatches": mismatches[:5],
            "met": not mismatches}


def add_oracle_shares(models: dict[str, dict[str, float]]) -> None:
    """Give every row without one its ndcg@K/oracle (K in 10, 20, 50), in place."""
    oracle = models["oracle"]
    for metrics in models.values():
        for k in (10, 20, 50):
            metrics.setdefault(f"ndcg@{k}/oracle", metrics[f"ndcg@{k}"] / oracle[f"ndcg@{k}"])


class TopicReference:
    """Ranks by beta log(topic share of the history + epsilon) + log popularity, with true topics.

    The log popularity of a watched video is log(training count + 1); a video nobody watched in
    training gets the mean of that over watched videos plus log(cold_boost).
    """

    HALF_LIFE = 20.0
    """Views after which a history item counts half as much towards the user's topic mix."""

    def __init__(self, topics: np.ndarray, counts: np.ndarray, beta: float, epsilon: float, cold_boost: float
                 ) -> None:
        self.topics, self.beta, self.epsilon = topics, beta, epsilon  # topics (N,)
        log_counts = np.log(counts + 1.0)  # (N,)
        new = counts == 0
        self.log_popularity = np.where(new, log_counts[~new].mean() + np.log(cold_boost), log_counts)  # (N,)

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        n_topics = int(self.topics.max()) + 1
        scores = np.empty((len(histories), len(self.topics)))
        for row, history in enumerate(histories):
            recency = 0.5 ** (np.arange(len(history))[::-1] / self.HALF_LIFE)  # (L,) newest weighs 1
            mix = np.bincount(self.topics[history], weights=recency, minlength=n_topics) / max(recency.sum(), 1e-9)
            scores[row] = self.beta * np.log(mix[self.topics] + self.epsilon) + self.log_popularity
        return scores


def topic_reference(root: Path) -> dict[str, float]:
    """Test metrics of `TopicReference` on the prepared synthetic corpus under root."""
    from recsys.data.histories import train_counts
    from recsys.data.paths import PreparedPaths
    from recsys.evaluation.protocol import evaluate_scorer, load_cases
    from recsys.synthetic.truth import SynthTruth

    paths = PreparedPaths.of(root / "processed", "synth")
    truth = SynthTruth.load(root / "raw" / "synth")
    items = pl.read_parquet(paths.item_map).sort("item_idx")
    topics = truth.item_topic[truth.item_index(items["item_id"].to_list())]
    reference = TopicReference(topics, train_counts(paths).astype(np.float64), truth.beta, truth.epsilon,
                               truth.cold_boost)
    return evaluate_scorer(reference, load_cases(paths, "test"))


def judge(table: dict[str, dict[str, dict[str, float]]], spread: dict[str, dict[str, dict[str, float]]],
          served: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, per dataset and overall, on the means over seeds (spread: their standard deviations,
    missing for rows of one seed; served: `served_check` per dataset; one not checked fails)."""
    beats, cold, oracle_share = {}, {}, None
    for dataset, models in table.items():
        full = models["two-tower"]["ndcg@10"]
        present = [b for b in BASELINES if b in models]
        best = max(present, key=lambda b: models[b]["ndcg@10"], default=None)
        best_other = models[best]["ndcg@10"] if best else 0.0
        sd = spread.get(dataset, {})
        seed_spread = max(sd.get("two-tower", {}).get("ndcg@10", 0.0), sd.get(best, {}).get("ndcg@10", 0.0))
        beats[dataset] = {"full_ndcg@10": full, "best_baseline": best, "best_baseline_ndcg@10": best_other,
                          "full_over_best_baseline": full / best_other if best_other else None,
                          "lead": full - best_other, "seed_spread": seed_spread,
                          "met": full - best_other > seed_spread}
        if "cold_ndcg@10" in models["two-tower"]:
            full_cold = models["two-tower"]["cold_ndcg@10"]
            popular_cold = models["popularity"]["cold_ndcg@10"]
            chance_cold = models[CHANCE]["cold_ndcg@10"]
            floor = max(popular_cold, chance_cold)
            cold[dataset] = {"full": full_cold, "popularity": popular_cold, "random": chance_cold,
                             "full_over_floor": full_cold / floor, "met": full_cold >= COLD_OVER_FLOOR * floor}
        if "oracle" in models:
            oracle_share = models["two-tower"]["ndcg@10/oracle"]
    met = (
        all(b["met"] for b in beats.values())
        and all(c["met"] for c in cold.values())
        and (oracle_share is None or oracle_share >= ORACLE_SHARE)
        and all(served.get(dataset, {}).get("met", False) for dataset in table)
    )
    return {"beats_every_baseline_ndcg@10": beats, "cold_start_vs_popularity_ndcg@10": cold,
            "synth_ndcg@10_over_oracle": oracle_share, "target_met": met}


def markdown(table: dict[str, dict[str, dict[str, float]]], spread: dict[str, dict[str, dict[str, float]]],
             seeds: dict[str, int]) -> str:
    """The quality table as markdown for the README: mean ± sd over each dataset's seeds."""
    header = "| dataset | seeds | model | " + " | ".join(METRICS) + " | setting |"
    lines = [header, "|" + "---|" * (len(METRICS) + 4)]
    for dataset, models in table.items():
        for model, metrics in models.items():
            sd = spread.get(dataset, {}).get(model, {})
            cells = [("–" if metrics.get(m) is None else f"{metrics[m]:.4f}"
                      + (f" ± {sd[m]:.4f}" if sd.get(m) is not None else "")) for m in METRICS]
            cells.append(metrics.get("setting") or "–")
            lines.append(f"| {dataset} | {seeds.get(dataset, 1)} | {model} | " + " | ".join(cells) + " |")
    note = ("\nFull ranking over every item, time-ordered leave-one-out test split; mean ± standard deviation over "
            "the seeds (± missing: one seed); every interaction kept unless the dataset is named `N-core`. "
            "cold_ndcg@10: test targets never seen in training. ndcg@10/oracle: synthetic corpus only. setting: a "
            "baseline's setting, picked on the validation split (one per seed where they differ).\n")
    return "\n".join(lines) + "\n" + note


KEPT = ("table", "spread", "seeds", "seconds", "commits", "notes", "k_core", "served_equals_evaluated")
"""The per-dataset fields of results/quality.json that a rerun of other datasets keeps."""


def previous_full_run() -> dict[str, dict[str, Any]]:
    """Field of `KEPT` → dataset → value of the last full (not --quick) run in results/quality.json, else empty.

    Only datasets whose k-core setting is recorded are kept: rows written before it was were prepared
    with the 5-core filter (then the default) and would pass for all-interaction rows.
    """
    path = RESULTS / "quality.json"
    last = json.loads(path.read_text()) if path.exists() else {}
    if last.get("quick", True) or not isinstance(last.get("k_core"), dict):
        return {field: {} for field in KEPT}
    recorded = set(last["k_core"])
    return {field: {d: v for d, v in last.get(field, {}).items() if d in recorded} for field in KEPT}


def measure_seed(dataset: str, root: Path, seed: int, quick: bool, k_core: int | None) -> dict[str, Any]:
    """One seed of one dataset: 'table' (model → metric → value), 'notes', 'served' (`served_check`) and
    'seconds' per step."""
    steps: dict[str, float] = {}
    build_dataset(dataset, root, seed, quick, steps, k_core)
    with timed(steps, "train retrieval (3 variants)"):
        runs = train_variants(dataset, root, seed, quick)
    with timed(steps, "evaluate"):
        rows, notes = evaluate_dataset(dataset, root, runs, seed)
    with timed(steps, "export, served == evaluated"):
        served = served_check(dataset, root, runs["two-tower"], seed)
    if dataset == "synth":
        rows["topic reference"] = topic_reference(root)
        add_oracle_shares(rows)
    return {"table": rows, "notes": notes, "served": served, "seconds": steps}


def summarise(per_seed: list[dict[str, dict[str, Any]]]
              ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    """(model → metric → mean over the seeds, model → metric → standard deviation) of per-seed tables; a row's
    `setting` is the seeds' settings joined by '/' where they differ. No sd with one seed."""
    means: dict[str, dict[str, Any]] = {}
    spread: dict[str, dict[str, float]] = {}
    for model in per_seed[0]:
        seeds = [table[model] for table in per_seed if model in table]
        means[model], spread[model] = {}, {}
        for metric in seeds[0]:
            values = [row.get(metric) for row in seeds]
            if metric == "setting":
                settings = [str(v) for v in values if v is not None]
                means[model][metric] = ("/".join(settings) if len(set(settings)) > 1 else settings[0]) if settings \
                    else None
            elif all(isinstance(v, int | float) for v in values):
                means[model][metric] = statistics.fmean(values)
                if len(values) > 1:
                    spread[model][metric] = statistics.stdev(values)
            else:
                means[model][metric] = values[0]
    return means, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the small synthetic corpus, one seed (under two "
                        "minutes)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0 .. N-1 (default 3; --quick: 1)")
    parser.add_argument("--datasets", nargs="+", default=None, help="subset of movielens-100k microlens-50k synth")
    parser.add_argument("--k-core", type=int, default=None, metavar="N",
                        help="prepare with the N-core filter instead of every interaction; rows named 'DATASET N-core'")
    args = parser.parse_args()
    if args.k_core is not None and args.k_core < 2:
        parser.error("--k-core must be at least 2 (1 keeps every interaction, the default)")
    datasets = args.datasets or (["synth"] if args.quick else ["movielens-100k", "microlens-50k", "synth"])
    seeds = args.seeds or (1 if args.quick else 3)

    table: dict[str, dict[str, dict[str, Any]]] = {}
    spread: dict[str, dict[str, dict[str, float]]] = {}
    seconds: dict[str, dict[str, float]] = {}
    commits: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    served: dict[str, dict[str, Any]] = {}
    commit, store = git_commit(), SeedStore("quality", MEASURED_CODE, keep=not args.quick)
    with tempfile.TemporaryDirectory(prefix="recsys-quality-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        for dataset in datasets:
            key = dataset if args.k_core is None else f"{dataset} {args.k_core}-core"
            per_seed = []
            for seed in range(seeds):
                root = Path(tmp) / dataset / str(seed)
                per_seed.append(store.measure(key, seed, measure_seed, dataset, root, seed, args.quick, args.k_core))
                done = per_seed[-1]["seconds"]
                print(f"{key} seed {seed}: {', '.join(f'{k} {v:.0f} s' for k, v in done.items())}", flush=True)
            table[key], spread[key] = summarise([measured["table"] for measured in per_seed])
            seconds[key] = {step: sum(m["seconds"].get(step, 0.0) for m in per_seed) for step in per_seed[0]["seconds"]}
            notes[key] = sorted({note for measured in per_seed for note in measured["notes"]})
            checks = [measured["served"] for measured in per_seed]
            served[key] = {"seeds": checks, "met": all(check["met"] for check in checks)}
            commits[key] = commit
    fields: dict[str, dict[str, Any]] = {"table": table, "spread": spread, "seeds": {key: seeds for key in table},
                                         "seconds": seconds, "commits": commits, "notes": notes,
                                         "k_core": {key: args.k_core for key in table},
                                         "served_equals_evaluated": served}
    if not args.quick:  # read only now: another run may have finished meanwhile
        kept = previous_full_run()
        fields = {field: {**kept[field], **fields[field]} for field in KEPT}
    (RESULTS / "quality.md").parent.mkdir(parents=True, exist_ok=True)
    text = markdown(fields["table"], fields["spread"], fields["seeds"])
    (RESULTS / "quality.md").write_text(text)
    print(text)
    targets = judge(fields["table"], fields["spread"], fields["served_equals_evaluated"])
    report("quality", {**targets, "quick": args.quick, **fields})


if __name__ == "__main__":
    main()
