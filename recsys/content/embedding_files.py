"""The embedding files through which content and two-tower training meet, both ways (never each other's code).

Content training writes into the feature store (`<processed_dir>/<dataset>/features/`):

- `content_embedding.npy` float32 (N, D): the fused content embedding of every item, row = item_idx
- `content.json`: what made it (the MLflow run ID among it)

and two-tower training (a stage above this one) reads them as its item content. Two-tower
training writes, for each trained model,

```
<processed_dir>/<dataset>/models/
  latest.json                    {"run_id": ..., "folder": ...}: the newest trained model
  <run_id>/item_embeddings.npy   float32 (n_items, D): its item tower over the whole catalogue
```

and content distillation reads those item embeddings (`read_item_embeddings`). The names are
defined here; `recsys.twotower` imports them, so both sides agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recsys.data.paths import PreparedPaths
from recsys.errors import MissingInputError
from recsys.files import read_json

CONTENT_EMBEDDING = "content_embedding"
"""The fused content embedding in the feature store (`content_embedding.npy`)."""
CONTENT_JSON = "content.json"
"""What made the content embedding (beside it in the feature store)."""
MODELS_DIR = "models"
LATEST_FILE = "latest.json"
ITEM_EMBEDDINGS_FILE = "item_embeddings.npy"


def models_dir(processed_dir: Path, dataset: str) -> Path:
    """`<processed_dir>/<dataset>/models`: where trained two-tower models are kept."""
    return PreparedPaths.of(processed_dir, dataset).root / MODELS_DIR


def latest_run(processed_dir: Path, dataset: str) -> str:
    """Run ID of the newest trained model of a dataset, or a MissingInputError saying how to train one."""
    pointer = models_dir(processed_dir, dataset) / LATEST_FILE
    if not pointer.exists():
        raise MissingInputError(
            f"no trained model for {dataset} under {pointer.parent}; run `recsys train retrieval {dataset}` first"
        )
    return str(read_json(pointer)["run_id"])


def read_item_embeddings(processed_dir: Path, dataset: str, run_id: str | None = None) -> tuple[np.ndarray, str]:
    """(float32 (N, D) item embeddings, run ID) of a trained two-tower model (the newest when `run_id` is None)."""
    run_id = run_id or latest_run(processed_dir, dataset)
    path = models_dir(processed_dir, dataset) / run_id / ITEM_EMBEDDINGS_FILE
    if not path.exists():
        raise MissingInputError(f"no item embeddings of two-tower run {run_id!r} at {path}; "
                                f"train one with `recsys train retrieval {dataset}` or pick an existing run ID")
    return np.load(path).astype(np.float32, copy=False), run_id
