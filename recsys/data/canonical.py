"""An imported dataset on disk: the canonical tables as parquet, and a manifest of where they came from.

```
<raw_dir>/<name>/
  interactions.parquet   user_id, item_id, timestamp, weight, line   (recsys.data.schema)
  items.parquet          item_id, title, text, genres, video_path (relative to the media root)
  dataset.json           sources, media root, import settings, the import report
```

A folder is written whole or not at all: it is built beside its final place under a hidden name
and renamed into place, so a failed or killed import leaves no half-written dataset behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recsys.data.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, RawDataset
from recsys.errors import DataFormatError, RecsysError
from recsys.files import read_json, write_json

MANIFEST = "dataset.json"
INTERACTIONS = "interactions.parquet"
ITEMS = "items.parquet"


@dataclass(frozen=True)
class CanonicalFolder:
    """The folder of one imported dataset."""

    root: Path

    @property
    def interactions(self) -> Path:
        return self.root / INTERACTIONS

    @property
    def items(self) -> Path:
        return self.root / ITEMS

    def exists(self) -> bool:
        """Whether a complete import is here (the manifest is written last)."""
        return (self.root / MANIFEST).is_file()

    def manifest(self) -> dict[str, Any]:
        return read_json(self.root / MANIFEST)

    def read(self, name: str) -> RawDataset:
        """The canonical tables, lazily; video paths are joined to the recorded media root."""
        manifest = self.manifest()
        media_root = manifest.get("media_root")
        video = pl.col("video_path")
        if media_root:
            video = pl.when(video.is_null()).then(None).otherwise(pl.lit(str(Path(media_root)) + "/") + video)
        items = pl.scan_parquet(self.items).with_columns(video.alias("video_path")).match_to_schema(ITEMS_SCHEMA)
        interactions = pl.scan_parquet(self.interactions).match_to_schema(INTERACTIONS_SCHEMA)
        return RawDataset(name, interactions, items, [self.interactions, self.items])

    @contextmanager
    def replace_atomically(self, overwrite: bool) -> Iterator[Path]:
        """Yield an empty staging folder; on success it becomes this folder, replacing the old one.

        Refuses (before anything is written) when the dataset exists and `overwrite` is false. A
        staging folder left by a killed earlier attempt is removed first.
        """
        if self.root.exists() and not overwrite:
            raise RecsysError(f"{self.root}: dataset {self.root.name!r} exists already; "
                              "pass --overwrite to replace it, or import under another name")
        parent = self.root.parent
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{self.root.name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = parent / f".{self.root.name}.staging-{os.getpid()}"
        staging.mkdir()
        try:
            yield staging
            if not (staging / MANIFEST).is_file():
                raise DataFormatError(f"{staging}: the import wrote no {MANIFEST}")
            retired = parent / f".{self.root.name}.retired-{os.getpid()}"
            if self.root.exists():
                self.root.rename(retired)
            staging.rename(self.root)
            shutil.rmtree(retired, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest: the last file of an import, so its presence means the tables are complete."""
    write_json(Path(folder) / MANIFEST, manifest)
