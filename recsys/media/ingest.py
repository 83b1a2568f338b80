"""`recsys ingest DATASET`: a prepared dataset's videos and titles → the feature store.

Reads the prepared `items.parquet` (row i = item_idx i) and fills the store described in
`recsys.media.feature_store`: sampled frames, log-mel spectrograms, title embeddings and a
manifest row per item saying what happened to it. Videos are decoded in parallel (a process
pool over items, one decoder thread each); every file is read in one pass that feeds both the
frame sampler and the audio collector.

Resumable and idempotent: rows already in the store's journal are skipped, so a second run does
nothing and a killed run continues where it stopped. Every item ends as exactly one manifest
row, "ok" or "failed" with a reason: items = ok + failed, and videos in = videos ok + failed.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import IngestConfig, to_dict
from recsys.data.paths import PreparedPaths
from recsys.errors import DataFormatError, MissingInputError
from recsys.files import write_parquet
from recsys.media.feature_store import MANIFEST_SCHEMA, SOURCES, RowWriter, StoreBuilder, StoreLayout

NO_VIDEO = "no video file"
AUDIO_ONLY = "no video stream (audio only)"
BAD_TITLE = "title is not valid UTF-8 (undecodable bytes replaced)"
CRASHED = "the decoder crashed its worker process"


# --------------------------------------------------------------------------------------------
# One file


@dataclass
class MediaRow:
    """What ingestion found in one item's file (a manifest row without the title columns)."""

    item_idx: int
    status: str = "ok"
    reason: str = ""
    has_video: bool = False
    has_audio: bool = False
    duration: float | None = None
    source_fps: float | None = None
    width: int | None = None
    height: int | None = None
    video_codec: str | None = None
    audio_codec: str | None = None
    n_frames: int = 0
    sampled_frames: int = 0
    audio_sample_rate: int | None = None
    audio_channels: int | None = None
    audio_samples: int = 0

    def fail(self, reason: str) -> MediaRow:
        """This row as a failure: no media kept, the reason given."""
        self.status, self.reason = "failed", reason
        self.has_video = self.has_audio = False
        self.sampled_frames = self.audio_samples = 0
        return self


class _TooLarge(Exception):
    pass


def empty_arrays(layout: StoreLayout) -> dict[str, np.ndarray]:
    """A row of every media array with nothing in it (zeros, masks False)."""
    return {name: np.zeros(shape[1:], dtype=dtype) for name, (shape, dtype) in layout.media_arrays().items()}


def extract_media(item_idx: int, path: str | None, layout: StoreLayout, max_pixels: int
                  ) -> tuple[MediaRow, dict[str, np.ndarray]]:
    """Decode one item's file into its store rows; every problem becomes a failed row, never an exception."""
    row = MediaRow(item_idx)
    arrays = empty_arrays(layout)
    if not path:
        row.reason = NO_VIDEO
        return row, arrays
    file = Path(path)
    if not file.is_file():
        return row.fail("missing file"), arrays
    if file.stat().st_size == 0:
        return row.fail("empty file (0 bytes)"), arrays
    try:
        return _decode(row, file, layout, max_pixels)
    except _TooLarge as err:
        return row.fail(str(err)), empty_arrays(layout)
    except Exception as err:  # noqa: BLE001 - any decoder error is this file's failure, not the run's
        return row.fail(_describe_error(file, err, row)), empty_arrays(layout)


def _decode(row: MediaRow, file: Path, layout: StoreLayout, max_pixels: int
            ) -> tuple[MediaRow, dict[str, np.ndarray]]:
    import av

    from recsys.media.audio import AudioCollector, audio_facts, log_mel
    from recsys.media.video import first_video_stream, open_sampler

    arrays = empty_arrays(layout)
    with av.open(str(file), metadata_errors="ignore") as container:
        video = first_video_stream(container)
        audio = container.streams.audio[0] if container.streams.audio else None
        if video is None and audio is None:
            return row.fail("no video or audio stream"), arrays
        row.duration = container.duration / av.time_base if container.duration else None
        sampler = collector = None
        if video is not None:
            sampler, facts = open_sampler(video, container, layout.frames, layout.fps, layout.frame_size)
            row.video_codec, row.width, row.height = facts.codec, facts.width, facts.height
            row.source_fps, row.duration = facts.fps, row.duration or facts.duration
            _check_size(facts.width, facts.height, max_pixels)
        if audio is not None:
            collector = AudioCollector(layout.sample_rate, layout.audio_seconds)
            a_facts = audio_facts(audio)
            row.audio_codec, row.audio_sample_rate, row.audio_channels = (
                a_facts.codec, a_facts.sample_rate, a_facts.channels)
        for packet in container.demux([s for s in (video, audio) if s is not None]):
            if packet.stream is audio:
                if collector is not None and not collector.full:
                    for frame in packet.decode():
                        collector.push(frame)
            elif sampler is not None:
                for frame in packet.decode():
                    if sampler.decoded == 0:
                        _check_size(frame.width, frame.height, max_pixels)
                    sampler.push(frame)

    if sampler is not None:
        frames, mask = sampler.finish()
        row.n_frames = sampler.decoded
        expected = _trusted_frame_count(video)
        if sampler.decoded == 0:
            return row.fail("no decodable video frames"), empty_arrays(layout)
        if expected and sampler.decoded < 0.9 * expected:
            return row.fail(f"truncated file: decoded {sampler.decoded} of {expected} frames"), empty_arrays(layout)
        arrays["frames"], arrays["frame_mask"] = frames, mask
        row.has_video, row.sampled_frames = True, int(mask.sum())
    else:
        row.reason = AUDIO_ONLY
    if collector is not None:
        samples = collector.finish()
        mel, mel_mask = log_mel(samples, layout.sample_rate, layout.n_mels, layout.n_fft, layout.hop_length,
                                layout.mel_frames)
        arrays["mel"], arrays["mel_mask"] = mel, mel_mask
        row.has_audio, row.audio_samples = samples.size > 0, int(samples.size)
    return row, arrays


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise _TooLarge(f"frame size {width}x{height} is over max_pixels={max_pixels}; not decoded")


def _describe_error(file: Path, err: Exception, row: MediaRow) -> str:
    """A reason a user can act on, for a file FFmpeg could not read."""
    with file.open("rb") as handle:
        head = handle.read(512)
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "not a media file (it holds text)"
    message = getattr(err, "strerror", None) or str(err) or type(err).__name__
    if row.width is None and row.audio_codec is None:
        return f"unreadable or truncated media file: {message}"
    return f"truncated or corrupt media data: {message}"


def start_worker(layout: dict[str, Any], parent_pid: int) -> None:
    """Process-pool initializer: end with the ingesting process, import the decoding code and build the
    filterbank and window.

    A worker would otherwise outlive an ingestion killed with SIGKILL, idle, holding its memory.
    Start-up costs belong to starting the worker, not to whichever video comes first.
    """
    from recsys.processes import exit_with_parent

    exit_with_parent(parent_pid)  # first: the imports below take seconds, the parent may die meanwhile
    from recsys.media.audio import log_mel

    store_layout = StoreLayout(**layout)
    log_mel(np.zeros(store_layout.n_fft, dtype=np.float32), store_layout.sample_rate, store_layout.n_mels,
            store_layout.n_fft, store_layout.hop_length, store_layout.mel_frames)


def ingest_rows(folder: str, layout: dict[str, Any], max_pixels: int, rows: list[tuple[int, str | None]]
                ) -> list[dict[str, Any]]:
    """Process-pool task: extract and write a batch of rows, flush them, return their manifest facts."""
    from threadpoolctl import threadpool_limits

    store_layout = StoreLayout(**layout)
    results = []
    # One BLAS thread: parallelism is across items, and idle BLAS threads spinning on busy cores
    # made the spectrograms several times slower.
    with threadpool_limits(limits=1), RowWriter(Path(folder), store_layout) as writer:
        for item_idx, path in rows:
            started = time.process_time()
            row, arrays = extract_media(item_idx, path, store_layout, max_pixels)
            writer.write(item_idx, arrays)
            # CPU spent on this item (journal only, not the manifest: it differs run to run).
            results.append({**asdict(row), "cpu_seconds": time.process_time() - started})
        writer.sync()
    return results


# --------------------------------------------------------------------------------------------
# The prepared items


@dataclass
class ItemTable:
    """The prepared catalogue, as ingestion needs it."""

    item_ids: list[str]
    titles: list[str]
    bad_titles: list[bool]
    """Titles whose bytes were not valid UTF-8 (decoded with replacement characters)"""
    video_paths: list[str | None]


def read_items(path: Path) -> ItemTable:
    """Read items.parquet; titles are read as bytes so invalid UTF-8 is reported, not fatal.

    An item's title text is its title followed by its description and tags (the `text` column).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    missing = {"item_idx", "item_id", "title", "video_path"} - present
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {', '.join(sorted(missing))}; prepare the dataset again")
    table = pq.read_table(path, columns=["item_idx", "item_id", "title", "video_path"])
    order = table.column("item_idx").to_numpy()
    if not np.array_equal(order, np.arange(len(order))):
        raise DataFormatError(f"{path}: item_idx must be 0..N-1 in row order; prepare the dataset again")
    raw_titles = pc.cast(table.column("title"), pa.large_binary()).to_pylist()
    titles, bad = [], []
    for raw in raw_titles:
        raw = raw or b""
        try:
            titles.append(raw.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            titles.append(raw.decode("utf-8", errors="replace"))
            bad.append(True)
    if "text" in present:  # description and tags of imported catalogues: the title encoder reads them after the title
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        titles = [". ".join(part for part in (title.strip(), (text or "").strip()) if part)
                  for title, text in zip(titles, texts, strict=True)]
    paths = [p or None for p in pc.cast(table.column("video_path"), pa.large_string()).to_pylist()]
    return ItemTable(table.column("item_id").cast(pa.large_string()).to_pylist(), titles, bad, paths)


# --------------------------------------------------------------------------------------------
# The whole dataset


def ingest(config: IngestConfig) -> dict[str, Any]:
    """Fill (or finish) the dataset's feature store; returns a summary with counts and the MLflow run ID."""
    from recsys.tracking.store import fingerprint_files, latest_run_id, start_run

    paths = PreparedPaths.of(config.processed_dir, config.dataset).require()
    if not paths.items.exists():
        raise MissingInputError(f"{paths.items} not found; run `recsys data prepare {config.dataset}` again")
    items = read_items(paths.items)
    layout = StoreLayout(
        n_items=len(items.item_ids), frames=config.frames, frame_size=config.frame_size, fps=config.fps,
        sample_rate=config.sample_rate, n_mels=config.n_mels, n_fft=config.n_fft,
        hop_length=config.hop_length, audio_seconds=config.audio_seconds,
    )
    fingerprint = fingerprint_files([paths.items])
    decoding = {key: value for key, value in asdict(layout).items() if key != "n_items"}
    identity = {"dataset": config.dataset, "items_fingerprint": fingerprint, "layout": asdict(layout),
                "max_pixels": config.max_pixels, "decoding": decoding}
    started = time.perf_counter()
    builder, how = StoreBuilder.open(paths.features, layout, identity, config.overwrite,
                                     same_media=("dataset", "decoding", "max_pixels"))
    if not (builder.folder / SOURCES).exists():
        write_parquet(pl.DataFrame({"item_idx": range(layout.n_items), "item_id": items.item_ids,
                                    "video_path": items.video_paths},
                                   schema={"item_idx": pl.Int64, "item_id": pl.String, "video_path": pl.String}),
                      builder.folder / SOURCES)
    inputs = {"items": fingerprint}
    prepare_run = latest_run_id(config.dataset, "prepare")
    if prepare_run:
        inputs["prepare"] = prepare_run

    run_name = f"ingest T{config.frames} S{config.frame_size}" + ("" if config.titles else " no-titles")
    with start_run(config.dataset, "ingest", to_dict(config), inputs, run_name=run_name) as run:
        import mlflow

        from recsys.tracking.inputs import log_tables

        log_tables(config.dataset, {"catalogue": paths.items})
        title_stats = _ingest_titles(config, builder, items)
        carried = builder.carry_over(unchanged_videos(builder.previous, items))
        builder.drop_previous()
        done = builder.journal.load()
        resumed_rows = len(done)
        todo = [i for i in range(layout.n_items) if i not in done]
        # Items without a file need no decoding: their rows stay zeros, only the journal learns of them.
        builder.journal.append([asdict(MediaRow(i, reason=NO_VIDEO)) for i in todo if items.video_paths[i] is None])
        videos = [(i, items.video_paths[i]) for i in todo if items.video_paths[i] is not None]
        media_started = time.perf_counter()
        decoded_frames, worker_cpu = _ingest_videos(config, builder, layout, videos)
        media_seconds = time.perf_counter() - media_started

        manifest = build_manifest(builder.journal.load(), items)
        counts = manifest_counts(manifest)
        counts.update(resumed_rows=resumed_rows - len(carried), carried_over_rows=len(carried),
                      processed_videos=len(videos),
                      title_cache_hits=title_stats["hits"], title_cache_misses=title_stats["misses"])
        builder.finish(manifest, counts, mlflow_run_id=run.info.run_id)
        seconds = time.perf_counter() - started
        mlflow.log_metrics({f"count.{k}": v for k, v in counts.items() if isinstance(v, int | float)})
        mlflow.log_metrics({
            "seconds": seconds,
            "videos_per_s": len(videos) / media_seconds if videos else 0.0,
            "decoded_frames_per_s": decoded_frames / media_seconds if videos else 0.0,
            "worker_cpu_seconds": worker_cpu,
        })
        mlflow.log_artifact(str(builder.folder / "store.json"))
        mlflow.log_artifact(str(builder.folder / "manifest.parquet"))
    failures = (manifest.filter(pl.col("status") == "failed").group_by("reason").len().sort("len", descending=True))
    return {
        "dataset": config.dataset,
        "folder": str(builder.folder),
        "store": how,
        "counts": counts,
        "failures": dict(zip(failures.get_column("reason").to_list(), failures.get_column("len").to_list(),
                             strict=True)),
        "seconds": round(seconds, 2),
        "decoded_frames": decoded_frames,
        "worker_cpu_seconds": round(worker_cpu, 3),
        "mlflow_run_id": run.info.run_id,
    }


def unchanged_videos(previous: Path | None, items: ItemTable) -> dict[int, int]:
    """{new item_idx: old item_idx} of items whose video the previous store decoded and that is unchanged since.

    Same item ID, same file path, and a file not modified after that store was started: after
    new videos are imported (and the dataset prepared again), only those are decoded.
    """
    if previous is None or not (previous / SOURCES).exists():
        return {}
    started = (previous / SOURCES).stat().st_mtime
    old = {(row["item_id"], row["video_path"]): row["item_idx"]
           for row in pl.read_parquet(previous / SOURCES).iter_rows(named=True) if row["video_path"]}
    rows = {}
    for idx, key in enumerate(zip(items.item_ids, items.video_paths, strict=True)):
        path = key[1]
        if key in old and path and Path(path).is_file() and Path(path).stat().st_mtime < started:
            rows[idx] = old[key]
    return rows


def _ingest_titles(config: IngestConfig, builder: StoreBuilder, items: ItemTable) -> dict[str, int]:
    """Write title_embedding.npy unless the store already has it from the same title setting."""
    from recsys.media.titles import MODEL_NAME, TitleEncoder

    model = MODEL_NAME if config.titles else None
    if builder.info.get("titles_done") and builder.info.get("title_model") == model:
        return {"hits": 0, "misses": 0}
    if config.titles:
        cache = config.title_cache or config.processed_dir / ".cache" / "titles"
        encoder = TitleEncoder(cache)
        embeddings = encoder.encode(items.titles)  # (N, 384)
        stats = {"hits": encoder.hits, "misses": encoder.misses}
    else:
        embeddings = np.zeros((len(items.titles), builder.layout.title_dim), dtype=np.float32)  # (N, 384)
        stats = {"hits": 0, "misses": 0}
    builder.write_titles(embeddings)
    builder.save_info(titles_done=True, title_model=model)
    return stats


def _ingest_videos(config: IngestConfig, builder: StoreBuilder, layout: StoreLayout,
                   videos: list[tuple[int, str | None]]) -> tuple[int, float]:
    """Decode `videos` into the store, journaling each batch once on disk; (frames decoded, CPU seconds)."""
    if not videos:
        return 0, 0.0
    from tqdm import tqdm

    workers = min(config.workers or os.cpu_count() or 1, len(videos))
    args = (str(builder.folder), asdict(layout), config.max_pixels)
    progress = tqdm(total=len(videos), desc=f"ingest {config.dataset}", unit="video", disable=None)
    decoded, cpu = 0, 0.0

    def record(rows: list[dict[str, Any]]) -> None:
        nonlocal decoded, cpu
        builder.journal.append(rows)
        decoded += sum(row["n_frames"] for row in rows)
        cpu += sum(row.get("cpu_seconds", 0.0) for row in rows)
        progress.update(len(rows))

    # Small batches keep every worker busy to the end and bound what a crash can cost.
    size = max(1, min(8, math.ceil(len(videos) / (workers * 4))))
    pending = deque(videos[i:i + size] for i in range(0, len(videos), size))
    try:
        if workers == 1:
            for batch in pending:
                record(ingest_rows(*args, batch))
            return decoded, cpu
        attempts: dict[int, int] = {}
        while pending:
            # spawn: fresh workers, whatever threads the parent (torch, the title model) has started.
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                     initializer=start_worker, initargs=(asdict(layout), os.getpid())) as pool:
                futures = {pool.submit(ingest_rows, *args, batch): batch for batch in pending}
                pending.clear()
                for future in as_completed(futures):
                    batch = futures[future]
                    try:
                        record(future.result())
                    except BrokenProcessPool:
                        # A worker died (e.g. a decoder crash): retry its items one by one; an item
                        # that breaks a pool twice on its own is recorded as failed.
                        for item in batch:
                            attempts[item[0]] = attempts.get(item[0], 0) + (len(batch) == 1)
                            if attempts[item[0]] >= 2:
                                record([asdict(MediaRow(item[0]).fail(CRASHED))])
                            else:
                                pending.append([item])
        return decoded, cpu
    finally:
        progress.close()


def build_manifest(rows: dict[int, dict[str, Any]], items: ItemTable) -> pl.DataFrame:
    """One manifest row per item, in item_idx order, with the title columns added."""
    records = []
    for idx, item_id in enumerate(items.item_ids):
        row = {key: value for key, value in rows[idx].items() if key in MANIFEST_SCHEMA}
        row["item_id"] = item_id
        row["has_title"] = bool(items.titles[idx].strip())
        if items.bad_titles[idx]:
            row["reason"] = "; ".join(r for r in (row["reason"], BAD_TITLE) if r)
        records.append(row)
    return pl.DataFrame(records, schema=MANIFEST_SCHEMA)


def manifest_counts(manifest: pl.DataFrame) -> dict[str, int]:
    """Counts that must add up: items = ok + failed; videos_in = videos_ok + videos_failed."""
    with_file = ~pl.col("reason").str.starts_with(NO_VIDEO)
    ok = pl.col("status") == "ok"
    row = manifest.select(
        items=pl.len(),
        ok=ok.sum(),
        failed=(~ok).sum(),
        videos_in=with_file.sum(),
        videos_ok=(with_file & ok).sum(),
        videos_failed=(with_file & ~ok).sum(),
        with_video=pl.col("has_video").sum(),
        with_audio=pl.col("has_audio").sum(),
        with_title=pl.col("has_title").sum(),
    ).row(0, named=True)
    return {name: int(value) for name, value in row.items()}


def _trusted_frame_count(video: Any) -> int:
    """The stream's declared frame count, or 0 when it cannot be evidence of truncation.

    Muxers may leave the count of a very short stream unset or garbage (seen: a one-frame MP4
    declaring 7.8e18 frames); only a count that agrees with the stream's own duration is used.
    """
    if video is None or not video.frames:
        return 0
    if video.duration and video.time_base and video.average_rate:
        implied = float(video.duration * video.time_base * video.average_rate)
        if video.frames > 2 * implied + 2:
            return 0
    return video.frames if video.frames < 10**7 else 0
