"""What single-process and sharded two-tower training share: the item content, the model, the lineage.

`recsys.twotower.train` (Lightning, one process) and `recsys.twotower.distributed` (TorchRec
model parallel) build the same `TwoTower` from the same inputs here, and return the same
`RetrievalResult`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.config import RetrievalConfig, to_dict
from recsys.content.embedding_files import CONTENT_EMBEDDING, CONTENT_JSON
from recsys.data.paths import PreparedPaths
from recsys.errors import DataFormatError, MissingInputError
from recsys.media.feature_store import TITLES
from recsys.tracking.inputs import log_tables
from recsys.tracking.store import fingerprint_files, latest_run_id, start_run
from recsys.twotower.datamodule import RetrievalDataModule
from recsys.twotower.towers import TwoTower, TwoTowerSpec

CONTENT_FILES = {"fused": f"{CONTENT_EMBEDDING}.npy", "title": TITLES}
"""Feature store files holding one content embedding per item, by `content` option."""


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
        meta = paths.features / CONTENT_JSON
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
def training_run(config: RetrievalConfig, paths: PreparedPaths, inputs: dict[str, str], run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> Iterator[Any]:
    """The MLflow run of one training (single-process or sharded), named by `run_name`, with the
    splits and the catalogue it reads logged as its datasets; `run_id` continues a killed one."""
    source, _ = content_file(paths, config.content)
    with start_run(config.dataset, "train_retrieval", to_dict(config), inputs, run_name(config, source),
                   run_id=run_id, tags=tags) as run:
        log_tables(config.dataset, {"train": paths.train, "valid": paths.valid, "catalogue": paths.items})
        yield run


def build_model(config: RetrievalConfig, data: RetrievalDataModule, content: ItemContent) -> TwoTower:
    """The TwoTower for a config and a dataset (the same for single-process and sharded training)."""
    content_dim = 0 if content.embedding is None else content.embedding.shape[1]
    spec = TwoTowerSpec.from_config(config, data.n_users, data.n_items, content_dim, content.source,
                                    len(data.fresh_items))
    embedding = None if content.embedding is None else torch.from_numpy(content.embedding)
    fresh = (torch.from_numpy(data.fresh_users), torch.from_numpy(data.fresh_items),
             torch.from_numpy(data.fresh_times)) if config.fresh_views else None
    return TwoTower(spec, content=embedding, known_items=torch.from_numpy(data.known_items), fresh_views=fresh)




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
