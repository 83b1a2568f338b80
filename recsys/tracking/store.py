"""MLflow: where runs are stored, one experiment per dataset, and what every run records.

The store defaults to `sqlite:///mlflow/mlflow.db` (relative to the working directory) with
artifacts under `mlflow/artifacts`; `MLFLOW_TRACKING_URI` overrides it. Every pipeline step that
produces files opens a run through `start_run`, which records the step's config, the fingerprint
of its inputs (file hashes or upstream run IDs) and system info, so lineage can be traced in
the MLflow UI. A command that runs several steps (`recsys demo`) opens its own run with
`pipeline_run`; the steps' runs open nested under it.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"
PIPELINE_TAG = "recsys.pipeline"
"""Tag grouping the runs of one `recsys demo` or scripted pipeline (value from RECSYS_PIPELINE)."""
PARENT_RUN_ENV = "RECSYS_PARENT_RUN"
"""Environment variable naming the run that `start_run` nests new runs under (set by `pipeline_run`)."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""The MLflow UI's experiment-kind tag (no Python constant in 3.17). Its experiment-kind selector reads and
writes it; 3.17's pages follow the sidebar's GenAI / Model training switch instead (see `recsys.demo.ui_url`)."""
EXPERIMENT_KIND = "custom_model_development"
"""The UI's "Machine learning" kind (`ExperimentKind.CUSTOM_MODEL_DEVELOPMENT` in the 3.17 UI): runs, not traces."""
DESCRIPTION_TAG = "mlflow.note.content"
"""The description the UI shows under an experiment's name (`mlflow.utils.mlflow_tags.MLFLOW_RUN_NOTE`)."""


def tracking_uri() -> str:
    """The tracking store in use: MLFLOW_TRACKING_URI, else the project's local sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    return None


def artifact_root(uri: str | None = None) -> Path | None:
    """Local artifact folder beside a sqlite store (`mlflow/artifacts` by default); None for servers."""
    db = _sqlite_path(uri or tracking_uri())
    return None if db is None else db.parent / "artifacts"


def configure() -> str:
    """Point MLflow at the store, creating the local folder when the store is a sqlite file."""
    import mlflow

    uri = tracking_uri()
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_tags(dataset: str) -> dict[str, str]:
    """Tags of a dataset's experiment: the UI opens it on its training runs and shows what it holds."""
    return {
        EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
        DESCRIPTION_TAG: (
            f"recsys runs on the {dataset} dataset. One run per pipeline step (synth, prepare, ingest, content, "
            "train_retrieval, evaluate, export), nested under the `recsys demo` run that started them; single "
            "commands stay top-level. Run names say what differs (e.g. `train_retrieval gru fused d64 s0`), the "
            "Dataset column shows each run's data splits and catalogue with their digests. Compare training runs "
            "on val_ndcg_10 (per epoch), test_ndcg_10 / test_hr_10 / test_mrr_10, test_cold_ndcg_10 and "
            f"test_coverage_10; the served model is models:/recsys-{dataset}@champion."
        ),
    }


def experiment_id(dataset: str) -> str:
    """The experiment of a dataset (created on first use, artifacts under the local artifact root).

    An experiment made before it was tagged gets its tags on the next run (what is already set stays).
    """
    import mlflow

    configure()
    existing = mlflow.get_experiment_by_name(dataset)
    if existing is not None:
        for key, value in experiment_tags(dataset).items():
            if key not in existing.tags:
                mlflow.MlflowClient().set_experiment_tag(existing.experiment_id, key, value)
        return existing.experiment_id
    root = artifact_root()
    location = (root / dataset).resolve().as_uri() if root is not None else None
    return mlflow.create_experiment(dataset, artifact_location=location, tags=experiment_tags(dataset))


def fingerprint_files(paths: Iterable[Path]) -> str:
    """A sha256 over the names, sizes and contents of files: equal inputs give equal fingerprints."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """MLflow params from a (nested) config dict: keys joined by dots, values as strings."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            params.update(flatten_params(value, prefix=f"{name}."))
        else:
            params[name] = str(value)[:6000]  # MLflow's limit on a param value
    return params


@contextmanager
def start_run(
    dataset: str,
    step: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    run_name: str | None = None,
) -> Iterator[Any]:
    """Open a run in the dataset's experiment that records config, inputs and system info.

    `inputs` maps an input's name to its fingerprint or upstream run ID; each becomes a tag
    `recsys.input.<name>` so the UI can trace where a run's data came from. Inside `pipeline_run`
    (RECSYS_PARENT_RUN set, inherited by worker processes) the run opens nested under that run.
    """
    import mlflow

    tags = {
        "recsys.step": step,
        "recsys.dataset": dataset,
        **{f"recsys.input.{name}": value for name, value in inputs.items()},
    }
    if os.environ.get("RECSYS_PIPELINE"):
        tags[PIPELINE_TAG] = os.environ["RECSYS_PIPELINE"]
    parent = os.environ.get(PARENT_RUN_ENV) or None
    with mlflow.start_run(experiment_id=experiment_id(dataset), run_name=run_name or step, tags=tags,
                          nested=parent is not None, parent_run_id=parent) as run:
        mlflow.log_params(flatten_params(config))
        mlflow.log_dict(config, "config.json")
        mlflow.log_dict(system_info(), "system.json")
        yield run


@contextmanager
def pipeline_run(
    dataset: str, step: str, config: dict[str, Any], inputs: dict[str, str], run_name: str | None = None
) -> Iterator[Any]:
    """A `start_run` run that every run opened inside the block nests under, in this process and its children.

    For commands that run several steps (`recsys demo`): the UI shows one row per invocation with
    its steps beneath it, where a single-step command's run stays top-level.
    """
    from recsys.environment import environment

    with start_run(dataset, step, config, inputs, run_name) as run, environment(**{PARENT_RUN_ENV: run.info.run_id}):
        yield run


def system_info() -> dict[str, str]:
    """Versions and machine facts worth keeping with a run."""
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "torch": torch.__version__,
        "cuda": str(torch.cuda.is_available()),
    }


def latest_run_id(dataset: str, step: str) -> str | None:
    """ID of the newest finished run of a step for a dataset (the upstream of a later step)."""
    import mlflow

    configure()
    experiment = mlflow.get_experiment_by_name(dataset)
    if experiment is None:
        return None
    runs = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`recsys.step` = '{step}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None
