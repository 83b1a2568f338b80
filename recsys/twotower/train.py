"""`recsys train retrieval`: train the two-tower model on a prepared dataset, tracked in MLflow.

Reads the prepared parquet files and, when present, the content embeddings of the feature store;
trains `RetrievalModule` with a Lightning Trainer on CPU; keeps the best checkpoint by validation
NDCG@10; writes the trained model (safetensors + JSON) for retrieval and evaluation.

A killed training is continued with `--resume` (`plan_resume` says which run): the same MLflow run
goes on from the checkpoint written at the end of its last finished epoch. Checkpoints are written
atomically and hold the random generators and the shuffling position (`recsys.checkpoints`,
`RetrievalDataModule.state_dict`), so the continued run logs the same per-epoch metrics as a run
that was never stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from recsys.checkpoints import AtomicCheckpointIO, RandomState, ResumableEarlyStopping, remove_partial_files
from recsys.config import RESUME_LATEST, ConfigError, RetrievalConfig, to_dict
from recsys.data.paths import PreparedPaths
from recsys.errors import MissingInputError
from recsys.threads import torch_threads
from recsys.tracking.callbacks import MlflowEpochMetrics
from recsys.twotower.build import RetrievalResult, build_model, load_content, training_run, upstream_inputs
from recsys.twotower.datamodule import RetrievalDataModule
from recsys.twotower.module import RetrievalModule
from recsys.twotower.new_videos import fit_new_videos, new_video_metrics
from recsys.twotower.plots import log_retrieval_plots
from recsys.twotower.trained_model import NEW_VIDEO_SCORING, models_dir, save_trained
from recsys.twotower.validation import VAL_METRIC


def checkpoint_root(processed_dir: Path, dataset: str) -> Path:
    return models_dir(processed_dir, dataset) / "checkpoints"


LAST_CHECKPOINT = "last.ckpt"
"""A run's newest checkpoint (end of its last finished epoch), in `checkpoint_root/<run_id>/`."""
RESUME_KEY_TAG = "recsys.resume_key"
"""Tag of a training run: a hash of its config and input data; `--resume` continues only a run with the same one."""
RESUMES_TAG = "recsys.resumes"
"""Tag of a training run: how many times it was continued after a kill."""
RESUME_FREE_FIELDS = ("resume", "resume_or_start", "progress_bar", "threads")
"""Config fields that may differ between a run and its continuation (they change no result)."""


def resume_key(config: RetrievalConfig, inputs: dict[str, str]) -> str:
    """What a continued run must share with the killed one: every result-changing setting and the data."""
    settings = {name: value for name, value in to_dict(config).items() if name not in RESUME_FREE_FIELDS}
    data = {name: value for name, value in inputs.items() if name == "prepared" or name.startswith("content_")}
    return hashlib.sha256(json.dumps([settings, data], sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ResumePlan:
    """Which MLflow run a training logs into, and the checkpoint it continues from."""

    run_id: str | None
    """The run to continue; None: a new run"""
    checkpoint: Path | None
    """`last.ckpt` to continue from; None: train from the start"""


def plan_resume(config: RetrievalConfig, key: str) -> ResumePlan:
    """The run `--resume` / `--resume-or-start` continue, or a RecsysError saying why there is none.

    Only an unfinished run (killed, failed, or RUNNING with its process gone) of this dataset with
    the same resume key is continued: the one named, or the newest. A finished run never is, and a
    run whose process still runs is left alone. A run killed before its first checkpoint has nothing
    to continue: `--resume` refuses, `--resume-or-start` trains it again from the start.
    """
    if config.resume is None and not config.resume_or_start:
        return ResumePlan(None, None)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from recsys.tracking.store import OWNER_TAG, configure, experiment_id, mark_dead_runs

    configure()
    mark_dead_runs()
    client = MlflowClient()
    flag = "--resume" if config.resume is not None else "--resume-or-start"
    if config.resume not in (None, RESUME_LATEST):
        try:
            run = client.get_run(config.resume)
        except MlflowException:
            raise MissingInputError(f"--resume {config.resume}: no such run in the MLflow store; "
                                    f"list runs with `recsys runs --step train_retrieval`") from None
        tags = run.data.tags
        if tags.get("recsys.step") != "train_retrieval" or tags.get("recsys.dataset") != config.dataset:
            raise ConfigError(f"--resume {config.resume}: that run is a {tags.get('recsys.step')} run of "
                              f"{tags.get('recsys.dataset')}, not a train_retrieval run of {config.dataset}")
        if run.info.status == "FINISHED":
            raise ConfigError(f"--resume {config.resume}: that run finished; a finished run is never continued "
                              f"(train a new one without --resume)")
        if tags.get(RESUME_KEY_TAG) != key:
            raise ConfigError(f"--resume {config.resume}: that run was trained with other settings or data "
                              f"({_differences(run.data.params, config)}); continue it with the same ones")
    else:
        found = client.search_runs(
            [experiment_id(config.dataset)],
            filter_string=f"tags.`recsys.step` = 'train_retrieval' and tags.`{RESUME_KEY_TAG}` = '{key}' "
                          f"and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if not found:
            if config.resume_or_start:
                return ResumePlan(None, None)
            raise MissingInputError(f"--resume: no unfinished train_retrieval run of {config.dataset} with these "
                                    f"settings and data (finished runs are never continued); train without "
                                    f"--resume, or name a run: --resume RUN_ID")
        run = found[0]
    run_id = run.info.run_id
    if run.info.status == "RUNNING":
        raise ConfigError(f"{flag}: run {run_id} is still running (process {run.data.tags.get(OWNER_TAG, '?')}); "
                          f"stop it before continuing it")
    checkpoint = checkpoint_root(config.processed_dir, config.dataset) / run_id / LAST_CHECKPOINT
    if checkpoint.exists():
        return ResumePlan(run_id, checkpoint)
    if config.resume_or_start:
        return ResumePlan(run_id, None)
    raise MissingInputError(f"--resume: run {run_id} ({run.info.status}) stopped before its first checkpoint, "
                            f"{checkpoint} does not exist: there is nothing to continue; train it again from the "
                            f"start with --resume-or-start, or train a new run without --resume")


def _differences(params: dict[str, str], config: RetrievalConfig) -> str:
    """`name: run's value -> this value` for the config fields that differ from a run's params."""
    from recsys.tracking.store import flatten_params

    now = {k: v for k, v in flatten_params(to_dict(config)).items() if k not in RESUME_FREE_FIELDS}
    changed = [f"{name}: {params.get(name)} -> {value}" for name, value in now.items() if params.get(name) != value]
    return ", ".join(changed) or "the same settings, other data"


def train_retrieval(config: RetrievalConfig) -> RetrievalResult:
    """Train the two-tower model; returns the MLflow run ID, model folder and validation results."""
    if config.world_size > 1:
        from recsys.twotower.distributed import train_sharded

        return train_sharded(config)
    paths = PreparedPaths.of(config.processed_dir, config.dataset).require()
    with torch_threads(config.threads):
        return _train(config, paths)


def _train(config: RetrievalConfig, paths: PreparedPaths) -> RetrievalResult:
    inputs = upstream_inputs(config, paths)
    key = resume_key(config, inputs)
    plan = plan_resume(config, key)  # before anything is trained: a refusal costs nothing
    L.seed_everything(config.seed, workers=True, verbose=False)
    data = RetrievalDataModule(paths, max_history=config.max_history, batch_size=config.batch_size,
                               seed=config.seed, validation_users=config.validation_users)
    data.setup("fit")
    content = load_content(paths, config.content, data.n_items)
    model = build_model(config, data, content)
    module = RetrievalModule(
        model, data.item_probabilities(), temperature=config.temperature, logq_correction=config.logq_correction,
        uniform_negatives=config.uniform_negatives, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, content_only_weight=config.content_only_weight,
    )
    tags = {RESUME_KEY_TAG: key}
    if plan.run_id is not None:
        import mlflow

        previous = mlflow.MlflowClient().get_run(plan.run_id).data.tags.get(RESUMES_TAG, "0")
        tags[RESUMES_TAG] = str(int(previous) + 1)

    with training_run(config, paths, inputs, run_id=plan.run_id, tags=tags) as run:
        import mlflow

        run_id = run.info.run_id
        ckpt_dir = checkpoint_root(config.processed_dir, config.dataset) / run_id
        remove_partial_files(ckpt_dir)
        if plan.checkpoint is None and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # a run trained again from the start keeps nothing of its first try
        # Saved at the end of each training epoch, after its validation and metrics: a resumed run
        # starts the next epoch with everything the uninterrupted run would have had. `last` is a
        # checkpoint of its own: at a train epoch's end, save_last=True only saves with a new best.
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=VAL_METRIC, mode="max",
                                     save_top_k=1, save_on_train_epoch_end=True, enable_version_counter=False)
        last = ModelCheckpoint(dirpath=ckpt_dir, filename=Path(LAST_CHECKPOINT).stem, save_top_k=1,
                               save_on_train_epoch_end=True, enable_version_counter=False)
        metrics = MlflowEpochMetrics()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=config.max_epochs, logger=False,
            callbacks=[checkpoint, last, ResumableEarlyStopping(VAL_METRIC, mode="max", patience=config.patience),
                       metrics, RandomState()],
            plugins=[AtomicCheckpointIO()],
            num_sanity_val_steps=0, enable_progress_bar=config.progress_bar, enable_model_summary=False,
            deterministic=True, default_root_dir=ckpt_dir,
        )
        trainer.fit(module, datamodule=data, ckpt_path=plan.checkpoint, weights_only=True)

        best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else ckpt_dir / LAST_CHECKPOINT
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        best = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan")
        scoring, scored_ndcg, _ = fit_new_videos(model, data.fit_dataloader(), data.fresh_view_dataloader(),
                                                     config.seed)
        info: dict[str, Any] = {
            "best_val_ndcg_10": best,
            "epochs": trainer.current_epoch,
            "content_source": content.source,
            NEW_VIDEO_SCORING: scoring.to_dict(),
            "config": to_dict(config),
            "history": metrics.history,
        }
        model_dir = save_trained(model.eval(), config.processed_dir, config.dataset, run_id, info)
        mlflow.log_metrics({"best_val_ndcg_10": best, "epochs_trained": trainer.current_epoch,
                            **new_video_metrics(scoring, scored_ndcg)})
        mlflow.set_tag("recsys.model_dir", str(model_dir))
        log_retrieval_plots(run_id, model, paths)
        mlflow.log_artifact(str(best_path), artifact_path="checkpoint")
        mlflow.log_artifact(str(model_dir / "model.json"), artifact_path="model")
    return RetrievalResult(run_id, model_dir, best_path, best, trainer.current_epoch, content.source, metrics.history)
