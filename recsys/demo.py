"""`recsys demo`: the whole pipeline on the embedded synthetic corpus, one step after another.

synthetic corpus → prepare → ingest → train content → train retrieval → evaluate → register →
recommend. Each step is the same typed function its subcommand runs; the demo only chains them,
logs a line when each step starts and ends (the long ones show their own progress bars), tags
every MLflow run with one pipeline ID (`recsys.pipeline`), opens a `demo` run that every step's
run nests under (it records the step times), and ends by printing the quality table, the top-10
of one user from the registered champion, and how to look further (MLflow UI, notebooks, REST).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import polars as pl

from recsys.config import DemoConfig, to_dict
from recsys.environment import environment
from recsys.tracking.store import PIPELINE_TAG, experiment_id, pipeline_run

DATASET = "synth"
T = TypeVar("T")


@contextmanager
def pipeline_id(value: str) -> Iterator[str]:
    """Set RECSYS_PIPELINE for the block, so every run `start_run` opens is tagged with it."""
    with environment(RECSYS_PIPELINE=value):
        yield value


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker pools), user + system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class StepLog:
    """Numbered start/end lines for each step with its wall time; wall and CPU times are kept for the report.

    CPU time says what a step costs on a busy machine, where wall time depends on the neighbours.
    """

    total: int
    out: TextIO = sys.stdout
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, work: Callable[[], T], describe: Callable[[T], str] = lambda _: "") -> T:
        number = len(self.seconds) + 1
        print(f"[{number}/{self.total}] {name} ...", file=self.out, flush=True)
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        result = work()
        self.seconds[name] = time.perf_counter() - start
        self.cpu_seconds[name] = _cpu_seconds() - cpu_start
        detail = describe(result)
        print(f"[{number}/{self.total}] {name} done in {self.seconds[name]:.1f} s" + (f": {detail}" if detail else ""),
              file=self.out, flush=True)
        return result


@dataclass
class DemoResult:
    """What one demo produced."""

    pipeline: str
    """Value of the recsys.pipeline tag on every run of this demo"""
    seconds: dict[str, float]
    """Wall time of each step, in order"""
    cpu_seconds: dict[str, float]
    """CPU time of each step (this process and its worker processes)"""
    quality: pl.DataFrame
    """The evaluation table (model x metric) on the test split"""
    user_id: str
    recommendations: pl.DataFrame
    """The champion's top-k for `user_id`: user_id, rank, item_id, score, title"""
    export: Any
    """The `ExportResult` of the register step"""
    run_id: str
    """The final `demo` run holding the step times"""


STEPS = ("synthetic corpus", "prepare", "ingest", "train content", "train retrieval", "evaluate", "register",
         "recommend")


def demo(config: DemoConfig, out: TextIO = sys.stdout) -> DemoResult:
    """Run the pipeline end to end (see the module docstring); every step's output goes where its subcommand's would."""
    import mlflow

    from recsys.config import (
        ContentConfig,
        EvaluateConfig,
        ExportConfig,
        IngestConfig,
        PrepareConfig,
        RetrievalConfig,
        SynthConfig,
    )
    from recsys.content.train import train_content
    from recsys.data.prepare import prepare
    from recsys.evaluation.evaluate import evaluate
    from recsys.media.ingest import ingest
    from recsys.serving.export import export
    from recsys.synthetic.generator import synthesize
    from recsys.twotower.train import train_retrieval

    log = StepLog(len(STEPS), out)
    pipeline = config.pipeline or f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with pipeline_id(pipeline), pipeline_run(DATASET, "demo", to_dict(config), inputs={},
                                             run_name=f"demo {config.preset} s{config.seed}") as run:
        log.run("synthetic corpus", lambda: synthesize(SynthConfig(
            preset=config.preset, raw_dir=config.raw_dir, seed=config.seed, workers=config.workers)),
            lambda folder: str(folder))
        log.run("prepare", lambda: prepare(PrepareConfig(
            dataset=DATASET, raw_dir=config.raw_dir, processed_dir=config.processed_dir)),
            lambda meta: f"{meta['counts']['users']} users, {meta['counts']['items']} videos, "
                         f"{meta['counts']['train']} training views")
        log.run("ingest", lambda: ingest(IngestConfig(
            dataset=DATASET, processed_dir=config.processed_dir, workers=config.workers)),
            lambda summary: f"{summary['counts']['ok']} videos ok, {summary['counts']['failed']} failed")
        log.run("train content", lambda: train_content(ContentConfig(
            dataset=DATASET, processed_dir=config.processed_dir, seed=config.seed, max_epochs=config.content_epochs,
            checkpoint_dir=config.processed_dir / DATASET / "checkpoints")), _content_detail)
        trained = log.run("train retrieval", lambda: train_retrieval(RetrievalConfig(
            dataset=DATASET, processed_dir=config.processed_dir, seed=config.seed, max_epochs=config.retrieval_epochs)),
            lambda result: f"content {result.content_source}, validation NDCG@10 {result.best_val_ndcg:.4f}")
        quality = log.run("evaluate", lambda: evaluate(EvaluateConfig(
            dataset=DATASET, processed_dir=config.processed_dir, raw_dir=config.raw_dir,
            run_ids=(trained.run_id,), seed=config.seed)))
        exported = log.run("register", lambda: export(ExportConfig(
            dataset=DATASET, processed_dir=config.processed_dir, run_id=trained.run_id, raw_dir=config.raw_dir)),
            lambda result: f"version {result.version} of recsys-{DATASET}; {result.decision.reason}")
        user_id = config.user_id or _first_user(config)
        top = log.run("recommend", lambda: champion_recommendations(user_id, config.k),
                      lambda table: f"{table.height} videos for user {user_id}")
        mlflow.set_tags({f"recsys.input.{name}": value for name, value in {
            "train_retrieval": trained.run_id, "evaluate": str(quality["mlflow_run_id"][0]), "export": exported.run_id,
        }.items()})
        mlflow.log_metrics({f"seconds.{name.replace(' ', '_')}": s for name, s in log.seconds.items()})
        mlflow.log_metrics({f"cpu_seconds.{name.replace(' ', '_')}": s for name, s in log.cpu_seconds.items()})
        mlflow.log_metric("seconds.total", sum(log.seconds.values()))
        mlflow.log_table(top.to_pandas(), "recommendations.json")
    result = DemoResult(pipeline, dict(log.seconds), dict(log.cpu_seconds), quality, user_id, top, exported,
                        run.info.run_id)
    print_summary(result, config, out)
    return result


def _content_detail(summary: dict[str, Any]) -> str:
    loss = summary.get("best_val_loss")
    detail = f"{summary['epochs']} epochs" + (f", best validation loss {loss:.3f}" if loss is not None else "")
    if "probe_fused" in summary:  # linear probes to the synthetic corpus' latent topics
        detail += f"; topic probe accuracy fused {summary['probe_fused']:.2f}"
    return detail


def _first_user(config: DemoConfig) -> str:
    from recsys.data.paths import PreparedPaths

    users = pl.read_parquet(PreparedPaths.of(config.processed_dir, DATASET).user_map)
    return str(users.sort("user_idx").get_column("user_id")[0])


def champion_recommendations(user_id: str, k: int) -> pl.DataFrame:
    """The registered champion's top-k for one user, loaded from the registry as any client would."""
    import mlflow
    import pandas as pd

    from recsys.serving.registry import champion_uri
    from recsys.tracking.store import configure

    configure()
    model = mlflow.pyfunc.load_model(champion_uri(DATASET))
    return pl.from_pandas(model.predict(pd.DataFrame({"user_id": [user_id], "k": [k]})))


def ui_url(experiment: str, base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's page of an experiment's runs. MLflow 3.17 picks its GenAI or its model-training
    pages by a switch remembered per browser, not by the experiment's kind tag: `workflowType` selects
    model training for this address."""
    return f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def print_summary(result: DemoResult, config: DemoConfig, out: TextIO) -> None:
    """The quality table, the user's recommendations with titles, step times and where to look next."""
    from recsys.evaluation.evaluate import format_results

    total = sum(result.seconds.values())
    lines = [
        "",
        f"Quality on the test split ({DATASET}):",
        format_results(result.quality),
        "",
        f"Top-{result.recommendations.height} for user {result.user_id} from models:/recsys-{DATASET}@champion:",
    ]
    lines += [f"  {row['rank']:>2}. {row['item_id']:<8} {row['score']:8.4f}  {row['title'] or '(no title)'}"
              for row in result.recommendations.iter_rows(named=True)]
    lines += [
        "",
        "Step times: " + ", ".join(f"{name} {s:.0f} s" for name, s in result.seconds.items())
        + f"; total {total / 60:.1f} min",
        f"Every run of this demo is tagged {PIPELINE_TAG}={result.pipeline}.",
        "",
        "Next:",
        f"  runs:      .venv/bin/recsys runs --experiment {DATASET}",
        "  MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db "
        "--default-artifact-root ./mlflow/artifacts --host 127.0.0.1 --port 5000",
        f"             then open {ui_url(experiment_id(DATASET))}",
        f"             (this demo is the run `demo {config.preset} s{config.seed}`; its steps are nested under it; "
        "see mlflow/README.md)",
        "  notebooks: notebooks/01_explore_data.ipynb, 02_recommend_for_a_user.ipynb, 03_compare_runs.ipynb "
        "(kernel python3 of .venv; headless: .venv/bin/jupyter execute notebooks/01_explore_data.ipynb)",
        f"  recommend: .venv/bin/recsys recommend --dataset {DATASET} --user-id {result.user_id}",
        f"  REST:      .venv/bin/recsys serve --dataset {DATASET}   (then POST to http://127.0.0.1:5001/invocations)",
    ]
    if config.processed_dir.as_posix() != "data/processed":
        lines.append(f"  (data is in {config.processed_dir}: pass --processed-dir to recommend, and set "
                     "RECSYS_PROCESSED_DIR for the notebooks)")
    print("\n".join(lines), file=out, flush=True)
