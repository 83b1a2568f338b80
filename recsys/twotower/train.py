"""`recsys train retrieval`: train the two-tower model on a prepared dataset, tracked in MLflow.

Reads the prepared parquet files and, when present, the content embeddings of the feature store;
trains `RetrievalModule` with a Lightning Trainer on CPU; keeps the best checkpoint by validation
NDCG@10; writes the trained model (safetensors + JSON) for retrieval and evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from recsys.config import RetrievalConfig, to_dict
from recsys.data.paths import PreparedPaths
from recsys.errors import MissingInputError
from recsys.threads import torch_threads
from recsys.tracking.callbacks import MlflowEpochMetrics
from recsys.twotower.build import RetrievalResult, build_model, load_content, training_run, upstream_inputs
from recsys.twotower.datamodule import RetrievalDataModule
from recsys.twotower.module import VAL_METRIC, RetrievalModule
from recsys.twotower.new_videos import fit_new_videos, new_video_metrics
from recsys.twotower.plots import log_retrieval_plots
from recsys.twotower.trained_model import NEW_VIDEO_SCORING, models_dir, save_trained


def checkpoint_root(processed_dir: Path, dataset: str) -> Path:
    return models_dir(processed_dir, dataset) / "checkpoints"


def newest_checkpoint(processed_dir: Path, dataset: str) -> Path:
    """The most recently written `last.ckpt` of a dataset (the run `--resume` continues)."""
    found = sorted(checkpoint_root(processed_dir, dataset).glob("*/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise MissingInputError(
            f"--resume: no checkpoint under {checkpoint_root(processed_dir, dataset)}; "
            f"start a run without --resume"
        )
    return found[-1]


def train_retrieval(config: RetrievalConfig) -> RetrievalResult:
    """Train the two-tower model; returns the MLflow run ID, model folder and validation results."""
    if config.world_size > 1:
        from recsys.twotower.distributed import train_sharded

        return train_sharded(config)
    paths = PreparedPaths.of(config.processed_dir, config.dataset).require()
    with torch_threads(config.threads):
        return _train(config, paths)


def _train(config: RetrievalConfig, paths: PreparedPaths) -> RetrievalResult:
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
    resume_from = newest_checkpoint(config.processed_dir, config.dataset) if config.resume else None
    inputs = upstream_inputs(config, paths)
    if resume_from is not None:
        inputs["resumed_from"] = resume_from.parent.name

    with training_run(config, paths, inputs) as run:
        import mlflow

        run_id = run.info.run_id
        ckpt_dir = resume_from.parent if resume_from is not None else checkpoint_root(
            config.processed_dir, config.dataset) / run_id
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=VAL_METRIC, mode="max",
                                     save_top_k=1, save_last=True)
        metrics = MlflowEpochMetrics()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=config.max_epochs, logger=False,
            callbacks=[checkpoint, EarlyStopping(VAL_METRIC, mode="max", patience=config.patience), metrics],
            num_sanity_val_steps=0, enable_progress_bar=config.progress_bar, enable_model_summary=False,
            deterministic=True, default_root_dir=ckpt_dir,
        )
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)

        best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else ckpt_dir / "last.ckpt"
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        best = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan")
        scoring, scored_ndcg, _ = fit_new_videos(model, data.val_dataloader(), data.fresh_view_dataloader(),
                                                     config.seed)
        info: dict[str, Any] = {
            "best_val_ndcg_10": best,
            "epochs": trainer.current_epoch,
            "content_source": content.source,
            NEW_VIDEO_SCORING: scoring.to_dict(),
            "config": to_dict(config),
        }
        model_dir = save_trained(model.eval(), config.processed_dir, config.dataset, run_id, info)
        mlflow.log_metrics({"best_val_ndcg_10": best, "epochs_trained": trainer.current_epoch,
                            **new_video_metrics(scoring, scored_ndcg)})
        mlflow.set_tag("recsys.model_dir", str(model_dir))
        log_retrieval_plots(run_id, model, paths)
        mlflow.log_artifact(str(best_path), artifact_path="checkpoint")
        mlflow.log_artifact(str(model_dir / "model.json"), artifact_path="model")
    return RetrievalResult(run_id, model_dir, best_path, best, trainer.current_epoch, content.source, metrics.history)
