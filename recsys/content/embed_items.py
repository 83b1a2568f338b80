"""Content embeddings of videos decoded after training, by the encoders the dataset was trained with.

`recsys catalogue add` decodes new videos into a feature store of their own (`recsys ingest` on
just those items, with the dataset store's decoding settings); this module turns that store into
the content embedding the two-tower item tower reads, of the same kind as at training:

- `title`: the MiniLM title embedding, as ingest wrote it;
- `fused`: the trained `ContentEncoder` (its checkpoint named in the dataset's `content.json`, or
  downloaded from the content run's MLflow artifacts when the local file is gone) over frames,
  audio and title, fused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recsys.content.embedding_files import CONTENT_JSON
from recsys.content.encoder import ContentEncoder, EncoderSpec
from recsys.errors import MissingInputError
from recsys.files import read_json
from recsys.media.feature_store import FeatureStore

STATE_PREFIX = "encoder."
"""Prefix of the encoder's weights in a ContentModule checkpoint."""


def trained_encoder(features: Path) -> ContentEncoder:
    """The content encoder whose fused embeddings the dataset's feature store `features` holds."""
    meta_file = features / CONTENT_JSON
    if not meta_file.exists():
        raise MissingInputError(f"{meta_file} not found: the model reads fused content, but no trained content "
                                "encoder is recorded for this dataset; run `recsys train content` first")
    meta = read_json(meta_file)
    checkpoint = Path(meta["checkpoint"]) if meta.get("checkpoint") else None
    if checkpoint is None or not checkpoint.exists():
        checkpoint = _download_checkpoint(str(meta.get("run_id")), checkpoint, meta_file)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    spec = EncoderSpec(**{**meta["spec"], "backbone_weights": None})  # the checkpoint holds every weight
    encoder = ContentEncoder(spec)
    encoder.load_state_dict({k.removeprefix(STATE_PREFIX): v for k, v in state.items() if k.startswith(STATE_PREFIX)})
    return encoder.eval()


def _download_checkpoint(run_id: str, local: Path | None, meta_file: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    name = local.name if local is not None else "last.ckpt"
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoint/{name}"))
    except MlflowException:
        raise MissingInputError(f"{meta_file}: content checkpoint {local} is gone and content run {run_id} has no "
                                f"checkpoint/{name} artifact; run `recsys train content` again") from None


def embed_store(store: FeatureStore, source: str, features: Path) -> np.ndarray:
    """float32 (M, C): the `source` ("title" or "fused") content embedding of every item of `store`.

    `features`: the dataset's own feature store folder (where the trained encoder is recorded).
    """
    if source == "title":
        return np.asarray(store.title_embedding, dtype=np.float32)
    if source != "fused":
        raise ValueError(f"unknown content source {source!r}")
    from recsys.content.datamodule import ContentArrays
    from recsys.content.train import extract_embeddings

    return extract_embeddings(trained_encoder(features), ContentArrays.of(store)).fused.astype(np.float32)
