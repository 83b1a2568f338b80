"""A trained two-tower model on disk, and the scorer that retrieval and evaluation use.

Layout, per dataset (no pickle anywhere, so loading a model never runs code from a file):

```
data/processed/<dataset>/models/
  latest.json                 {"run_id": ..., "folder": ...}: the newest trained model
  <run_id>/weights.safetensors  every parameter and buffer of the TwoTower (content included)
  <run_id>/model.json           TwoTowerSpec, run ID, training summary
  <run_id>/item_embeddings.npy  float32 (n_items, D): the item tower over the whole catalogue
```

The folder names and the item embeddings file are defined by `recsys.content.embedding_files`, which
reads the item embeddings for content distillation: the two stages meet through these files.

`TwoTowerScorer` is what the rest of recsys calls: `item_embeddings()`, `user_embeddings(...)`
and `score(...)`, all numpy in and out. A user index of -1 means "a user the model has never
seen": such a user is embedded from their history alone.

The score is the one of `recsys.twotower.scoring`, with the coefficients fitted on the validation
split at the end of training (`recsys.twotower.new_videos`, kept in model.json). The scorer ranks
by its inner-product form, `user_vectors(...) @ item_vectors().T` plus the corrections at each
user's own fresh views, so that an inner-product index ranks exactly by the score.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recsys.content.embedding_files import ITEM_EMBEDDINGS_FILE, LATEST_FILE, latest_run, models_dir
from recsys.data.histories import UNKNOWN_USER
from recsys.errors import DataFormatError, MissingInputError
from recsys.files import atomic_path, read_json, write_json
from recsys.twotower.scoring import (
    ItemState,
    NewVideoScoring,
    UserState,
    item_vectors,
    later_view_corrections,
    own_view_corrections,
    user_vectors,
)
from recsys.twotower.sparse import collate_histories
from recsys.twotower.towers import TwoTower, TwoTowerSpec
from recsys.twotower.validation import catalogue_embeddings

WEIGHTS_FILE = "weights.safetensors"
MODEL_FILE = "model.json"
FORMAT_VERSION = 1
LATER_BUFFERS = ("cluster_membership", "fresh_view_users", "fresh_view_items", "fresh_view_times",
                 "item_tower.folded_items", "item_tower.folded_sums", "item_tower.folded_viewer_sums")
"""Buffers added to the model after format 1: a model saved before them keeps their empty default."""
NEW_VIDEO_SCORING = "new_video_scoring"
"""Key of the training summary (model.json "info") holding the fitted `NewVideoScoring`."""
LEGACY_COLD_ITEM_BIAS = "cold_item_bias"
"""Where models trained before `NEW_VIDEO_SCORING` kept their one offset for new videos."""


class TwoTowerScorer:
    """Scores users against the whole catalogue with a trained `TwoTower` (inference only, no loss)."""

    def __init__(
        self,
        model: TwoTower,
        run_id: str | None = None,
        folder: Path | None = None,
        info: dict[str, Any] | None = None,
        item_embeddings: np.ndarray | None = None,
        batch_size: int = 4096,
    ) -> None:
        self.model = model.eval()
        self.spec: TwoTowerSpec = model.spec
        self.run_id = run_id
        self.folder = folder
        self.info = info or {}
        self.batch_size = batch_size
        self._items = item_embeddings
        self._vectors: np.ndarray | None = None
        self._item_state: ItemState | None = None

    @property
    def n_items(self) -> int:
        return self.spec.n_items

    @property
    def n_users(self) -> int:
        return self.spec.n_users

    @property
    def dim(self) -> int:
        return self.spec.dim

    @torch.inference_mode()
    def item_embeddings(self) -> np.ndarray:
        """float32 (n_items, D), row i = item_idx i (cold-start items included, from their content)."""
        if self._items is None:
            self._items = catalogue_embeddings(self.model, chunk=self.batch_size).numpy().astype(np.float32)
        return self._items

    @torch.inference_mode()
    def user_embeddings(self, user_idx: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        """float32 (B, D) for B users: `user_idx` (B,) (-1 = unknown user), `histories` item_idx arrays, oldest first.

        Only the last `max_history` items of each history are read. An unknown user with an empty
        history still gets an embedding (the model's prior), so the caller decides about fallbacks.
        """
        return self.user_state(user_idx, histories, taste=False).embeddings.numpy().astype(np.float32)

    @torch.inference_mode()
    def user_state(self, user_idx: np.ndarray, histories: list[np.ndarray], taste: bool,
                   before: np.ndarray | None = None) -> UserState:
        """What the score reads of B users (see `user_embeddings`); their cluster shares only with `taste`;
        ranked at times `before` (B,) (None: now)."""
        users = np.asarray(user_idx, dtype=np.int64).reshape(-1)
        if len(users) != len(histories):
            raise ValueError(f"{len(users)} user indices but {len(histories)} histories")
        if users.size and (users.max() >= self.n_users or users.min() < UNKNOWN_USER):
            raise DataFormatError(
                f"user index out of range: the model knows users 0..{self.n_users - 1} (use -1 for an unknown user)"
            )
        for history in histories:
            history = np.asarray(history)
            if history.size and (history.min() < 0 or history.max() >= self.n_items):
                raise DataFormatError(f"history item index out of range: the catalogue has items 0..{self.n_items - 1}")
        if not len(users):
            empty = torch.zeros(0, self.model.cluster_membership.shape[1]) if taste else None
            return UserState(torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.long), empty,
                             None if before is None else torch.zeros(0, dtype=torch.long))
        chunks = []
        for start in range(0, len(users), self.batch_size):
            stop = start + self.batch_size
            features = collate_histories(users[start:stop], None, histories[start:stop], self.spec.max_history)
            times = None if before is None else torch.as_tensor(np.asarray(before)[start:stop], dtype=torch.long)
            chunks.append(UserState.of(self.model, features, taste, times))
        return UserState.concat(chunks)

    @property
    def new_video_scoring(self) -> NewVideoScoring:
        """The coefficients of the score (the default, cosine alone, for models without them)."""
        if NEW_VIDEO_SCORING in self.info:
            return NewVideoScoring.from_dict(self.info[NEW_VIDEO_SCORING])
        return NewVideoScoring(bias=float(self.info.get(LEGACY_COLD_ITEM_BIAS, 0.0)))

    @torch.inference_mode()
    def item_state(self) -> ItemState:
        """What the score reads of the catalogue, read once."""
        if self._item_state is None:
            self._item_state = ItemState.of(self.model, torch.from_numpy(self.item_embeddings()))
        return self._item_state

    @torch.inference_mode()
    def item_vectors(self) -> np.ndarray:
        """float32 (n_items, D [+ K] + 1): the item side of the score (`recsys.twotower.scoring.item_vectors`).

        Built once: `score` reads it for every batch of users.
        """
        if self._vectors is None:
            self._vectors = item_vectors(self.item_state(), self.new_video_scoring).numpy().astype(np.float32)
        return self._vectors

    @torch.inference_mode()
    def user_vectors(self, user_idx: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        """float32 (B, D [+ K] + 1): the user side of the score (`recsys.twotower.scoring.user_vectors`).

        `user_vectors(...) @ item_vectors().T` is the score but at the users' own fresh views.
        """
        scoring = self.new_video_scoring
        users = self.user_state(user_idx, histories, scoring.uses_taste())
        return user_vectors(users, scoring).numpy().astype(np.float32)

    @torch.inference_mode()
    def score(self, user_idx: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        """float32 (B, n_items): the model's score of every item for each user now (higher = better)."""
        return self.score_before(user_idx, histories, None)

    @torch.inference_mode()
    def score_before(self, user_idx: np.ndarray, histories: list[np.ndarray], before: np.ndarray | None
                     ) -> np.ndarray:
        """float32 (B, n_items): the model's score of every item for each user at times `before` (B,), reading
        only the fresh views before each (`later_view_corrections`); None: now, every fresh view.

        `user_vectors(...) @ item_vectors().T`, the product an item index ranks by, plus
        `own_view_corrections`: a user's own fresh views count neither towards the fresh popularity
        of what they watched nor towards a new video's cluster membership; that only changes the
        scores of videos in the user's history, which a ranking for them excludes.
        """
        scoring = self.new_video_scoring
        users = self.user_state(user_idx, histories, scoring.uses_taste(), before)
        scores = user_vectors(users, scoring).numpy() @ self.item_vectors().T  # (B, N)
        rows, items, change = own_view_corrections(users, self.item_state(), scoring)
        scores[rows.numpy(), items.numpy()] += change.numpy()
        if users.before is not None:
            scores += later_view_corrections(self.item_state(), scoring, users.before).numpy()
        return scores


def save_trained(
    model: TwoTower,
    processed_dir: Path,
    dataset: str,
    run_id: str,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write `models/<run_id>/` (weights, model.json, item embeddings) and point `latest.json` at it."""
    folder = models_dir(processed_dir, dataset) / run_id
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, tmp, metadata={"format": str(FORMAT_VERSION), "run_id": run_id})
    scorer = TwoTowerScorer(model, run_id=run_id, folder=folder)
    with atomic_path(folder / ITEM_EMBEDDINGS_FILE) as tmp, tmp.open("wb") as handle:
        np.save(handle, scorer.item_embeddings())
    document = {
        "format": FORMAT_VERSION,
        "kind": "two-tower",
        "dataset": dataset,
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "spec": model.spec.to_dict(),
        "info": info or {},
    }
    write_json(folder / MODEL_FILE, document)
    write_json(models_dir(processed_dir, dataset) / LATEST_FILE, {"run_id": run_id, "folder": str(folder)})
    return folder


def load_trained(processed_dir: Path, dataset: str, run_id: str | None = None) -> TwoTowerScorer:
    """Load a trained model (the latest when `run_id` is None) as a scorer on CPU."""
    run_id = run_id or latest_run(processed_dir, dataset)
    folder = models_dir(processed_dir, dataset) / run_id
    if not (folder / MODEL_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise MissingInputError(f"no trained model {run_id!r} in {folder.parent} (expected {MODEL_FILE} and "
                                f"{WEIGHTS_FILE} in {folder})")
    document = read_json(folder / MODEL_FILE)
    if document.get("format") != FORMAT_VERSION:
        raise DataFormatError(f"{folder / MODEL_FILE}: model format {document.get('format')!r}, "
                              f"this recsys reads format {FORMAT_VERSION}; retrain the model")
    spec = TwoTowerSpec.from_dict(document["spec"])
    content = torch.zeros(spec.n_items, spec.content_dim) if spec.content_dim else None
    model = TwoTower(spec, content=content)
    missing, unexpected = model.load_state_dict(load_file(folder / WEIGHTS_FILE), strict=False)
    if unexpected or set(missing) - set(LATER_BUFFERS):
        raise DataFormatError(f"{folder / WEIGHTS_FILE} does not fit its model.json: missing "
                              f"{sorted(set(missing) - set(LATER_BUFFERS))}, unexpected {sorted(unexpected)}")
    items_file = folder / ITEM_EMBEDDINGS_FILE
    items = np.load(items_file) if items_file.exists() else None
    return TwoTowerScorer(model, run_id=run_id, folder=folder, info=document.get("info", {}), item_embeddings=items)
