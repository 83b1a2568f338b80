"""Where each pipeline step reads and writes a dataset's files: the one place that names them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recsys.errors import MissingInputError


@dataclass(frozen=True)
class PreparedPaths:
    """Files written by `recsys data prepare` for one dataset (all parquet unless noted).

    Internal indices (`user_idx`, `item_idx`) are contiguous from 0; external IDs (`user_id`,
    `item_id`, strings) appear only in the maps, the items table and in results shown to users.
    """

    root: Path

    @classmethod
    def of(cls, processed_dir: Path, dataset: str) -> PreparedPaths:
        return cls(Path(processed_dir) / dataset)

    @property
    def train(self) -> Path:
        """user_idx, item_idx, timestamp: training interactions."""
        return self.root / "train.parquet"

    @property
    def valid(self) -> Path:
        """user_idx, item_idx, timestamp: validation interactions."""
        return self.root / "valid.parquet"

    @property
    def test(self) -> Path:
        """user_idx, item_idx, timestamp: test interactions."""
        return self.root / "test.parquet"

    @property
    def user_map(self) -> Path:
        """user_idx, user_id."""
        return self.root / "user_map.parquet"

    @property
    def item_map(self) -> Path:
        """item_idx, item_id."""
        return self.root / "item_map.parquet"

    @property
    def items(self) -> Path:
        """item_idx, item_id, title, genres, video_path, train_count: the indexed catalogue."""
        return self.root / "items.parquet"

    @property
    def popularity(self) -> Path:
        """item_idx, count: interactions per item in train (every item, zeros included)."""
        return self.root / "popularity.parquet"

    @property
    def meta(self) -> Path:
        """JSON: counts per split, rejected rows with reasons, config, input fingerprint, MLflow run."""
        return self.root / "meta.json"

    @property
    def added_views(self) -> Path:
        """Views added after training (`recsys views add`): user_id, item_idx, timestamp, in time order."""
        return self.root / "added_views.parquet"

    @property
    def features(self) -> Path:
        """Folder of the feature store written by `recsys ingest`."""
        return self.root / "features"

    def require(self) -> PreparedPaths:
        """Raise a clear error when the dataset has not been prepared yet."""
        if not self.meta.exists():
            raise MissingInputError(
                f"{self.root} holds no prepared dataset; run `recsys data prepare {self.root.name}` first"
            )
        return self
