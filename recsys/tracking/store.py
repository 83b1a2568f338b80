"""MLflow: where runs are stored, one experiment per dataset, and what every run records.

The store defaults to `sqlite:///mlflow/mlflow.db` (relative to the working directory) with
artifacts under `mlflow/artifacts`; `MLFLOW_TRACKING_URI` overrides it. Every pipeline step that
produces files opens a run through `start_run`, which records the step's config, the fingerprint
of its inputs (file hashes or upstream run IDs) and system info, so lineage can be traced in
the MLflow UI. A command that runs several steps (`recsys demo`) opens its own run with
`pipeline_run`; the steps' runs open nested under it.

A process killed by SIGKILL (or the machine going down) cannot end its run, which would stay
RUNNING forever. So every run names the process that owns it (tag `recsys.owner`: host, PID and
the process's start time, which tells a reused PID apart), and the first command that touches a
store marks KILLED every RUNNING run whose owner on this host is gone (`mark_dead_runs`). Runs owned
by another host are left as they are: their process cannot be checked from here.
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import time
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
OWNER_TAG = "recsys.owner"
"""Tag naming the process that runs a run: `host:pid:start`, see `process_owner`."""
KILLED_TAG = "recsys.killed"
"""Tag set on a run marked KILLED because its process was gone: why, and when it was found."""

_checked_stores: set[str] = set()
"""Stores this process has already swept for runs of dead processes."""


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
    if uri not in _checked_stores:
        _checked_stores.add(uri)
        mark_dead_runs()
    return uri


def _process_start(pid: int) -> str:
    """When a process started, in clock ticks since boot (Linux `/proc/<pid>/stat` field 22); "" elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


def process_owner(pid: int | None = None) -> str:
    """`host:pid:start` of a process (this one by default): what `OWNER_TAG` holds."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def owner_is_alive(owner: str) -> bool | None:
    """Whether the process an `OWNER_TAG` names still runs; None when it is on another host."""
    host, pid_text, start = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return _process_start(pid) == start  # a different start time: the PID was reused


def mark_dead_runs() -> list[str]:
    """Mark KILLED every RUNNING run whose owning process on this host has exited; their run IDs.

    Called once per process and store by `configure`, so the next command after a kill finds and
    ends the killed run. The end time is when the death was found (a killed process logs no end).
    """
    import mlflow
    from mlflow import MlflowClient

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'",
                              output_format="list")
    client = MlflowClient()
    marked = []
    for run in runs:
        owner = run.data.tags.get(OWNER_TAG)
        if owner is None or owner_is_alive(owner) is not False:
            continue
        client.set_tag(run.info.run_id, KILLED_TAG, f"process {owner} was gone at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        client.set_terminated(run.info.run_id, status="KILLED")
        marked.append(run.info.run_id)
    return marked


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


def open_store() -> None:
    """Do ahead what `start_run` does first: open the store (sweeping it for dead runs, see `configure`) and
    resolve MLflow's run context (git). Commands run it in a thread while they compute, so that their run
    opens without waiting on the store; no experiment is made until the run opens."""
    from mlflow.tracking.context.registry import resolve_tags

    configure()
    resolve_tags()


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
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """Open a run in the dataset's experiment that records config, inputs and system info.

    `inputs` maps an input's name to its fingerprint or upstream run ID; each becomes a tag
    `recsys.input.<name>` so the UI can trace where a run's data came from. `run_id` continues an
    existing run of the experiment (a resumed training) instead of opening a new one: it is RUNNING
    again, owned by this process. `tags` are set as well. Inside `pipeline_run` (RECSYS_PARENT_RUN
    set, inherited by worker processes) the run opens nested under that run.
    """
    import mlflow

    all_tags = {
        "recsys.step": step,
        "recsys.dataset": dataset,
        **{f"recsys.input.{name}": value for name, value in inputs.items()},
        **(tags or {}),
        OWNER_TAG: process_owner(),
    }
    if os.environ.get("RECSYS_PIPELINE"):
        all_tags[PIPELINE_TAG] = os.environ["RECSYS_PIPELINE"]
    experiment = experiment_id(dataset)
    if run_id is not None:
        # Owner first: the run must not look RUNNING under its dead owner, which the next sweep would kill.
        mlflow.MlflowClient().set_tag(run_id, OWNER_TAG, all_tags[OWNER_TAG])
    parent = os.environ.get(PARENT_RUN_ENV) or None
    with mlflow.start_run(run_id=run_id, experiment_id=experiment, run_name=None if run_id else run_name or step,
                          tags=all_tags, nested=parent is not None,
                          parent_run_id=parent if run_id is None else None) as run:
        if run_id is None:  # a continued run keeps the params and config it was started with
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
