"""`recsys train retrieval`: train the two-tower model on a prepared dataset, tracked in MLflow.

Reads the prepared parquet files and, when present, the content embeddings of the feature store;
trains `RetrievalModule` with a Lightning Trainer on CPU; keeps the best checkpoint by validation
NDCG@10; writes the trained model (safetensors + JSON) for retrieval and evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint

from recsys.config import RetrievalConfig, to_dict
from recsys.data.paths import PreparedPaths
from recsys.errors import DataFormatError, MissingInputError
from recsys.threads import torch_threads
from recsys.tracking.inputs import log_tables
from recsys.tracking.plots import log_retrieval_plots
from recsys.tracking.store import fingerprint_files, latest_run_id, start_run
from recsys.twotower.datamodule import RetrievalDataModule
from recsys.twotower.module import VAL_METRIC, RetrievalModule
from recsys.twotower.new_videos import fit_new_videos, new_video_metrics
from recsys.twotower.towers import TwoTower, TwoTowerSpec
from recsys.twotower.trained_model import NEW_VIDEO_SCORING, models_dir, save_trained

CONTENT_FILES = {"fused": "content_embedding.npy", "title": "title_embedding.npy"}
"""Feature store files holding one content embedding per item, by `content` option."""
CONTENT_META = "content.json"


@dataclass
class ItemContent:
    """The content embedding chosen for the item tower."""

    source: str
    """fused, title or none"""
    embedding: np.ndarray | None
    """float32 (N, C), row i = item_idx i; None without content"""


def content_file(paths: PreparedPaths, choice: str) -> tuple[str, Path | None]:
    """(source, file) of the content embedding per `choice`: auto takes fused, else title, else none."""
    if choice == "none":
        return "none", None
    for source in ["fused", "title"] if choice == "auto" else [choice]:
        path = paths.features / CONTENT_FILES[source]
        if path.exists():
            return source, path
    if choice == "auto":
        return "none", None
    raise MissingInputError(
        f"content={choice}: {paths.features / CONTENT_FILES[choice]} does not exist; "
        f"run `recsys ingest {paths.root.name}`" + (" and `recsys train content`" if choice == "fused" else "")
        + ", or choose --content auto/none"
    )


def load_content(paths: PreparedPaths, choice: str, n_items: int) -> ItemContent:
    """The content embedding per `choice`, checked against the catalogue size."""
    source, path = content_file(paths, choice)
    if path is None:
        return ItemContent("none", None)
    stored = np.load(path, mmap_mode="r")
    if stored.ndim != 2 or stored.shape[0] != n_items:
        raise DataFormatError(
            f"{path}: shape {stored.shape}, expected ({n_items}, D) rows for the {n_items} prepared items; "
            f"re-run `recsys ingest {paths.root.name}` after `recsys data prepare`"
        )
    # A private in-memory copy: the model keeps it as a buffer that loading a checkpoint writes into,
    # which a read-only memory map would not allow.
    embedding = np.array(stored, dtype=np.float32)
    if not np.isfinite(embedding).all():
        raise DataFormatError(f"{path}: holds NaN or infinite values; re-create it")
    return ItemContent(source, embedding)


def upstream_inputs(config: RetrievalConfig, paths: PreparedPaths) -> dict[str, str]:
    """Lineage of a training run for MLflow: prepared files, the prepare run, the content file and run."""
    inputs = {
        "prepared": fingerprint_files([paths.train, paths.valid, paths.popularity]),
        "prepare_run": latest_run_id(config.dataset, "prepare") or "unknown",
    }
    source, path = content_file(paths, config.content)
    if path is not None:
        inputs[f"content_{source}"] = fingerprint_files([path])
        meta = paths.features / CONTENT_META
        if source == "fused" and meta.exists():
            inputs["content_run"] = str(json.loads(meta.read_text()).get("run_id", "unknown"))
    return inputs


def run_name(config: RetrievalConfig, content_source: str) -> str:
    """What tells training runs apart in the UI: history encoder, item content, ID embeddings, size, seed.

    E.g. `train_retrieval gru fused d64 s0`, `train_retrieval attention none d32 s1`,
    `train_retrieval gru title no-ids d64 s0` (the content-only model).
    """
    ids = [] if config.ids else ["no-ids"]
    return " ".join(["train_retrieval", config.encoder, content_source, *ids, f"d{config.dim}", f"s{config.seed}"])


@contextmanager
def training_run(config: RetrievalConfig, paths: PreparedPaths, inputs: dict[str, str]) -> Iterator[Any]:
    """The MLflow run of one training (single-process or sharded), named by `run_name`, with the
    splits and the catalogue it reads logged as its datasets."""
    source, _ = content_file(paths, config.content)
    with start_run(config.dataset, "train_retrieval", to_dict(config), inputs, run_name(config, source)) as run:
        log_tables(config.dataset, {"train": paths.train, "valid": paths.valid, "catalogue": paths.items})
        yield run


def build_model(config: RetrievalConfig, data: RetrievalDataModule, content: ItemContent) -> TwoTower:
    """The TwoTower for a config and a dataset (the same for single-process and sharded training)."""
    spec = TwoTowerSpec(
        n_users=data.n_users,
        n_items=data.n_items,
        dim=config.dim,
        max_history=config.max_history,
        encoder=config.encoder,
        layers=config.layers,
        heads=config.heads,
        dropout=config.dropout,
        use_ids=config.ids,
        user_id_dropout=config.user_id_dropout,
        item_id_dropout=config.item_id_dropout if content.embedding is not None else 0.0,
        content_dim=0 if content.embedding is None else content.embedding.shape[1],
        content_source=content.source,
        taste_clusters=0 if content.embedding is None else config.taste_clusters,
        fresh_views=len(data.fresh_items) if config.fresh_views else 0,
    )
    embedding = None if content.embedding is None else torch.from_numpy(content.embedding)
    fresh = (torch.from_numpy(data.fresh_users), torch.from_numpy(data.fresh_items)) if config.fresh_views else None
    return TwoTower(spec, content=embedding, known_items=torch.from_numpy(data.known_items), fresh_views=fresh)


class MlflowEpochMetrics(Callback):
    """Logs every epoch's train and validation metrics to the active MLflow run (step = epoch)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        import mlflow

        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        metrics["epoch"] = trainer.current_epoch
        self.history.append(metrics)
        mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=trainer.current_epoch)


@dataclass
class RetrievalResult:
    """What a training run produced."""

    run_id: str
    model_dir: Path
    checkpoint: Path
    best_val_ndcg: float
    epochs: int
    content_source: str
    history: list[dict[str, float]]


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
