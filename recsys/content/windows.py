"""Per-window content embeddings of clips longer than one window: where in a clip a search matches.

A window is what the content encoder sees of a short clip: T frames at the store's rate (T / fps
seconds) and the sound over them. A longer clip is stored as T frames spread over its whole
length (`recsys.media.video`), one embedding for all of it. Here such a clip is decoded again at
the store's rate and cut into windows of T frames, one every T/2 frames (half overlapping; the
last one ends with the clip), each with the log-mel of its own seconds; the trained encoder embeds
every window from its frames, motion and sound (not the title, which is the same in all of them)
and fuses them, as it fuses a whole clip. `recsys train content` writes into the feature store:

- `window_embedding.npy` float32 (W, D): one unit-length row per window
- `windows.parquet`: item_idx, start_s, end_s of each row of `window_embedding.npy`
- `clip_seconds.npy` float32 (N,): every item's duration (NaN without a video), the span of a
  clip of one window

Search (`recsys.serving.search`) returns, for each matching video, the span of its window most
similar to the query, or the whole clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from recsys.content.encoder import ContentEncoder, ContentInputs
from recsys.files import write_parquet
from recsys.media.audio import log_mel, read_audio
from recsys.media.feature_store import SOURCES, FeatureStore, StoreLayout, write_array
from recsys.media.video import read_frames

WINDOW_EMBEDDING = "window_embedding"
"""The per-window embeddings in the feature store (`window_embedding.npy`)."""
WINDOWS_TABLE = "windows.parquet"
CLIP_SECONDS = "clip_seconds"
"""Every item's duration in the feature store (`clip_seconds.npy`)."""
WINDOW_FILES = (f"{WINDOW_EMBEDDING}.npy", WINDOWS_TABLE, f"{CLIP_SECONDS}.npy")
TOLERANCE_S = 1e-3


@dataclass
class ClipWindows:
    """Windows of the clips of a store (W rows, ordered by item_idx then start) and every item's duration."""

    item_idx: np.ndarray
    """int64 (W,)"""
    start_s: np.ndarray
    """float32 (W,) seconds from the clip's start"""
    end_s: np.ndarray
    """float32 (W,)"""
    vectors: np.ndarray
    """float32 (W, D) unit length"""
    seconds: np.ndarray
    """float32 (N,) each item's duration, NaN where it has no video"""

    def span(self, item: int, query: np.ndarray) -> tuple[float, float] | None:
        """(start_s, end_s) of the window of `item` nearest to the unit `query` (D,); the whole clip when it has
        one window; None without a video."""
        lo, hi = np.searchsorted(self.item_idx, [item, item + 1])
        if hi > lo:
            best = lo + int(np.argmax(self.vectors[lo:hi] @ query))
            return float(self.start_s[best]), float(self.end_s[best])
        seconds = float(self.seconds[item])
        return (0.0, seconds) if np.isfinite(seconds) else None


def window_starts(n_frames: int, window: int) -> np.ndarray:
    """First frame of each window of `window` frames over `n_frames`: every window // 2, the last ending at the end."""
    if n_frames <= window:
        return np.zeros(1, dtype=np.int64)
    hop = max(1, window // 2)
    starts = np.arange(0, n_frames - window + 1, hop)
    if starts[-1] != n_frames - window:
        starts = np.append(starts, n_frames - window)
    return starts.astype(np.int64)


def window_seconds(layout: StoreLayout) -> float:
    """Seconds one window covers: T frames at the store's rate."""
    return layout.frames / layout.fps


def clip_inputs(path: Path, duration: float, layout: StoreLayout) -> tuple[ContentInputs, np.ndarray, np.ndarray]:
    """A long clip's windows as one encoder batch (W items, no title), with their start and end seconds (W,)."""
    n = max(layout.frames, int(np.floor(duration * layout.fps + 1e-6)))
    video = read_frames(path, frames=n, fps=layout.fps, size=layout.frame_size)  # n slots at duration / n apart
    step = duration / n
    starts = window_starts(int(video.mask.sum()), layout.frames)  # (W,)
    t = layout.frames
    frames = np.stack([video.frames[s : s + t] for s in starts])  # (W, T, S, S, 3)
    frame_mask = np.stack([video.mask[s : s + t] for s in starts])  # (W, T)
    length = layout.mel_frames
    mel = np.zeros((len(starts), layout.n_mels, length), np.float16)  # (W, n_mels, L)
    mel_mask = np.zeros((len(starts), length), bool)  # (W, L)
    track = read_audio(path, layout.sample_rate, seconds=duration)
    if track is not None:
        for w, s in enumerate(starts):
            first = int(round(s * step * layout.sample_rate))
            samples = track.samples[first : first + int(round(layout.audio_seconds * layout.sample_rate))]
            mel[w], mel_mask[w] = log_mel(samples, layout.sample_rate, layout.n_mels, layout.n_fft,
                                          layout.hop_length, length)
    inputs = ContentInputs(
        frames=torch.from_numpy(frames), frame_mask=torch.from_numpy(frame_mask), mel=torch.from_numpy(mel),
        mel_mask=torch.from_numpy(mel_mask), title=torch.zeros(len(starts), layout.title_dim),
        title_mask=torch.zeros(len(starts), dtype=torch.bool), item_idx=torch.zeros(len(starts), dtype=torch.int64),
    )
    start_s = (starts * step).astype(np.float32)
    end_s = np.minimum((starts + t) * step, duration).astype(np.float32)
    return inputs, start_s, end_s


def long_clips(store: FeatureStore) -> list[tuple[int, Path, float]]:
    """(item_idx, video file, duration) of the store's decoded clips longer than one window."""
    sources = store.folder / SOURCES
    if not sources.exists():
        return []
    longer = window_seconds(store.layout) + TOLERANCE_S
    rows = (pl.read_parquet(sources, columns=["item_idx", "video_path"])
            .join(store.manifest.select("item_idx", "status", "has_video", "duration"), on="item_idx")
            .filter((pl.col("status") == "ok") & pl.col("has_video") & (pl.col("duration") > longer)
                    & pl.col("video_path").is_not_null())
            .sort("item_idx"))
    return [(int(i), Path(p), float(d)) for i, p, d in rows.select("item_idx", "video_path", "duration").iter_rows()]


@torch.inference_mode()
def embed_windows(encoder: ContentEncoder, store: FeatureStore) -> ClipWindows:
    """The windows of every clip of `store` longer than one window, embedded by the (trained) `encoder`."""
    encoder.eval()
    layout = store.layout
    items, starts, ends, vectors = [], [], [], []
    for item, path, duration in long_clips(store):
        inputs, start_s, end_s = clip_inputs(path, duration, layout)
        vectors.append(F.normalize(encoder(inputs).fused.float(), dim=-1).numpy())  # (W_i, D)
        items.append(np.full(len(start_s), item, np.int64))
        starts.append(start_s)
        ends.append(end_s)
    dim = encoder.spec.embedding_dim
    seconds = store.manifest.select(pl.when(pl.col("has_video")).then(pl.col("duration")).otherwise(None)
                                    .fill_null(float("nan"))).to_series().to_numpy().astype(np.float32)
    return ClipWindows(
        item_idx=np.concatenate(items) if items else np.zeros(0, np.int64),
        start_s=np.concatenate(starts) if starts else np.zeros(0, np.float32),
        end_s=np.concatenate(ends) if ends else np.zeros(0, np.float32),
        vectors=np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32),
        seconds=seconds,
    )


def write_windows(folder: Path, windows: ClipWindows) -> list[Path]:
    """Write the window files (`WINDOW_FILES`) into a feature-store folder."""
    table = pl.DataFrame({"item_idx": windows.item_idx, "start_s": windows.start_s, "end_s": windows.end_s},
                         schema={"item_idx": pl.Int64, "start_s": pl.Float32, "end_s": pl.Float32})
    return [write_array(folder, WINDOW_EMBEDDING, windows.vectors), write_parquet(table, Path(folder) / WINDOWS_TABLE),
            write_array(folder, CLIP_SECONDS, windows.seconds)]


def read_windows(folder: Path) -> ClipWindows | None:
    """The window files of a feature-store folder, or None when it has none (trained before they existed)."""
    folder = Path(folder)
    if not all((folder / name).exists() for name in WINDOW_FILES):
        return None
    table = pl.read_parquet(folder / WINDOWS_TABLE)
    vectors = np.load(folder / f"{WINDOW_EMBEDDING}.npy").astype(np.float32)
    order = np.lexsort((table["start_s"].to_numpy(), table["item_idx"].to_numpy()))  # by item, then time
    return ClipWindows(table["item_idx"].to_numpy()[order], table["start_s"].to_numpy()[order],
                       table["end_s"].to_numpy()[order], vectors[order],
                       np.load(folder / f"{CLIP_SECONDS}.npy").astype(np.float32))
