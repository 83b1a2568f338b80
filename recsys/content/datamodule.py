"""LightningDataModule over the memory-mapped feature store, for training the content encoders.

Items whose ingestion succeeded (manifest status "ok") are split once, with a seeded
generator, into training and validation items; the validation items give the contrastive
validation loss used for early stopping. A batch reads its rows straight from the memory
maps (one sorted fancy-index per array), so the store is never loaded whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from recsys.content.encoder import ContentInputs
from recsys.errors import DataFormatError
from recsys.media.feature_store import FeatureStore


@dataclass
class ContentArrays:
    """The feature-store arrays the content encoder reads (memory maps or plain arrays, row = item_idx)."""

    frames: np.ndarray
    """uint8 (N, T, S, S, 3)"""
    frame_mask: np.ndarray
    """bool (N, T)"""
    mel: np.ndarray
    """float16 (N, n_mels, L)"""
    mel_mask: np.ndarray
    """bool (N, L)"""
    title: np.ndarray
    """float32 (N, 384); zero rows for items without a title"""
    title_mask: np.ndarray
    """bool (N,)"""

    def __post_init__(self) -> None:
        n = self.frames.shape[0]
        for name in ("frame_mask", "mel", "mel_mask", "title", "title_mask"):
            if getattr(self, name).shape[0] != n:
                raise DataFormatError(
                    f"feature store arrays disagree: frames has {n} rows, {name} has {getattr(self, name).shape[0]}; "
                    "re-run `recsys ingest` to rebuild the store"
                )

    def __len__(self) -> int:
        return self.frames.shape[0]

    @classmethod
    def of(cls, store: FeatureStore) -> ContentArrays:
        """The arrays of an opened feature store (memory-mapped, nothing read yet)."""
        title = store.title_embedding
        return cls(
            frames=store.frames,
            frame_mask=store.frame_mask,
            mel=store.mel,
            mel_mask=store.mel_mask,
            title=title,
            title_mask=store.manifest.get_column("has_title").to_numpy().astype(bool),
        )

    def batch(self, rows: np.ndarray) -> ContentInputs:
        """Rows `rows` as one batch of tensors (rows are read in sorted order, returned as given)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
            # A run of consecutive rows (extraction reads the store in order): one slice, one copy.
            span = slice(int(rows[0]), int(rows[-1]) + 1)

            def take(array: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.array(array[span]))
        else:
            order = np.argsort(rows, kind="stable")
            sorted_rows = rows[order]
            back = np.empty_like(order)
            back[order] = np.arange(len(order))

            def take(array: np.ndarray) -> torch.Tensor:
                # Sorted reads walk the memory map forwards; `back` restores the caller's order.
                return torch.from_numpy(np.ascontiguousarray(np.asarray(array[sorted_rows])[back]))

        return ContentInputs(
            frames=take(self.frames),
            frame_mask=take(self.frame_mask),
            mel=take(self.mel),
            mel_mask=take(self.mel_mask),
            title=take(self.title).float(),
            title_mask=take(self.title_mask),
            item_idx=torch.from_numpy(rows),
        )


class ContentDataset(Dataset):
    """Items `rows` of the store; `__getitems__` builds a whole batch with one read per array."""

    def __init__(self, arrays: ContentArrays, rows: np.ndarray) -> None:
        self.arrays = arrays
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> ContentInputs:
        return self.arrays.batch(self.rows[[index]])

    def __getitems__(self, indices: list[int]) -> ContentInputs:
        return self.arrays.batch(self.rows[np.asarray(indices, dtype=np.int64)])


def _as_batch(batch: ContentInputs) -> ContentInputs:
    """The dataset already returns whole batches; the loader must not collate them again."""
    return batch


def split_items(candidates: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of item rows into (train, val); val gets at least 2 items when there are 4 or more."""
    candidates = np.asarray(candidates, dtype=np.int64)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(candidates)
    n_val = int(round(val_fraction * len(shuffled)))
    if len(shuffled) >= 4:
        n_val = min(max(n_val, 2), len(shuffled) - 2)  # InfoNCE needs two items on each side
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


class ContentDataModule(pl.LightningDataModule):
    """Train/val loaders over the items of a feature store whose status is ok."""

    def __init__(
        self,
        store_dir: Path,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.store_dir = Path(store_dir)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.store: FeatureStore | None = None
        self.arrays: ContentArrays | None = None
        self.train_rows = np.empty(0, np.int64)
        self.val_rows = np.empty(0, np.int64)

    def setup(self, stage: str | None = None) -> None:
        if self.arrays is not None:
            return
        self.store = FeatureStore.open(self.store_dir)
        self.arrays = ContentArrays.of(self.store)
        status = self.store.manifest.get_column("status").to_numpy()
        ok = np.flatnonzero(status == "ok")
        if len(ok) < 4:
            raise DataFormatError(
                f"{self.store_dir}: only {len(ok)} item(s) were ingested successfully; content training needs "
                "at least 4 (see the manifest's reason column)"
            )
        self.train_rows, self.val_rows = split_items(ok, self.val_fraction, self.seed)

    def _loader(self, rows: np.ndarray, shuffle: bool) -> DataLoader:
        assert self.arrays is not None, "call setup() first"
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            ContentDataset(self.arrays, rows),
            batch_size=self.batch_size,
            shuffle=shuffle,
            # A last batch of one item has nothing to contrast with; dropping it loses at most one
            # item per epoch, and a different one each epoch because of the shuffle.
            drop_last=shuffle and len(rows) % self.batch_size == 1,
            collate_fn=_as_batch,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows, shuffle=False)
