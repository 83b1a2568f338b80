"""The feature store: per-item model inputs in memory-mappable `.npy` files, row i = item_idx i.

Folder `<processed>/<dataset>/features/` (written by `recsys ingest`, read by training):

- `frames.npy` uint8 (N, T, S, S, 3) RGB, `frame_mask.npy` bool (N, T)
- `mel.npy` float16 (N, n_mels, L) log-mel in dB, `mel_mask.npy` bool (N, L)
- `title_embedding.npy` float32 (N, 384) MiniLM, zero row when there is no title
- `manifest.parquet`: one row per item: item_idx, item_id, status ("ok" | "failed"), reason,
  has_video, has_audio, has_title, duration, source_fps, width, height, video_codec,
  audio_codec, n_frames, plus audio_sample_rate, audio_channels, audio_samples, sampled_frames
- `store.json`: T, S, fps, sample_rate, n_mels, L, hop, n_fft, audio_seconds, N, complete, counts
- `progress.jsonl`: the ingestion journal (one line per finished row), kept for resuming

Padding and missing media are zeros with mask False; failed rows are all zeros. Later stages
add their own arrays (`content_embedding.npy`, `embedding_<modality>.npy`) with `write_array`.

Writing is crash-safe without per-item files: the media arrays are preallocated at full size,
each row is written in place (`os.pwrite`) and flushed to disk, and only then is the row
recorded in the journal. A killed run leaves at most rows that are not in the journal; the next
run writes them again.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.errors import MissingInputError
from recsys.files import atomic_path, read_json, write_json
from recsys.media.audio import mel_frames

STORE_VERSION = 1
STORE_JSON = "store.json"
MANIFEST = "manifest.parquet"
JOURNAL = "progress.jsonl"
SOURCES = "sources.parquet"
"""item_idx, item_id, video_path of the items the store was made for (to reuse its rows after a catalogue change)"""
TITLES = "title_embedding.npy"
MEDIA_ARRAYS = ("frames", "frame_mask", "mel", "mel_mask")

MANIFEST_SCHEMA = pl.Schema(
    {
        "item_idx": pl.Int64,
        "item_id": pl.String,
        "status": pl.String,
        "reason": pl.String,
        "has_video": pl.Boolean,
        "has_audio": pl.Boolean,
        "has_title": pl.Boolean,
        "duration": pl.Float64,
        "source_fps": pl.Float64,
        "width": pl.Int64,
        "height": pl.Int64,
        "video_codec": pl.String,
        "audio_codec": pl.String,
        "n_frames": pl.Int64,
        "sampled_frames": pl.Int64,
        "audio_sample_rate": pl.Int64,
        "audio_channels": pl.Int64,
        "audio_samples": pl.Int64,
    }
)


@dataclass(frozen=True)
class StoreLayout:
    """Shapes of every array in the store."""

    n_items: int
    frames: int
    """T: frame slots per item"""
    frame_size: int
    """S: side of the square frames"""
    fps: float
    sample_rate: int
    n_mels: int
    n_fft: int
    hop_length: int
    audio_seconds: float
    title_dim: int = 384

    @property
    def mel_frames(self) -> int:
        """L: spectrogram frames per item."""
        return mel_frames(self.audio_seconds, self.sample_rate, self.hop_length)

    def media_arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of each preallocated media array."""
        n, t, s, m, length = self.n_items, self.frames, self.frame_size, self.n_mels, self.mel_frames
        return {
            "frames": ((n, t, s, s, 3), np.dtype(np.uint8)),
            "frame_mask": ((n, t), np.dtype(np.bool_)),
            "mel": ((n, m, length), np.dtype(np.float16)),
            "mel_mask": ((n, length), np.dtype(np.bool_)),
        }

    def describe(self) -> dict[str, Any]:
        """The layout under the names of the store contract (T, S, L, hop, ...)."""
        return {
            "N": self.n_items, "T": self.frames, "S": self.frame_size, "fps": self.fps,
            "sample_rate": self.sample_rate, "n_mels": self.n_mels, "L": self.mel_frames,
            "hop": self.hop_length, "n_fft": self.n_fft, "audio_seconds": self.audio_seconds,
            "title_dim": self.title_dim,
        }


class RowWriter:
    """Writes whole rows of the media arrays in place; used by each ingestion worker."""

    def __init__(self, folder: Path, layout: StoreLayout) -> None:
        self._files: dict[str, tuple[int, int, int, np.dtype]] = {}
        for name, (shape, dtype) in layout.media_arrays().items():
            path = Path(folder) / f"{name}.npy"
            offset = np.load(path, mmap_mode="r").offset
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            self._files[name] = (os.open(path, os.O_WRONLY), offset, row_bytes, dtype)

    def write(self, row: int, arrays: dict[str, np.ndarray]) -> None:
        """Write item `row` of every media array (all four must be given, in their row shapes)."""
        for name, (fd, offset, row_bytes, dtype) in self._files.items():
            data = np.ascontiguousarray(arrays[name], dtype=dtype).tobytes()
            if len(data) != row_bytes:
                raise ValueError(f"{name}: row of {len(data)} bytes, store expects {row_bytes}")
            os.pwrite(fd, data, offset + row * row_bytes)

    def sync(self) -> None:
        """Make written rows durable before they are recorded as done."""
        for fd, *_ in self._files.values():
            os.fdatasync(fd)

    def close(self) -> None:
        for fd, *_ in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProgressJournal:
    """Append-only record of finished rows (one JSON object per line); a torn last line is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[int, dict[str, Any]]:
        """Finished rows by item_idx; cuts off a last line left half-written by a killed run."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(complete)
        rows = [json.loads(line) for line in data[:complete].splitlines() if line.strip()]
        return {row["item_idx"]: row for row in rows}

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        text = "".join(json.dumps(row) + "\n" for row in rows)
        with self.path.open("a") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


class StoreBuilder:
    """Creates or resumes a store folder for one ingestion run."""

    def __init__(self, folder: Path, layout: StoreLayout, info: dict[str, Any], previous: Path | None = None) -> None:
        self.folder = Path(folder)
        self.layout = layout
        self.info = info
        self.journal = ProgressJournal(self.folder / JOURNAL)
        self.previous = previous
        """The store this one replaces when only the catalogue changed: its decoded rows can be carried over"""

    @classmethod
    def open(cls, folder: Path, layout: StoreLayout, identity: dict[str, Any], overwrite: bool,
             same_media: tuple[str, ...] = ()) -> tuple[StoreBuilder, str]:
        """Resume the store when it was started with the same identity, else start anew; (builder, how).

        When the old store differs from `identity` only outside the keys `same_media` (e.g. the
        prepared catalogue changed, not the decoding settings), it is kept aside as `previous`
        so `carry_over` can reuse its decoded rows; the caller removes it with `drop_previous`.
        """
        folder = Path(folder)
        existing = folder / STORE_JSON
        previous = None
        if existing.exists() and not overwrite:
            info = read_json(existing)
            if info.get("identity") == identity and all((folder / f"{n}.npy").exists() for n in MEDIA_ARRAYS):
                return cls(folder, layout, info), "resumed"
            how = "rebuilt (settings or prepared items changed)"
            old = info.get("identity") or {}
            if same_media and all(old.get(key) == identity.get(key) for key in same_media):
                previous = folder.with_name(folder.name + ".previous")
                shutil.rmtree(previous, ignore_errors=True)
                folder.rename(previous)
        else:
            how = "rebuilt (--overwrite)" if existing.exists() else "created"
        # Everything in the folder derives from the old features (later stages' embeddings too).
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, (shape, dtype) in layout.media_arrays().items():
            # Preallocated (sparse on most file systems): unwritten rows read as zeros.
            array = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            del array
        info = {"version": STORE_VERSION, "complete": False, "identity": identity, **layout.describe()}
        write_json(existing, info)
        return cls(folder, layout, info, previous), how

    def carry_over(self, rows: dict[int, int]) -> list[dict[str, Any]]:
        """Copy decoded rows {new item_idx: old item_idx} from the previous store; returns their journal rows."""
        if self.previous is None or not rows:
            return []
        done = ProgressJournal(self.previous / JOURNAL).load()
        rows = {new: old for new, old in rows.items() if old in done}
        with RowWriter(self.folder, self.layout) as writer:
            old_arrays = {name: np.load(self.previous / f"{name}.npy", mmap_mode="r") for name in MEDIA_ARRAYS}
            for new, old in rows.items():
                writer.write(new, {name: array[old] for name, array in old_arrays.items()})
            writer.sync()
        carried = [{**done[old], "item_idx": new} for new, old in rows.items()]
        self.journal.append(carried)
        return carried

    def drop_previous(self) -> None:
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = None

    def save_info(self, **updates: Any) -> None:
        self.info.update(updates)
        write_json(self.folder / STORE_JSON, self.info)

    def write_titles(self, embeddings: np.ndarray) -> None:
        write_array(self.folder, "title_embedding", embeddings.astype(np.float32))

    def finish(self, manifest: pl.DataFrame, counts: dict[str, Any], **extra: Any) -> None:
        """Write the manifest, then mark the store complete."""
        with atomic_path(self.folder / MANIFEST) as tmp:
            manifest.write_parquet(tmp)
        self.save_info(complete=True, counts=counts, **extra)


def write_array(folder: Path, name: str, array: np.ndarray) -> Path:
    """Save `<folder>/<name>.npy` atomically (for arrays written whole, e.g. embeddings)."""
    path = Path(folder) / f"{name}.npy"
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
    return path


class FeatureStore:
    """Read access to a finished store; arrays are memory-mapped, nothing is loaded eagerly."""

    def __init__(self, folder: Path, info: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.info = info

    @classmethod
    def open(cls, folder: Path) -> FeatureStore:
        """Open a store written by `recsys ingest`; raises a clear error when it is missing or unfinished."""
        folder = Path(folder)
        path = folder / STORE_JSON
        if not path.exists():
            raise MissingInputError(f"{folder} holds no feature store; run `recsys ingest DATASET` first")
        info = read_json(path)
        if not info.get("complete"):
            raise MissingInputError(
                f"{folder}: the feature store is unfinished (ingestion was interrupted); "
                "run `recsys ingest DATASET` again to complete it"
            )
        return cls(folder, info)

    def __len__(self) -> int:
        return int(self.info["N"])

    @property
    def layout(self) -> StoreLayout:
        i = self.info
        return StoreLayout(n_items=i["N"], frames=i["T"], frame_size=i["S"], fps=i["fps"],
                           sample_rate=i["sample_rate"], n_mels=i["n_mels"], n_fft=i["n_fft"],
                           hop_length=i["hop"], audio_seconds=i["audio_seconds"], title_dim=i["title_dim"])

    def has(self, name: str) -> bool:
        """Whether `<name>.npy` exists (e.g. "content_embedding")."""
        return (self.folder / f"{name}.npy").exists()

    def array(self, name: str) -> np.ndarray:
        """`<name>.npy` memory-mapped read-only."""
        path = self.folder / f"{name}.npy"
        if not path.exists():
            raise MissingInputError(f"{path} not found in the feature store")
        return np.load(path, mmap_mode="r")

    def write_array(self, name: str, array: np.ndarray) -> Path:
        """Add or replace an array with one row per item (e.g. content embeddings), atomically."""
        if array.shape[0] != len(self):
            raise ValueError(f"{name}: {array.shape[0]} rows, the store has {len(self)} items")
        return write_array(self.folder, name, array)

    @cached_property
    def frames(self) -> np.ndarray:
        """(N, T, S, S, 3) uint8 RGB."""
        return self.array("frames")

    @cached_property
    def frame_mask(self) -> np.ndarray:
        """(N, T) bool."""
        return self.array("frame_mask")

    @cached_property
    def mel(self) -> np.ndarray:
        """(N, n_mels, L) float16 log-mel (dB)."""
        return self.array("mel")

    @cached_property
    def mel_mask(self) -> np.ndarray:
        """(N, L) bool."""
        return self.array("mel_mask")

    @cached_property
    def title_embedding(self) -> np.ndarray:
        """(N, 384) float32, zero rows for items without a title."""
        return self.array("title_embedding")

    @cached_property
    def manifest(self) -> pl.DataFrame:
        """One row per item, in item_idx order."""
        return pl.read_parquet(self.folder / MANIFEST)

