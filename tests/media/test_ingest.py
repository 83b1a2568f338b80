"""Ingestion into the feature store: real codecs, every kind of bad input, resuming, titles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import recsys.media.ingest as ingest_module
from recsys.config import IngestConfig
from recsys.errors import MissingInputError
from recsys.media.feature_store import FeatureStore, RowWriter, StoreLayout
from recsys.media.ingest import ingest
from recsys.media.titles import TitleEncoder
from recsys.processes import descendants, is_running
from recsys.synthetic.render import write_mp4

DATASET = "synth"


def make_prepared(processed: Path, paths: list[str | None], titles: list[bytes] | None = None) -> Path:
    """A prepared dataset holding only what ingestion reads: items.parquet (+ meta.json)."""
    root = processed / DATASET
    root.mkdir(parents=True)
    raw_titles = titles if titles is not None else [f"clip {i}".encode() for i in range(len(paths))]
    binary = pa.array(raw_titles, pa.binary())
    # Built from raw buffers so that invalid UTF-8 can reach the file, as from a badly encoded source.
    title_column = pa.Array.from_buffers(pa.string(), len(binary), binary.buffers())
    table = pa.table({
        "item_idx": pa.array(range(len(paths)), pa.int64()),
        "item_id": [f"item{i}" for i in range(len(paths))],
        "title": title_column,
        "video_path": pa.array(paths, pa.string()),
        "train_count": pa.array([0] * len(paths), pa.int64()),
    })
    pq.write_table(table, root / "items.parquet")
    (root / "meta.json").write_text("{}\n")
    return root


def _clip(path: Path, n_frames: int = 15, fps: int = 10, size: tuple[int, int] = (64, 64), audio: bool = True,
          seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    frames = (rng.random((n_frames, size[1], size[0], 3)) * 255).astype(np.uint8)
    sound = (0.3 * np.sin(np.arange(int(n_frames / fps * 16_000)) * 0.2)).astype(np.float32) if audio else None
    return str(write_mp4(path, frames, fps, sound, 16_000))


def _audio_only(path: Path) -> str:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16_000, layout="mono")
        tone = (0.3 * np.sin(np.arange(16_000) * 0.1)).astype(np.float32)
        for start in range(0, tone.size, 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16_000, start, Fraction(1, 16_000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)


def _faststart(source: str, path: Path) -> Path:
    """`source` remuxed with its index first, so a cut file still opens (and then runs out of data)."""
    with av.open(source) as src, av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    return path


def _config(processed: Path, **overrides: object) -> IngestConfig:
    settings: dict[str, object] = {"titles": False, "workers": 1, **overrides}
    return IngestConfig(dataset=DATASET, processed_dir=processed, **settings)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------


def test_real_clips_match_the_probe(shared_data: Path, tmp_path: Path) -> None:
    probes = json.loads((shared_data / "video_probe.json").read_text())
    make_prepared(tmp_path, [str(shared_data / p["file"]) for p in probes])
    summary = ingest(_config(tmp_path, workers=2))
    assert summary["counts"]["ok"] == len(probes) and summary["counts"]["failed"] == 0
    store = FeatureStore.open(tmp_path / DATASET / "features")
    manifest = store.manifest.to_dicts()
    for row, probe in zip(manifest, probes, strict=True):
        video = next(s for s in probe["streams"] if s["type"] == "video")
        audio = next(s for s in probe["streams"] if s["type"] == "audio")
        assert row["status"] == "ok" and row["has_video"] and row["has_audio"], probe["file"]
        assert (row["video_codec"], row["width"], row["height"]) == (video["codec"], video["width"], video["height"])
        assert row["source_fps"] == pytest.approx(video["avg_fps"])
        assert row["n_frames"] == video["decoded_frames"], probe["file"]
        assert row["duration"] == pytest.approx(probe["duration_s"], abs=0.05)
        assert (row["audio_codec"], row["audio_sample_rate"], row["audio_channels"]) == (
            audio["codec"], audio["sample_rate"], audio["channels"])
        audio_seconds = audio["decoded_samples_per_channel"] / audio["sample_rate"]
        assert row["audio_samples"] == pytest.approx(min(4.0, audio_seconds) * 16_000, abs=64)
        i = row["item_idx"]
        assert store.frame_mask[i].sum() == row["sampled_frames"] == min(16, int(probe["duration_s"] * 4 + 1e-6))
        assert store.mel_mask[i].sum() == min(401, 1 + row["audio_samples"] // 160)
        assert store.frames[i][store.frame_mask[i]].std() > 5
    assert store.frames.shape == (len(probes), 16, 64, 64, 3) and store.mel.shape == (len(probes), 64, 401)


def test_every_bad_input_ends_as_promised(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    good = _clip(media / "good.mp4")
    (media / "empty.mp4").write_bytes(b"")
    (media / "text.mp4").write_text("this is a text file, not a video\n")
    data = Path(good).read_bytes()
    (media / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    fast = _faststart(good, media / "fast.mp4").read_bytes()
    (media / "cut_fast.mp4").write_bytes(fast[: len(fast) * 6 // 10])
    cases = {
        "good": (good, b"Ocean waves at sunset"),
        "no audio": (_clip(media / "silent.mp4", audio=False), b"silent"),
        "audio only": (_audio_only(media / "sound.mp4"), b"sound"),
        "single frame": (_clip(media / "one.mp4", n_frames=1), b"one frame"),
        "large": (str(write_mp4(media / "large.mp4", np.zeros((1, 2160, 3840, 3), np.uint8), 10, None, 16_000)),
                  b"large"),
        "empty": (str(media / "empty.mp4"), b"empty"),
        "text": (str(media / "text.mp4"), b"text"),
        "cut": (str(media / "cut.mp4"), b"cut"),
        "cut faststart": (str(media / "cut_fast.mp4"), b"cut"),
        "missing": (str(media / "nowhere.mp4"), b"missing"),
        "no file": (None, b"no video at all"),
        "bad title": (good, b"Caf\xe9 \xff video"),
    }
    make_prepared(tmp_path, [p for p, _ in cases.values()], [t for _, t in cases.values()])
    summary = ingest(_config(tmp_path, titles=True, workers=2, max_pixels=1920 * 1080,
                             title_cache=tmp_path / "cache"))
    store = FeatureStore.open(tmp_path / DATASET / "features")
    rows = dict(zip(cases, store.manifest.to_dicts(), strict=True))

    def check(name: str, status: str, reason: str, **facts: object) -> None:
        row = rows[name]
        assert (row["status"], row["reason"]) == (status, reason), name
        for key, value in facts.items():
            assert row[key] == value, (name, key)
        if status == "failed":
            i = row["item_idx"]
            assert not store.frame_mask[i].any() and not store.mel_mask[i].any() and not store.frames[i].any()

    check("good", "ok", "", has_video=True, has_audio=True, sampled_frames=6)
    check("no audio", "ok", "", has_video=True, has_audio=False)
    check("audio only", "ok", "no video stream (audio only)", has_video=False, has_audio=True)
    check("single frame", "ok", "", has_video=True, n_frames=1, sampled_frames=1)
    check("large", "failed", "frame size 3840x2160 is over max_pixels=2073600; not decoded")
    check("empty", "failed", "empty file (0 bytes)")
    check("text", "failed", "not a media file (it holds text)")
    assert rows["cut"]["status"] == "failed" and rows["cut"]["reason"].startswith("unreadable or truncated")
    assert rows["cut faststart"]["status"] == "failed" and "truncated" in rows["cut faststart"]["reason"]
    check("missing", "failed", "missing file")
    check("no file", "ok", "no video file", has_video=False, has_audio=False, has_title=True)
    check("bad title", "ok", "title is not valid UTF-8 (undecodable bytes replaced)", has_title=True)

    counts = summary["counts"]
    assert counts["items"] == len(cases) == counts["ok"] + counts["failed"]
    assert counts["videos_in"] == len(cases) - 1 == counts["videos_ok"] + counts["videos_failed"]
    assert counts["failed"] == 6 and sum(summary["failures"].values()) == 6
    # Titles: embedded for every row that has one; the bad-UTF-8 title still gets a real embedding.
    norms = np.linalg.norm(store.title_embedding, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)
    assert store.info["title_model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_titles_are_embedded_by_meaning_and_cached(tmp_path: Path) -> None:
    titles = ["Ocean waves and surfing at the beach", "Surf session: big waves today", "Chess opening checkmate", ""]
    first = TitleEncoder(tmp_path / "cache")
    vectors = first.encode(titles)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert not vectors[3].any(), "an empty title gets a zero row"
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    second = TitleEncoder(tmp_path / "cache")
    np.testing.assert_array_equal(second.encode(titles), vectors)
    assert (second.hits, second.misses, second._model) == (3, 0, None), "all from the cache, no model load"


def test_dataset_without_videos_gets_ok_rows_without_media(tmp_path: Path) -> None:
    make_prepared(tmp_path, [None] * 5)
    summary = ingest(_config(tmp_path))
    store = FeatureStore.open(tmp_path / DATASET / "features")
    assert summary["counts"]["ok"] == 5 and summary["counts"]["videos_in"] == 0
    assert set(store.manifest.get_column("reason")) == {"no video file"}
    assert not store.frame_mask.any() and not store.mel_mask.any()
    assert store.title_embedding.shape == (5, 384) and not store.title_embedding.any()  # titles off


def _clips(folder: Path, n: int) -> list[str | None]:
    folder.mkdir()
    return [_clip(folder / f"c{i}.mp4", n_frames=10 + i, seed=i, audio=i % 3 != 0) for i in range(n)]


def test_crash_then_resume_gives_the_same_store_and_a_third_run_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _clips(tmp_path / "clips", 10)
    make_prepared(tmp_path / "clean", paths)
    ingest(_config(tmp_path / "clean"))
    reference = FeatureStore.open(tmp_path / "clean" / DATASET / "features")

    make_prepared(tmp_path / "crash", paths)
    real = ingest_module.ingest_rows
    calls = []

    def crash_on_second_batch(folder: str, layout: dict, max_pixels: int, rows: list) -> list:
        calls.append(rows)
        if len(calls) == 2:
            # Half-written rows, as a kill during the batch would leave them, then the "kill".
            with RowWriter(Path(folder), StoreLayout(**layout)) as writer:
                for item_idx, _ in rows:
                    writer.write(item_idx, {"frames": np.full((16, 64, 64, 3), 7, np.uint8),
                                            "frame_mask": np.ones(16, bool), "mel": np.ones((64, 401), np.float16),
                                            "mel_mask": np.ones(401, bool)})
            raise KeyboardInterrupt
        return real(folder, layout, max_pixels, rows)

    monkeypatch.setattr(ingest_module, "ingest_rows", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        ingest(_config(tmp_path / "crash"))
    features = tmp_path / "crash" / DATASET / "features"
    with (features / "progress.jsonl").open("a") as journal:
        journal.write('{"item_idx": 9, "status": "o')  # a journal line torn by the kill
    with pytest.raises(MissingInputError, match="unfinished"):
        FeatureStore.open(features)

    monkeypatch.setattr(ingest_module, "ingest_rows", real)
    summary = ingest(_config(tmp_path / "crash"))
    assert summary["store"] == "resumed"
    assert summary["counts"]["resumed_rows"] == len(calls[0])
    assert summary["counts"]["processed_videos"] == 10 - len(calls[0])
    resumed = FeatureStore.open(features)
    for name in ("frames", "frame_mask", "mel", "mel_mask"):
        np.testing.assert_array_equal(resumed.array(name), reference.array(name), err_msg=name)
    assert resumed.manifest.equals(reference.manifest)

    before = (features / "frames.npy").stat().st_mtime_ns
    again = ingest(_config(tmp_path / "crash"))
    assert again["counts"]["processed_videos"] == 0 and again["counts"]["resumed_rows"] == 10
    assert (features / "frames.npy").stat().st_mtime_ns == before

    rebuilt = ingest(_config(tmp_path / "crash", frames=8))
    assert rebuilt["store"].startswith("rebuilt") and rebuilt["counts"]["processed_videos"] == 10
    assert FeatureStore.open(features).frames.shape == (10, 8, 64, 64, 3)


@pytest.mark.slow
def test_a_killed_ingestion_process_continues_where_it_stopped(shared_data: Path, tmp_path: Path) -> None:
    # Small clips first, then long HEVC ones: the kill lands after some rows are done.
    paths = _clips(tmp_path / "clips", 6) + [
        str(shared_data / "microlens/MicroLens-50k/videos/10040.mp4"),
        str(shared_data / "microlens/MicroLens-50k/videos/1002.mp4"),
    ]
    make_prepared(tmp_path / "p", paths)
    features = tmp_path / "p" / DATASET / "features"
    script = (f"from recsys.media.ingest import ingest; from recsys.config import IngestConfig; "
              f"ingest(IngestConfig(dataset='{DATASET}', processed_dir=r'{tmp_path / 'p'}', titles=False, workers=1))")
    process = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    journal = features / "progress.jsonl"
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.read_bytes().count(b"\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_at_kill = journal.read_bytes().count(b"\n")
    assert 2 <= done_at_kill < len(paths), "the kill must land mid-run"

    summary = ingest(_config(tmp_path / "p"))
    assert summary["store"] == "resumed" and summary["counts"]["resumed_rows"] == done_at_kill
    store = FeatureStore.open(features)
    assert store.manifest.get_column("status").to_list() == ["ok"] * len(paths)
    assert store.frame_mask.all(axis=1).sum() >= 2  # the long clips fill all 16 slots


@pytest.mark.slow
def test_synth_prepare_ingest_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.cli import main
    from recsys.synthetic.truth import SynthTruth

    raw, processed = tmp_path / "raw", tmp_path / "processed"
    assert main(["data", "synth", "--preset", "small", "--raw-dir", str(raw)]) == 0
    assert main(["data", "prepare", "synth", "--raw-dir", str(raw), "--processed-dir", str(processed)]) == 0
    assert main(["ingest", "synth", "--processed-dir", str(processed), "--no-titles"]) == 0
    assert " ok, 0 failed" in capsys.readouterr().out
    store = FeatureStore.open(processed / DATASET / "features")
    manifest = store.manifest
    assert manifest.get_column("status").to_list() == ["ok"] * len(store)
    assert manifest.get_column("has_video").all()
    facts = pl.read_parquet(raw / "synth" / "truth" / "items.parquet")
    has_audio = dict(zip(facts.get_column("item_id"), facts.get_column("has_audio"), strict=True))
    assert all(has_audio[i] == a for i, a in manifest.select("item_id", "has_audio").iter_rows())
    truth = SynthTruth.load(raw / "synth")
    cold = manifest.filter(pl.col("item_id").is_in(truth.item_ids[truth.cold].tolist()))
    assert cold.height == truth.cold.sum() and cold.get_column("has_video").all()


@pytest.mark.slow
def test_the_decode_workers_of_a_killed_ingestion_exit_with_it(shared_data: Path, tmp_path: Path) -> None:
    paths = _clips(tmp_path / "clips", 4) + [
        str(shared_data / "microlens/MicroLens-50k/videos/10040.mp4"),
        str(shared_data / "microlens/MicroLens-50k/videos/1002.mp4"),
    ]
    make_prepared(tmp_path / "p", paths)
    journal = tmp_path / "p" / DATASET / "features" / "progress.jsonl"
    command = [str(Path(sys.executable).parent / "recsys"), "ingest", DATASET, "--processed-dir", str(tmp_path / "p"),
               "--no-titles", "--workers", "2"]
    process = subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        workers: set[int] = set()
        while time.monotonic() < deadline and not (journal.exists() and len(workers) >= 2):
            workers = descendants(process.pid)
            time.sleep(0.05)
        assert len(workers) >= 2 and process.poll() is None, "the kill must land while the workers run"
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed = time.monotonic()
        while any(is_running(w) for w in workers) and time.monotonic() - killed < 10:
            time.sleep(0.05)
        assert not [w for w in workers if is_running(w)], "a decode worker outlived the killed ingestion"
    finally:
        for pid in [process.pid, *descendants(process.pid)]:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
