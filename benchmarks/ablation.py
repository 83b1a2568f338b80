"""Ablation of every term of the two-tower score: NDCG@10, HR@10 and cold-slice NDCG@10 without it.

For each dataset and seed the real pipeline runs as in `benchmarks/quality.py` (same preparation:
every interaction, no k-core filter), then the full two-tower model is trained, and once more
without the content-only loss (`content_only_weight` 0): the one term that changes training. Every
other term is fitted after training, so its ablation refits the full model's coefficients without
it (`recsys.twotower.ablation.without_term`) on the coefficient-fit half of the validation users.
Every row is scored on the test split by the one scorer through the evaluation protocol (each case
reading only the fresh views before its test event).

Datasets: movielens-100k and microlens-50k (real; titles as content), `synth` (the default
synthetic corpus) and `synth-b`, a second synthetic corpus from other generator settings (another
seed, 12 topics, 30% cold videos, half the events per user, and 1,400 users, as many cold videos
need), so that no term is judged on one generator. On the synthetic corpora the seed also draws the corpus.

A term pays when the full model beats its ablation by more than the seed spread (the larger of the
two rows' standard deviations) on a real dataset: on NDCG@10, or for a term that only scores
new videos (`COLD_TERMS`) on the cold slice's NDCG@10. `target_met`: every term pays, so none is
dead weight. `--datasets` runs some of them (microlens-50k takes about 45 minutes per seed on 2
cores: two trainings of 11-13 minutes, then the refits and the rankings); `--quick`: the quick
synthetic corpus of `benchmarks/quality.py`, one seed.

Writes results/ablation.json and results/ablation.md (the table for the README); a full run with
`--datasets` keeps the other datasets of the last full run with as many seeds (each dataset records
the commit it was measured at). A full run also keeps each finished seed in results/ablation-seeds/
with the version of the code that measured it (`SeedStore`), and a later full run of the same code
reuses it: a run stopped part-way loses only its unfinished seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, SeedStore, git_commit, report
from quality import QUICK_RETRIEVAL_EPOCHS, build_dataset

SYNTH_B = {"n_topics": 12, "cold_fraction": 0.3, "events_per_user": 25, "n_users": 1400}
"""The second generator setting: 12 topics, 30% of the videos cold, half the default 50 events per user; 1,400
users, since the generator gives each cold video at least 7 of its own (180 cold videos need 1,260)."""
SYNTH_B_SEED_OFFSET = 100
"""synth-b's corpus seed is the run's seed plus this: another corpus than synth's for the same seed."""
DATASETS = {"movielens-100k": ("movielens-100k", None), "microlens-50k": ("microlens-50k", None),
            "synth": ("synth", {}), "synth-b": ("synth", SYNTH_B)}
"""Row label → (dataset, synthetic generator settings or None)."""
REAL = ("movielens-100k", "microlens-50k")
METRICS = ("ndcg@10", "hr@10", "cold_ndcg@10")
LOSS_TERM = "content-only loss"
COLD_TERMS = (LOSS_TERM, "cold bias", "taste clusters", "fresh sharpening")
"""Terms that change only the scores of new videos (or how content embeds them): judged on the cold slice."""
MEASURED_CODE = ("recsys", "benchmarks/ablation.py", "benchmarks/quality.py", "benchmarks/_common.py")
"""What a seed's rows depend on: a stored seed is reused only while none of these has changed (`SeedStore`)."""


def run_seed(label: str, root: Path, seed: int, quick: bool) -> dict[str, dict[str, float]]:
    """Row ('full', 'without TERM') → metric → value on the test split, for one dataset and seed."""
    from recsys.config import RetrievalConfig
    from recsys.data.paths import PreparedPaths
    from recsys.evaluation.protocol import evaluate_scorer, load_cases
    from recsys.twotower.ablation import SCORE_TERMS, without_term
    from recsys.twotower.train import train_retrieval
    from recsys.twotower.trained_model import load_trained

    dataset, synth = DATASETS[label]
    seed_of_corpus = seed + SYNTH_B_SEED_OFFSET if label == "synth-b" else seed
    steps: dict[str, float] = {}
    build_dataset(dataset, root, seed_of_corpus, quick, steps, synth=synth)
    processed = root / "processed"
    epochs = {"max_epochs": QUICK_RETRIEVAL_EPOCHS} if quick else {}

    def train(**options: Any) -> str:
        return train_retrieval(RetrievalConfig(dataset=dataset, processed_dir=processed, seed=seed,
                                               progress_bar=False, **epochs, **options)).run_id

    full_run, without_loss_run = train(), train(content_only_weight=0.0)
    paths = PreparedPaths.of(processed, dataset)
    cases = load_cases(paths, "test")

    def metrics(scorer: Any) -> dict[str, float]:
        result = evaluate_scorer(scorer, cases)
        return {m: result[m] for m in METRICS if m in result}

    full = load_trained(processed, dataset, full_run)
    rows = {"full": metrics(full), f"without {LOSS_TERM}": metrics(load_trained(processed, dataset, without_loss_run))}
    for term in SCORE_TERMS:
        rows[f"without {term}"] = metrics(without_term(full, paths, term))
    return rows


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Row → metric → {mean, sd} over the seeds (sd 0 for one seed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in per_seed[0]:
        out[row] = {}
        for metric in per_seed[0][row]:
            values = [seed[row][metric] for seed in per_seed]
            out[row][metric] = {"mean": statistics.fmean(values),
                                "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def verdicts(table: dict[str, dict[str, dict[str, dict[str, float]]]]) -> dict[str, dict[str, Any]]:
    """Term → where it pays: per dataset the full model's lead over the ablation and the seed spread."""
    # Every term ablated on some dataset (a removed term's rows stay in the datasets measured before it went).
    terms = list(dict.fromkeys(row.removeprefix("without ") for rows in table.values() for row in rows
                               if row != "full"))
    out: dict[str, dict[str, Any]] = {}
    for term in terms:
        metric = "cold_ndcg@10" if term in COLD_TERMS else "ndcg@10"
        per_dataset = {}
        for label, rows in table.items():
            full, ablated = rows["full"].get(metric), rows.get(f"without {term}", {}).get(metric)
            if full is None or ablated is None:
                continue
            lead = full["mean"] - ablated["mean"]
            spread = max(full["sd"], ablated["sd"])
            per_dataset[label] = {"lead": lead, "spread": spread, "pays": lead > spread}
        real = [d for d in per_dataset if d in REAL]
        out[term] = {"metric": metric, "datasets": per_dataset,
                     "pays_on_real_data": any(per_dataset[d]["pays"] for d in real) if real else None}
    return out


def markdown(table: dict[str, dict[str, dict[str, dict[str, float]]]], seeds: int) -> str:
    """The ablation table for the README: mean ± sd of each metric, per dataset and row."""
    lines = ["| dataset | model | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    for label, rows in table.items():
        for row, metrics in rows.items():
            cells = [f"{metrics[m]['mean']:.4f} ± {metrics[m]['sd']:.4f}" if m in metrics else "–" for m in METRICS]
            lines.append(f"| {label} | {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nMean ± standard deviation over {seeds} seed(s); test split, every interaction.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick synthetic corpus, one seed (under two minutes)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=None)
    args = parser.parse_args()
    labels = args.datasets or (["synth"] if args.quick else list(DATASETS))
    seeds = 1 if args.quick else args.seeds
    started = time.perf_counter()
    table: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    seconds: dict[str, float] = {}
    commits: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="recsys-ablation-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        commit, store = git_commit(), SeedStore("ablation", MEASURED_CODE, keep=not args.quick)
        for label in labels:
            label_started = time.perf_counter()
            per_seed = [store.measure(label, seed, run_seed, label, Path(tmp) / label / str(seed), seed, args.quick)
                        for seed in range(seeds)]
            table[label] = summarise(per_seed)
            seconds[label] = round(time.perf_counter() - label_started, 1)
            commits[label] = commit
            print(f"{label}: {seconds[label]:.0f} s", flush=True)
            # what is done so far survives a later failure; a full run keeps the datasets it did not rerun
            write_results(table, seconds, commits, seeds, args.quick, started)


def previous_full_run(seeds: int) -> dict[str, dict[str, Any]]:
    """'table', 'seconds', 'commits' → dataset → value of the last full run in results/ablation.json with as
    many seeds; empty when there is none."""
    path = RESULTS / "ablation.json"
    last = json.loads(path.read_text()) if path.exists() else {}
    if last.get("quick", True) or last.get("seeds") != seeds:
        return {"table": {}, "seconds": {}, "commits": {}}
    return {field: dict(last.get(field, {})) for field in ("table", "seconds", "commits")}


def write_results(table: dict[str, dict[str, dict[str, dict[str, float]]]], seconds: dict[str, float],
                  commits: dict[str, str], seeds: int, quick: bool, started: float) -> None:
    """results/ablation.json and ablation.md of the datasets done so far, beside (in a full run) the other
    datasets of the last full run with as many seeds; each dataset's rows record the commit they were measured at."""
    if not quick:
        kept = previous_full_run(seeds)
        table, seconds = {**kept["table"], **table}, {**kept["seconds"], **seconds}
        commits = {**{label: kept["commits"].get(label, "unknown") for label in kept["table"]}, **commits}
    terms = verdicts(table)
    judged = [t for t in terms.values() if t["pays_on_real_data"] is not None]
    (RESULTS / "ablation.md").parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ablation.md").write_text(markdown(table, seeds))
    print(markdown(table, seeds))
    report("ablation", {
        "terms_paying_on_real_data": sorted(n for n, t in terms.items() if t["pays_on_real_data"]),
        "terms_not_paying_on_real_data": sorted(n for n, t in terms.items() if t["pays_on_real_data"] is False),
        "target_met": bool(judged) and all(t["pays_on_real_data"] for t in judged),
        "seeds": seeds, "quick": quick, "datasets": list(table), "terms": terms, "table": table,
        "seconds": seconds, "commits": commits, "total_seconds": round(time.perf_counter() - started, 1),
    })


if __name__ == "__main__":
    main()
