"""`recsys train content`: train the content encoders, then embed every video into the feature store.

Steps: open the feature store written by `recsys ingest`; train `ContentModule` with Lightning
(checkpoints of the best validation loss and of the last epoch, early stopping on the
validation loss, progress bar, seeds); log the config, per-epoch losses, cross-modal retrieval
accuracy and plots to MLflow; embed with the chosen checkpoint (`embed_from`) and write, for
EVERY item of the store (cold-start and failed ones included):

- `content_embedding.npy` float32 (N, D): the fused embedding (zero rows only for items with
  no usable modality at all, e.g. a failed video without a title)
- `embedding_<modality>.npy` float32 (N, D) for frames, motion, audio, title (zero rows where
  the item lacks that modality)
- `title_projection.safetensors`: the trained title projection, so that `recsys search` embeds a
  text query the way titles were embedded
- `window_embedding.npy`, `windows.parquet`, `clip_seconds.npy`: the fused embeddings of the
  windows of clips longer than one window, and every clip's length (`recsys.content.windows`),
  from which search returns the matching time span
- `content.json`: D, modalities, per-modality counts, the MLflow run ID and the checkpoint.

On the synthetic corpus the latent topic of every video is known, so the run also logs the
accuracy of a linear probe from each embedding to the topic (`probe_<embedding>`).

Why the last checkpoint by default: the validation losses are instance-level (does this
sound find *this* clip among the batch), and they start to rise as the encoders memorise
training pairs while the topic-level structure that recommendations need still improves for
several epochs (on the synthetic corpus, linear-probe accuracy keeps rising for 3-6 epochs
after the validation minimum). Early stopping still ends training once the validation loss has
not improved for `patience` epochs, and the best-loss checkpoint is kept and logged beside it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from recsys.config import ContentConfig, to_dict
from recsys.content.datamodule import ContentArrays, ContentDataModule
from recsys.content.embedding_files import CONTENT_EMBEDDING, CONTENT_JSON, read_item_embeddings
from recsys.content.encoder import MODALITIES, ContentEncoder, EncoderSpec
from recsys.content.module import ContentModule, cross_modal_retrieval
from recsys.content.title_encoder import save_title_projection
from recsys.content.windows import embed_windows, write_windows
from recsys.data.paths import PreparedPaths
from recsys.errors import DataFormatError
from recsys.files import write_json
from recsys.media.feature_store import FeatureStore
from recsys.threads import torch_threads
from recsys.tracking.callbacks import MlflowEpochMetrics

STEP = "content"


def encoder_spec(config: ContentConfig, n_mels: int) -> EncoderSpec:
    """The encoder architecture a config asks for (`n_mels` comes from the feature store)."""
    return EncoderSpec(
        backbone=config.backbone,
        backbone_weights=config.backbone_weights,
        freeze_backbone=config.freeze_backbone,
        temporal=config.temporal,
        bidirectional=config.bidirectional,
        fusion=config.fusion,
        embedding_dim=config.embedding_dim,
        hidden_dim=config.hidden_dim,
        modality_dropout=config.modality_dropout,
        n_mels=n_mels,
    )


@dataclass
class ExtractedEmbeddings:
    """Embeddings of every item of a store, row = item_idx."""

    fused: np.ndarray
    """float32 (N, D)"""
    stacked: np.ndarray
    """float32 (N, M, D) in `MODALITIES` order, zero rows where a modality is missing"""
    mask: np.ndarray
    """bool (N, M): modality present"""
    weights: np.ndarray
    """float32 (N, M): each modality's share of the fused embedding"""

    def modality(self, name: str) -> np.ndarray:
        """(N, D) embedding of one modality."""
        return self.stacked[:, MODALITIES.index(name)]


@torch.inference_mode()
def extract_embeddings(encoder: ContentEncoder, arrays: ContentArrays, batch_size: int = 128
                       ) -> ExtractedEmbeddings:
    """Run the encoder (eval mode, no modality dropout) over every row of the store."""
    encoder.eval()
    fused, stacked, mask, weights = [], [], [], []
    for start in range(0, len(arrays), batch_size):
        batch = arrays.batch(np.arange(start, min(start + batch_size, len(arrays))))
        out = encoder(batch)
        fused.append(out.fused)  # (b, D)
        stacked.append(out.stacked)  # (b, M, D)
        mask.append(out.mask)  # (b, M)
        weights.append(encoder.fusion.modality_weights(out.stacked, out.mask))  # (b, M)
    return ExtractedEmbeddings(
        fused=torch.cat(fused).float().numpy(),
        stacked=torch.cat(stacked).float().numpy(),
        mask=torch.cat(mask).numpy(),
        weights=torch.cat(weights).float().numpy(),
    )


def write_embeddings(store: FeatureStore, embeddings: ExtractedEmbeddings, info: dict[str, Any]) -> list[Path]:
    """Write the fused and per-modality embeddings into the store, then `content.json` (written last)."""
    paths = [store.write_array(CONTENT_EMBEDDING, embeddings.fused)]
    for name in MODALITIES:
        paths.append(store.write_array(f"embedding_{name}", np.ascontiguousarray(embeddings.modality(name))))
    present = embeddings.mask.sum(0)
    document = {
        "D": int(embeddings.fused.shape[1]),
        "N": int(embeddings.fused.shape[0]),
        "modalities": list(MODALITIES),
        "files": {"fused": f"{CONTENT_EMBEDDING}.npy", **{m: f"embedding_{m}.npy" for m in MODALITIES}},
        "present": {m: int(c) for m, c in zip(MODALITIES, present, strict=True)},
        "no_modality": int((~embeddings.mask.any(1)).sum()),
        **info,
    }
    paths.append(write_json(store.folder / CONTENT_JSON, document))
    return paths


def topic_probe(embeddings: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None,
                test_rows: np.ndarray | None = None, folds: int = 5, seed: int = 0) -> float:
    """Accuracy of a linear probe (standardised logistic regression) from embeddings to labels.

    Cross-validated over `rows` (default all); with `test_rows`, fitted on `rows` and scored on
    `test_rows` instead (e.g. fitted on videos with sound, scored on silent ones).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    if test_rows is not None:
        if len(np.unique(labels[rows])) < 2 or len(test_rows) == 0:
            raise ValueError("the probe needs two labels to fit and at least one item to score")
        probe.fit(embeddings[rows], labels[rows])
        return float(probe.score(embeddings[test_rows], labels[test_rows]))
    values, counts = np.unique(labels[rows], return_counts=True)
    kept = values[counts >= 2]  # a label seen once cannot be in a training fold and a test fold at once
    rows = rows[np.isin(labels[rows], kept)]
    if len(kept) < 2:
        raise ValueError("the probe needs at least two labels with two items each")
    cv = StratifiedKFold(min(folds, int(counts[counts >= 2].min())), shuffle=True, random_state=seed)
    return float(cross_val_score(probe, embeddings[rows], labels[rows], cv=cv).mean())


def synthetic_topics(paths: PreparedPaths, store: FeatureStore) -> np.ndarray | None:
    """Latent topic of every store row when the dataset is the synthetic corpus (its truth is known)."""
    from recsys.synthetic.truth import SynthTruth, corpus_folder

    folder = corpus_folder(paths)
    if folder is None:
        return None
    truth = SynthTruth.load(folder)
    return truth.item_topic[truth.item_index(store.manifest.get_column("item_id").to_list())]


def collaborative_embeddings(config: ContentConfig, paths: PreparedPaths, n_items: int) -> tuple[torch.Tensor, str]:
    """Item embeddings of a trained two-tower model (zero rows for items never seen in training), its run ID.

    Read from the file the two-tower training wrote (`recsys.content.embedding_files`)."""
    import polars as pl

    items, run_id = read_item_embeddings(config.processed_dir, config.dataset, config.distill_run)  # (N, Dc)
    if items.shape[0] != n_items:
        raise DataFormatError(
            f"two-tower run {run_id} embeds {items.shape[0]} items but the feature store has {n_items}; "
            f"retrain it on the current data (`recsys train retrieval {config.dataset}`)"
        )
    warm = pl.read_parquet(paths.items, columns=["train_count"]).get_column("train_count").to_numpy() > 0
    # Cold items' two-tower embeddings come from content alone: distilling those would be circular.
    return torch.from_numpy(np.where(warm[:, None], items, 0.0).astype(np.float32)), run_id


def run_name(config: ContentConfig) -> str:
    """What tells content runs apart in the UI: backbone, motion encoder, fusion, width, distillation, seed
    (e.g. `content small gru gated d64 s0`)."""
    distill = ["distill"] if config.distill_weight > 0 else []
    return " ".join([STEP, config.backbone, config.temporal, config.fusion, f"d{config.embedding_dim}", *distill,
                     f"s{config.seed}"])


def train_content(config: ContentConfig) -> dict[str, Any]:
    """Train the content encoders on a dataset's feature store and write every item's embeddings into it.

    Returns a summary: MLflow run ID, epochs, best validation loss, retrieval accuracy, probe
    accuracies (synthetic corpus), written files.
    """
    with torch_threads(config.threads):
        return _train(config)


def _train(config: ContentConfig) -> dict[str, Any]:
    import mlflow

    from recsys.tracking.inputs import log_tables
    from recsys.tracking.store import start_run

    paths = PreparedPaths.of(config.processed_dir, config.dataset).require()
    store = FeatureStore.open(paths.features)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    data = ContentDataModule(paths.features, config.batch_size, config.val_fraction, config.seed, config.workers)
    data.setup("fit")
    spec = encoder_spec(config, n_mels=store.layout.n_mels)
    inputs = {"features": str(store.info.get("mlflow_run_id") or paths.features)}
    collab = None
    if config.distill_weight > 0:
        collab, inputs["two_tower"] = collaborative_embeddings(config, paths, len(store))
    module = ContentModule(
        ContentEncoder(spec), lr=config.learning_rate, weight_decay=config.weight_decay,
        temperature=config.temperature, fusion_weight=config.fusion_weight, motion_weight=config.motion_weight,
        fused_motion_weight=config.fused_motion_weight,
        augment=config.augment,
        distill_weight=config.distill_weight, collab_embeddings=collab, max_epochs=config.max_epochs,
    )
    with start_run(config.dataset, STEP, to_dict(config), inputs=inputs, run_name=run_name(config)) as run:
        run_id = run.info.run_id
        if paths.items.exists():  # a feature store made outside `data prepare` (tests, benchmarks) has no catalogue
            log_tables(config.dataset, {"catalogue": paths.items})
        mlflow.log_params({"encoder.n_mels": spec.n_mels, "train_items": len(data.train_rows),
                           "val_items": len(data.val_rows), "items": len(store)})
        checkpoints = config.checkpoint_dir / config.dataset / STEP / run_id
        best = pl.callbacks.ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val_loss", mode="min",
                                            save_last=True)
        history = MlflowEpochMetrics()
        trainer = pl.Trainer(
            max_epochs=config.max_epochs,
            accelerator="cpu",
            callbacks=[best, pl.callbacks.EarlyStopping("val_loss", patience=config.patience), history],
            logger=False,
            enable_progress_bar=config.progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            default_root_dir=checkpoints,
        )
        started = time.perf_counter()
        trainer.fit(module, datamodule=data)
        train_seconds = time.perf_counter() - started
        for path in {best.best_model_path, best.last_model_path} - {""}:
            mlflow.log_artifact(path, "checkpoint")
        checkpoint = best.last_model_path
        if config.embed_from == "best" and best.best_model_path:
            checkpoint = best.best_model_path
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)

        assert data.arrays is not None
        started = time.perf_counter()
        embeddings = extract_embeddings(module.encoder, data.arrays)
        extract_seconds = time.perf_counter() - started
        val_metrics = cross_modal_retrieval(torch.from_numpy(embeddings.stacked[data.val_rows]),
                                            torch.from_numpy(embeddings.mask[data.val_rows]))
        summary: dict[str, Any] = {
            "run_id": run_id,
            "epochs": trainer.current_epoch,
            "best_val_loss": float(best.best_model_score) if best.best_model_score is not None else None,
            "train_seconds": train_seconds,
            "extract_items_per_s": len(store) / max(extract_seconds, 1e-9),
            **{f"embedded_{k}": v for k, v in val_metrics.items()},
            **{f"fusion_weight_{m}": float(embeddings.weights[embeddings.mask[:, i], i].mean())
               for i, m in enumerate(MODALITIES) if embeddings.mask[:, i].any()},
        }
        topics = synthetic_topics(paths, store)
        if topics is not None:
            summary.update(_probe_metrics(embeddings, topics, store, config.seed))
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, int | float)
                            and k != "epochs" and v is not None})
        _log_plots(history.history, embeddings, topics)
        projection = save_title_projection(module.encoder.title, store.folder)  # search embeds queries with it
        files = [projection, *write_embeddings(store, embeddings, {
            "run_id": run_id,
            "checkpoint": checkpoint or None,
            "embedded_from": config.embed_from,
            "spec": dataclasses.asdict(spec),
            "best_val_loss": summary["best_val_loss"],
        })]
        started = time.perf_counter()
        windows = embed_windows(module.encoder, store)  # where in a long clip a search matches
        files += write_windows(store.folder, windows)
        summary["windows"], summary["window_seconds"] = len(windows.item_idx), time.perf_counter() - started
        mlflow.log_metrics({"windows": summary["windows"], "window_seconds": summary["window_seconds"]})
        summary["files"] = [str(p) for p in files]
        summary["store"] = str(store.folder)
    return summary


def _probe_metrics(embeddings: ExtractedEmbeddings, topics: np.ndarray, store: FeatureStore, seed: int
                   ) -> dict[str, float]:
    """Topic probe accuracy of the fused and each modality embedding, over items where it exists."""
    ok = store.manifest.get_column("status").to_numpy() == "ok"
    metrics = {"probe_fused": topic_probe(embeddings.fused, topics, np.flatnonzero(ok), seed=seed)}
    for i, name in enumerate(MODALITIES):
        rows = np.flatnonzero(ok & embeddings.mask[:, i])
        try:
            metrics[f"probe_{name}"] = topic_probe(embeddings.stacked[:, i], topics, rows, seed=seed)
        except ValueError:
            continue  # too few items with this modality to cross-validate
    audio = embeddings.mask[:, MODALITIES.index("audio")]
    try:  # do silent videos land where videos of their topic with sound do?
        metrics["probe_fused_no_audio"] = topic_probe(
            embeddings.fused, topics, np.flatnonzero(ok & audio), test_rows=np.flatnonzero(ok & ~audio))
    except ValueError:
        pass
    return metrics


def _log_plots(epochs: list[dict[str, float]], embeddings: ExtractedEmbeddings, topics: np.ndarray | None = None
               ) -> None:
    """Log to the active run: per-epoch losses and cross-modal retrieval accuracy (`content_training`),
    the modalities' mean share of the fused embedding (`fusion_weights`) and the fused embeddings in
    2-D (`item_embeddings`), coloured by latent topic when `topics` (N,) is known (synthetic corpus)."""
    from matplotlib.figure import Figure

    from recsys.tracking.plots import embedding_map, log_figure, training_curves

    curves = {name for epoch in epochs for name in epoch if name.endswith("loss") or name in ("val_r1", "val_r5")}
    history = {name: [(step, epoch[name]) for step, epoch in enumerate(epochs) if name in epoch] for name in curves}
    log_figure(training_curves(history, title="content training: InfoNCE losses, cross-modal top-1/top-5"),
               "content_training")

    figure = Figure(figsize=(5, 3.5), layout="constrained")
    ax = figure.subplots()
    shares = [float(embeddings.weights[embeddings.mask[:, i], i].mean()) if embeddings.mask[:, i].any() else 0.0
              for i in range(len(MODALITIES))]
    ax.bar(MODALITIES, shares)
    ax.set(ylabel="mean fusion weight", title="Share of each modality in the fused embedding")
    log_figure(figure, "fusion_weights")

    # Items without any usable modality have a zero fused embedding: nothing to place on the map.
    embedded = np.flatnonzero(np.abs(embeddings.fused).sum(axis=1) > 0)
    if len(embedded) >= 2:
        labels = None if topics is None else [f"topic {t}" for t in np.asarray(topics)[embedded]]
        log_figure(embedding_map(embeddings.fused[embedded], labels, title="fused content embeddings"),
                   "item_embeddings")
