"""A tiny feature store written directly (no videos to decode): items of a few topics whose frames,
spectrogram and title all depend on the topic, for fast content-training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from recsys.media.feature_store import MANIFEST_SCHEMA, RowWriter, StoreBuilder, StoreLayout


def write_store(
    folder: Path,
    n_items: int = 24,
    topics: int = 3,
    failed: tuple[int, ...] = (),
    no_audio: tuple[int, ...] = (),
    no_title: tuple[int, ...] = (),
    seed: int = 0,
    motion_only: bool = False,
) -> np.ndarray:
    """Write a finished store of `n_items` under `folder`; returns each item's topic (N,).

    Topic k: a square of colour k moving in direction k, a tone in mel band 4k, a title vector
    near basis vector k. `failed` rows are all zeros with status "failed". With `motion_only`,
    every topic has the look, sound and title of topic 0 and topics differ only in which way the
    square moves (topics 0 and 1: right and left; 2 and 3: down and up).
    """
    rng = np.random.default_rng(seed)
    layout = StoreLayout(n_items=n_items, frames=6, frame_size=32, fps=4.0, sample_rate=16_000, n_mels=16,
                         n_fft=400, hop_length=160, audio_seconds=0.4)
    builder, _ = StoreBuilder.open(folder, layout, {"test": "content"}, overwrite=True)
    topic = np.arange(n_items) % topics
    t, s, length = layout.frames, layout.frame_size, layout.mel_frames
    titles = np.zeros((n_items, 384), np.float32)
    rows = []
    with RowWriter(builder.folder, layout) as writer:
        for i in range(n_items):
            k = int(topic[i])
            look = 0 if motion_only else k  # what colour, sound and title show
            n_frames = int(rng.integers(4, t + 1))
            frames = np.zeros((t, s, s, 3), np.uint8)
            x, y = rng.integers(0, s, size=2)
            # Right, down, left, up; with `motion_only`, topics 0 and 1 (and 2 and 3) move opposite ways.
            direction = (2 * k) % 4 + (k // 2) % 2 if motion_only else k % 4
            dx, dy = [(3, 0), (0, 3), (-3, 0), (0, -3)][direction]
            for step in range(n_frames):
                cx, cy = (x + step * dx) % (s - 6), (y + step * dy) % (s - 6)
                frames[step, cy:cy + 6, cx:cx + 6, look % 3] = 255
            frame_mask = np.arange(t) < n_frames
            mel = rng.normal(-60, 3, (layout.n_mels, length)).astype(np.float16)
            mel[4 * look % layout.n_mels] += 40
            mel_mask = np.ones(length, bool)
            has_audio, has_title, ok = i not in no_audio, i not in no_title, i not in failed
            if not has_audio or not ok:
                mel, mel_mask = np.zeros_like(mel), np.zeros_like(mel_mask)
            if not ok:
                frames, frame_mask = np.zeros_like(frames), np.zeros_like(frame_mask)
            if has_title and ok:
                titles[i, look] = 1.0
                titles[i] += rng.normal(0, 0.1, 384).astype(np.float32)
            writer.write(i, {"frames": frames, "frame_mask": frame_mask, "mel": mel, "mel_mask": mel_mask})
            rows.append({
                "item_idx": i, "item_id": f"item{i}", "status": "ok" if ok else "failed",
                "reason": "" if ok else "no decodable video frames", "has_video": ok, "has_audio": has_audio and ok,
                "has_title": has_title and ok, "duration": n_frames / 4.0, "source_fps": 4.0, "width": s,
                "height": s, "video_codec": "h264", "audio_codec": "aac" if has_audio else None,
                "n_frames": n_frames, "sampled_frames": n_frames, "audio_sample_rate": 16_000,
                "audio_channels": 1, "audio_samples": 6400,
            })
    builder.write_titles(titles)
    builder.finish(pl.DataFrame(rows, schema=MANIFEST_SCHEMA), counts={"items": n_items})
    return topic
