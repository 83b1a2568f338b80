"""Typed configuration for every pipeline stage.

One dataclass per stage; each field carries a one-line docstring that the CLI shows as
`--help`. Every config validates itself in `__post_init__`; `config_parser` turns a config
class into a jsonargparse parser (the CLI's options, `--config FILE`), and `save_config`
writes a config as JSON or YAML that `--config` reads back, so a run's full configuration
is reproducible from its file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import docstring_parser
import yaml
from jsonargparse import SUPPRESS, ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from recsys.errors import RecsysError

BUILTIN_DATASETS = ("movielens-100k", "movielens-1m", "microlens-50k", "synth")
"""Datasets recsys knows how to fetch or generate; any other name is one imported by `recsys data import`."""

Dataset = str
"""A dataset name: built-in or imported (lower-case letters, digits, '.', '_' and '-')."""
FetchableDataset = Literal["movielens-100k", "movielens-1m", "microlens-50k"]
DATASET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
"""An MLflow run ID."""
RESUME_LATEST = "latest"
"""`--resume` alone: the newest unfinished training run of the same dataset and config."""

C = TypeVar("C")


class ConfigError(RecsysError, ValueError):
    """A configuration value is out of its valid range or has the wrong type."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_dataset_name(name: str) -> str:
    """The name itself when it can name a dataset folder, else a ConfigError saying what is allowed."""
    _require(isinstance(name, str) and bool(DATASET_NAME.match(name)),
             f"dataset name {name!r}: use 1 to 64 lower-case letters, digits, '.', '_' or '-', "
             "starting with a letter or digit")
    return name


@dataclass
class FetchConfig:
    """Where `recsys data fetch` gets a dataset's files and where it puts them."""

    dataset: FetchableDataset = "movielens-100k"
    """Dataset to fetch"""
    source: Path | None = field(default=None, metadata={"flag": "--from"})
    """Local folder holding the dataset's files; when unset they are downloaded from the official address"""
    dest: Path = Path("data/raw")
    """Folder under which the dataset's raw files are written (one subfolder per dataset)"""

    def __post_init__(self) -> None:
        _require(self.source is None or Path(self.source).is_dir(), f"--from {self.source}: no such folder")


@dataclass(kw_only=True)
class WatchLogOptions:
    """How a watch log file is read: by `recsys data import` and `recsys views add` alike (keyword-only, so
    the configs built on it keep their own fields first: `ImportConfig("mine", interactions=...)`)."""

    format: Literal["auto", "csv", "tsv", "parquet", "jsonl"] = "auto"
    """Format of the interactions file; auto: from its extension (.csv, .tsv/.tab, .parquet/.pq, .jsonl/.ndjson)"""
    user_column: str = "user_id"
    """Column of the interactions file holding the user ID"""
    item_column: str = "item_id"
    """Column of the interactions file holding the video ID"""
    time_column: str = "timestamp"
    """Column of the interactions file holding the time of the view"""
    time_unit: Literal["auto", "s", "ms", "iso"] = "auto"
    """Timestamps: unix seconds, milliseconds, or ISO-8601 text; auto: ISO for text, s or ms by magnitude"""
    weight_column: str | None = None
    """Column with a watch weight (watch fraction, seconds watched, a rating); unset: every view weighs 1"""
    min_weight: float | None = None
    """Keep only views whose weight is at least this (needs --weight-column); the others are skipped and counted"""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A row with a missing ID or an unparseable time or weight: stop with an error naming it (nothing is
    written), or skip and count it"""
    strict: bool = False
    """Stop with an error when a view names a video missing from the catalogue (default: skip and count it)"""

    def __post_init__(self) -> None:
        _require(self.min_weight is None or self.weight_column is not None, "--min-weight needs a --weight-column")
        for name in ("user_column", "item_column", "time_column"):
            _require(bool(getattr(self, name)), f"{name} must not be empty")


@dataclass(kw_only=True)
class ServedVersionOptions:
    """Which registered version of recsys-<dataset> a command reads: by `recommend`, `similar`, `search
    --user-id`, `catalogue add` and `views add` alike (keyword-only, like `WatchLogOptions`). An update
    registers the next version, which takes the alias when the version it updates held it."""

    alias: str = "champion"
    """Registry alias of the model version to use (what `recsys serve` serves)"""
    version: str | None = None
    """Registry version number to use instead of the alias"""


@dataclass
class ImportConfig(WatchLogOptions):
    """What `recsys data import` reads: your own watch log and catalogue, onto the canonical tables."""

    dataset: Dataset = ""
    """Name of the new dataset; every later step takes it like a built-in one (e.g. `recsys data prepare NAME`)"""
    interactions: Path | None = None
    """Watch log: CSV, TSV, Parquet or JSON Lines (by extension, or --format), one row per view"""
    items: Path | None = None
    """Catalogue: item_id, title, optional video (path under --media-root), description, tags; unset: the
    videos in --media-root named <item_id>.<ext> are the catalogue"""
    media_root: Path | None = None
    """Folder the catalogue's video paths are relative to; nothing outside it is read"""
    items_format: Literal["auto", "csv", "tsv", "parquet", "jsonl"] = "auto"
    """Format of the items file; auto: from its extension"""
    overwrite: bool = False
    """Replace an already imported dataset of the same name"""
    raw_dir: Path = Path("data/raw")
    """Folder under which the imported dataset is written (one subfolder per dataset)"""

    def __post_init__(self) -> None:
        _require(bool(self.dataset), "give the new dataset a name: `recsys data import NAME --interactions FILE`")
        check_dataset_name(self.dataset)
        _require(self.dataset not in BUILTIN_DATASETS,
                 f"{self.dataset!r} is a built-in dataset; import your data under another name")
        _require(self.interactions is not None, "give the watch log with --interactions FILE")
        _require(self.items is not None or self.media_root is not None,
                 "give the catalogue with --items FILE, or a --media-root folder of videos named <item_id>.<ext>")
        self.raw_dir = Path(self.raw_dir)
        self.interactions = Path(self.interactions)  # type: ignore[arg-type]
        self.items = None if self.items is None else Path(self.items)
        self.media_root = None if self.media_root is None else Path(self.media_root)
        super().__post_init__()


@dataclass
class CatalogueAddConfig(ServedVersionOptions):
    """Which videos `recsys catalogue add` adds to (or updates in) the served model, without retraining."""

    dataset: Dataset = ""
    """Dataset whose registered model gets the videos (a new version of recsys-<dataset>)"""
    items: Path | None = None
    """The new videos: item_id, title, optional video (path under --media-root), description, tags (as `data import`)"""
    media_root: Path | None = None
    """Folder the items' video paths are relative to; nothing outside it is read"""
    items_format: Literal["auto", "csv", "tsv", "parquet", "jsonl"] = "auto"
    """Format of the items file; auto: from its extension"""
    item_column: str = "item_id"
    """Column of the items file holding the video ID (when it has no item_id column)"""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A bad row (missing ID, path outside the media root): stop and change nothing, or skip and count it"""
    processed_dir: Path = Path("data/processed")
    """Folder holding the prepared datasets; the new videos are decoded under <dataset>/additions/"""
    workers: int = 0
    """Processes decoding the new videos; 0 uses every core"""

    def __post_init__(self) -> None:
        _require(bool(self.dataset), "name the dataset: `recsys catalogue add NAME --items FILE`")
        check_dataset_name(self.dataset)
        _require(self.items is not None, "give the new videos with --items FILE (the format of `data import`)")
        self.items = Path(self.items)  # type: ignore[arg-type]
        self.media_root = None if self.media_root is None else Path(self.media_root)
        self.processed_dir = Path(self.processed_dir)


@dataclass
class ViewsAddConfig(WatchLogOptions, ServedVersionOptions):
    """Which watch events `recsys views add` gives the served model, without retraining."""

    dataset: Dataset = ""
    """Dataset whose registered model gets the views (a new version of recsys-<dataset>)"""
    interactions: Path | None = None
    """Views after the training cut-off: CSV, TSV, Parquet or JSON Lines, one row per view (as `data import`)"""
    processed_dir: Path = Path("data/processed")
    """Folder holding the prepared datasets (registered models are downloaded into <dataset>/served/)"""

    def __post_init__(self) -> None:
        _require(bool(self.dataset), "name the dataset: `recsys views add NAME --interactions FILE`")
        check_dataset_name(self.dataset)
        _require(self.interactions is not None, "give the views with --interactions FILE (the format of `data import`)")
        self.interactions = Path(self.interactions)  # type: ignore[arg-type]
        self.processed_dir = Path(self.processed_dir)
        super().__post_init__()


@dataclass
class ListConfig:
    """Where `recsys data list` looks for built-in and imported datasets."""

    raw_dir: Path = Path("data/raw")
    """Folder holding the raw and imported datasets"""
    processed_dir: Path = Path("data/processed")
    """Folder holding the prepared datasets"""

    def __post_init__(self) -> None:
        self.raw_dir, self.processed_dir = Path(self.raw_dir), Path(self.processed_dir)


@dataclass
class PrepareConfig:
    """How `recsys data prepare` turns raw interactions into training data."""

    dataset: Dataset = "movielens-100k"
    """Dataset to prepare"""
    raw_dir: Path = Path("data/raw")
    """Folder holding the raw datasets (as written by `recsys data fetch` or `recsys data synth`)"""
    processed_dir: Path = Path("data/processed")
    """Folder under which prepared datasets are written (one subfolder per dataset)"""
    min_weight: float | None = None
    """Keep only interactions whose weight (a rating, a watch fraction) is at least this; unset keeps every one"""
    min_user_interactions: int = 5
    """k-core: users with fewer interactions are removed, repeated until stable"""
    min_item_interactions: int = 5
    """k-core: items with fewer interactions are removed, repeated until stable"""
    keep_unwatched_items: bool = True
    """Keep catalogue videos that nobody has watched in the item index, so they can be recommended"""
    split: Literal["leave-one-out", "temporal"] = "leave-one-out"
    """leave-one-out: each user's last interaction is test, the one before validation; temporal: global time cut"""
    valid_fraction: float = 0.1
    """temporal split: share of the latest interactions before the test share that form validation"""
    test_fraction: float = 0.1
    """temporal split: share of the latest interactions that form the test set"""
    on_bad_lines: Literal["error", "skip"] = "error"
    """What to do with a malformed input line: stop with an error naming it, or skip it and count it in the meta"""

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        self.raw_dir, self.processed_dir = Path(self.raw_dir), Path(self.processed_dir)
        _require(self.min_user_interactions >= 1, "min_user_interactions must be at least 1")
        _require(self.min_item_interactions >= 1, "min_item_interactions must be at least 1")
        _require(0 < self.valid_fraction < 1, "valid_fraction must lie in (0, 1)")
        _require(0 < self.test_fraction < 1, "test_fraction must lie in (0, 1)")
        _require(self.valid_fraction + self.test_fraction < 1, "valid_fraction + test_fraction must be below 1")


@dataclass
class RunsConfig:
    """What `recsys runs` lists from the MLflow store, or which two runs `recsys runs compare` sets side by side."""

    action: Literal["list", "compare"] = "list"
    """list: a table of runs with key params and metrics; compare: params that differ and metric deltas"""
    run_a: str | None = None
    """compare: the first run's ID (deltas are RUN_B minus RUN_A)"""
    run_b: str | None = None
    """compare: the second run's ID"""
    experiment: str | None = None
    """Experiment to list (a dataset name); unset lists every experiment"""
    step: str | None = None
    """List only runs of this pipeline step (prepare, ingest, train_retrieval, evaluate, export, ...)"""
    sort_by: str | None = None
    """Metric to sort the table by, highest first; unset: newest run first"""
    metrics: tuple[str, ...] = ()
    """Metrics to show as columns; unset: the sort metric, else the ones most listed runs have"""
    ascending: bool = False
    """Sort the chosen metric lowest first (for losses)"""
    limit: int = 50
    """Most runs listed"""

    def __post_init__(self) -> None:
        if self.action == "compare":
            _require(self.run_a is not None and self.run_b is not None,
                     "runs compare needs two run IDs: `recsys runs compare RUN_A RUN_B`")
        else:
            _require(self.run_a is None and self.run_b is None,
                     "`recsys runs` takes no run IDs; to compare two runs: `recsys runs compare RUN_A RUN_B`")
        _require(self.limit >= 1, "limit must be at least 1")


@dataclass
class SynthConfig:
    """What `recsys data synth` generates: real MP4 videos, titles and watch logs with known latent structure."""

    preset: Literal["default", "small", "large"] = "default"
    """Size preset: default (the demo's, ~600 videos, ~1 minute), small (tests, seconds), large (benchmarks)"""
    raw_dir: Path = Path("data/raw")
    """Folder under which the corpus is written, as its `synth` subfolder"""
    seed: int = 0
    """Random seed: the same seed and sizes give byte-identical tables and identical decoded frames"""
    n_videos: int | None = None
    """Number of videos; unset uses the preset's"""
    n_users: int | None = None
    """Number of users; unset uses the preset's"""
    events_per_user: int | None = None
    """Mean number of watch events per user; unset uses the preset's"""
    n_topics: int | None = None
    """Number of latent topics (2 to 32); unset uses the preset's"""
    cold_fraction: float = 0.05
    """Share of videos kept out of training: watched only as users' last two (validation/test) events"""
    no_audio_fraction: float = 0.15
    """Share of videos written without an audio track"""
    workers: int = 0
    """Processes rendering videos; 0 uses every CPU core"""
    overwrite: bool = False
    """Regenerate even when the folder already holds a corpus made with the same settings"""

    def __post_init__(self) -> None:
        self.raw_dir = Path(self.raw_dir)
        for name in ("n_videos", "n_users", "events_per_user"):
            value = getattr(self, name)
            _require(value is None or value >= 4, f"{name} must be at least 4")
        _require(self.n_topics is None or 2 <= self.n_topics <= 32, "n_topics must lie in [2, 32]")
        _require(0 <= self.cold_fraction <= 0.5, "cold_fraction must lie in [0, 0.5]")
        _require(0 <= self.no_audio_fraction <= 1, "no_audio_fraction must lie in [0, 1]")
        _require(self.workers >= 0, "workers must be 0 (every core) or more")


@dataclass
class IngestConfig:
    """How `recsys ingest` turns a prepared dataset's videos and titles into the memory-mapped feature store."""

    dataset: Dataset = "synth"
    """Prepared dataset whose items are ingested"""
    processed_dir: Path = Path("data/processed")
    """Folder holding the prepared datasets; the store is written to <processed_dir>/<dataset>/features"""
    frames: int = 16
    """Frames sampled per video (T); shorter clips are padded and masked"""
    fps: float = 4.0
    """Sampling rate in frames per second; clips longer than frames/fps are sampled uniformly over their length"""
    frame_size: int = 64
    """Side of the square RGB frames (S): the shorter side is resized to S, then the centre is cropped"""
    max_pixels: int = 7680 * 4320
    """Videos whose frames hold more pixels than this (8K UHD by default) are rejected without decoding"""
    sample_rate: int = 16000
    """Audio is downmixed to mono and resampled to this rate (Hz) before the log-mel spectrogram"""
    n_mels: int = 64
    """Mel bands of the log-mel spectrogram"""
    n_fft: int = 400
    """FFT window of the spectrogram, in samples (400 = 25 ms at 16 kHz)"""
    hop_length: int = 160
    """Hop between spectrogram frames, in samples (160 = 10 ms at 16 kHz)"""
    audio_seconds: float = 4.0
    """Audio kept from the start of the track; shorter audio is padded and masked"""
    titles: bool = True
    """Embed titles with the offline MiniLM sentence model (zero rows when off or when a title is empty)"""
    title_cache: Path | None = None
    """Folder caching title embeddings by text hash; unset uses <processed_dir>/.cache/titles"""
    workers: int = 0
    """Processes decoding videos; 0 uses every CPU core"""
    overwrite: bool = False
    """Rebuild the store from scratch instead of resuming (a store made with other settings is always rebuilt)"""

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        self.processed_dir = Path(self.processed_dir)
        self.title_cache = None if self.title_cache is None else Path(self.title_cache)
        _require(self.frames >= 1, "frames must be at least 1")
        _require(self.fps > 0, "fps must be positive")
        _require(8 <= self.frame_size <= 1024, "frame_size must lie in [8, 1024]")
        _require(self.max_pixels >= self.frame_size**2, "max_pixels must be at least frame_size squared")
        _require(self.sample_rate >= 4000, "sample_rate must be at least 4000 Hz")
        _require(self.n_mels >= 1, "n_mels must be at least 1")
        _require(self.hop_length >= 1 and self.n_fft >= self.hop_length, "need 1 <= hop_length <= n_fft")
        _require(self.audio_seconds > 0, "audio_seconds must be positive")
        _require(self.workers >= 0, "workers must be 0 (every core) or more")


@dataclass
class RetrievalConfig:
    """How `recsys train retrieval` trains the two-tower retrieval model on a prepared dataset."""

    dataset: Dataset = "movielens-100k"
    """Prepared dataset to train on"""
    processed_dir: Path = Path("data/processed")
    """Folder holding the prepared datasets; the model is written to <processed_dir>/<dataset>/models/<run_id>"""
    content: Literal["auto", "fused", "title", "none"] = "auto"
    """Item content: auto (fused content embedding, else title embedding, else none), fused, title, none (ID-only)"""
    ids: bool = True
    """Learn user and item ID embeddings; --no-ids trains the content-only model"""
    encoder: Literal["gru", "attention"] = "gru"
    """Watch-history encoder of the user tower: GRU or causal self-attention"""
    dim: int = 64
    """Dimension of the ID embeddings and of the shared user/item space"""
    max_history: int = 50
    """Most recent watched items the user tower reads"""
    layers: int = 1
    """Layers of the history encoder"""
    heads: int = 2
    """Attention heads (encoder attention; must divide dim)"""
    dropout: float = 0.1
    """Dropout inside the towers"""
    user_id_dropout: float = 0.2
    """Probability of hiding a user's ID embedding in training, so users unseen in training get recommendations"""
    item_id_dropout: float = 0.2
    """Probability of hiding an item's ID embedding in training, so cold-start videos are embedded from content"""
    taste_clusters: int = 20
    """Clusters of watched videos whose share in a user's history scores new videos (0: content score only)"""
    fresh_views: bool = True
    """Score videos by their validation-period views too (--no-fresh-views: training views only)"""
    content_only_weight: float = 0.5
    """Weight of a second loss scoring every target from its content alone, as new videos are (0: off)"""
    temperature: float = 0.1
    """Softmax temperature of the scores (cosine similarities)"""
    logq_correction: bool = True
    """Subtract log sampling probability from in-batch logits, so popular items are not over-penalised"""
    uniform_negatives: int = 0
    """Extra negatives per batch drawn uniformly from the catalogue (0: in-batch negatives only)"""
    learning_rate: float = 5e-4
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay of the dense weights"""
    batch_size: int = 1024
    """Training targets per batch, about (the in-batch negatives of each other; fewer on small datasets)"""
    max_epochs: int = 20
    """Most passes over the training interactions"""
    patience: int = 3
    """Stop after this many epochs without a better validation NDCG@10"""
    validation_users: int = 10_000
    """Users in each half of the validation split (checkpoints; coefficients): a fixed seeded sample, 0: all"""
    seed: int = 0
    """Random seed of initialisation, shuffling and dropout"""
    resume: str | None = field(default=None, metadata={"const": RESUME_LATEST})
    """Continue a killed training run from its last checkpoint: its run ID, or alone the newest unfinished one"""
    resume_or_start: bool = False
    """Like --resume, but train the run again from the start when it has no checkpoint, or a new one if none"""
    threads: int = 1
    """CPU threads for torch (0: torch's default); the towers' operations are small: more threads mostly wait"""
    progress_bar: bool = True
    """Show a progress bar per epoch"""
    world_size: int = 1
    """Processes for TorchRec model-parallel training (tables sharded by DistributedModelParallel); 1: Lightning"""

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        self.processed_dir = Path(self.processed_dir)
        _require(self.ids or self.content != "none", "a model with --no-ids needs content (content must not be none)")
        _require(self.dim >= 2, "dim must be at least 2")
        _require(self.max_history >= 1, "max_history must be at least 1")
        _require(self.layers >= 1, "layers must be at least 1")
        _require(self.heads >= 1 and self.dim % self.heads == 0, "heads must be at least 1 and divide dim")
        for name in ("dropout", "user_id_dropout", "item_id_dropout"):
            _require(0 <= getattr(self, name) < 1, f"{name} must lie in [0, 1)")
        _require(self.temperature > 0, "temperature must be positive")
        _require(self.content_only_weight >= 0, "content_only_weight must be 0 or more")
        _require(self.taste_clusters == 0 or self.taste_clusters >= 2, "taste_clusters must be 0 (off) or at least 2")
        _require(self.uniform_negatives >= 0, "uniform_negatives must be 0 or more")
        _require(self.learning_rate > 0, "learning_rate must be positive")
        _require(self.weight_decay >= 0, "weight_decay must be 0 or more")
        _require(self.batch_size >= 2, "batch_size must be at least 2 (in-batch negatives need other rows)")
        _require(self.max_epochs >= 1, "max_epochs must be at least 1")
        _require(self.patience >= 1, "patience must be at least 1")
        _require(self.validation_users >= 0, "validation_users must be 0 (every user) or more")
        _require(self.threads >= 0, "threads must be 0 (torch's default) or more")
        _require(self.world_size >= 1, "world_size must be at least 1")
        _require(self.resume is None or self.resume == RESUME_LATEST or bool(RUN_ID.match(self.resume)),
                 f"resume: {self.resume!r} is neither a run ID (32 hex digits) nor {RESUME_LATEST!r}")
        _require(self.world_size == 1 or (self.resume is None and not self.resume_or_start),
                 "--resume continues single-process (Lightning) runs only")


@dataclass
class ExportConfig:
    """Which trained model `recsys export` turns into a registered MLflow ranking model."""

    dataset: Dataset
    """Dataset whose trained model is exported (registered as recsys-<dataset>)"""
    processed_dir: Path = Path("data/processed")
    """Folder holding the prepared datasets and their trained models"""
    run_id: str | None = None
    """Training run of the model to export; unset: the newest trained model of the dataset"""
    raw_dir: Path = Path("data/raw")
    """Folder of the raw datasets: the synthetic corpus' latent topics colour the logged item-embedding map"""
    max_k: int = 1000
    """Largest k a request to the exported model may ask for"""
    index: Literal["auto", "exact", "pq", "hnsw", "ivf"] = "auto"
    """Item index of the exported model (as `recsys recommend --index`): auto picks FAISS pq for large catalogues"""

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        self.processed_dir, self.raw_dir = Path(self.processed_dir), Path(self.raw_dir)
        _require(self.max_k >= 1, "max_k must be at least 1")


@dataclass
class ServeConfig:
    """What `recsys serve` serves over REST, and where."""

    model: str | None = None
    """Model URI to serve (models:/..., runs:/... or a folder); unset: models:/recsys-<dataset>@champion"""
    dataset: Dataset = "synth"
    """Dataset whose champion is served when --model is unset"""
    host: str = "127.0.0.1"
    """Interface to listen on; the default keeps the server on this machine (loopback)"""
    port: int = 5001
    """TCP port to listen on"""
    workers: int = 1
    """Server worker processes (each loads the model)"""
    max_request_rows: int = 1000
    """Most rows (users) one request may hold; more are answered 413"""
    max_request_bytes: int = 1 << 20
    """Largest request body in bytes; a larger one is answered 413 before it is read"""
    request_timeout: int = 60
    """Seconds a request may take; later it is answered 504 and its work stops"""
    follow_every: int = 30
    """Seconds between looks at the registry: when the served alias (champion, or the one --model names)
    moves to another version, as `catalogue add` and `views add` move it, the server loads that version
    and answers from it without a restart; 0: keep the version loaded at start"""

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        _require(1 <= self.port <= 65535, f"port must be between 1 and 65535, got {self.port}")
        _require(self.workers >= 1, "workers must be at least 1")
        _require(self.max_request_rows >= 1, "max_request_rows must be at least 1")
        _require(self.max_request_bytes >= 1, "max_request_bytes must be at least 1")
        _require(self.request_timeout >= 1, "request_timeout must be at least 1 second")
        _require(self.follow_every >= 0, f"follow_every must be 0 (never) or more seconds, got {self.follow_every}")


@dataclass
class EvaluateConfig:
    """What `recsys evaluate` ranks: trained two-tower runs and baselines, on one split of one dataset."""

    dataset: Dataset = "movielens-100k"
    """Prepared dataset to evaluate on"""
    processed_dir: Path = Path("data/processed")
    """Folder holding the prepared datasets and their trained models"""
    raw_dir: Path = Path("data/raw")
    """Folder holding the raw datasets (the synthetic corpus' latent truth, for the oracle)"""
    run_ids: tuple[str, ...] = ()
    """Trained retrieval runs to evaluate; none given: the newest trained model, if there is one"""
    baselines: tuple[Literal["popularity", "itemknn", "mf", "ease", "transitions"], ...] = (
        "popularity", "itemknn", "mf", "ease", "transitions")
    """Baselines ranked by the same protocol (mf: implicit ALS; ease: Steck's closed-form item model;
    transitions: next-video counts from the last videos); grids below are picked on validation"""
    oracle: bool = True
    """On the synthetic corpus, also rank by the latent truth (the ceiling) and report ratios to it"""
    split: Literal["valid", "test"] = "test"
    """Held-out interactions to rank: test (history = train + valid) or valid (history = train)"""
    ks: tuple[int, ...] = (10, 20, 50)
    """Cut-offs K of HR@K, NDCG@K, MRR@K and coverage@K"""
    max_cases: int | None = None
    """Evaluate a seeded random sample of this many held-out interactions; unset: all of them"""
    knn_neighbours: tuple[int, ...] = (20, 50, 100, 200)
    """item-kNN: most similar items kept per item, the count best on validation is used"""
    mf_factors: int = 64
    """MF: latent dimension"""
    mf_reg: tuple[float, ...] = (1.0, 10.0, 100.0)
    """MF: L2 regularisation, the value best on validation (with mf_alpha) is used"""
    mf_alpha: tuple[float, ...] = (1.0, 3.0, 10.0)
    """MF: confidence of an observed interaction (weight 1 + alpha against 1 for the rest), picked on validation"""
    mf_iterations: int = 10
    """MF: alternating least-squares sweeps"""
    ease_lambdas: tuple[float, ...] = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
    """EASE: L2 regularisation lambda, the value best on validation is used"""
    ease_max_items: int = 20_000
    """EASE: largest catalogue it is fitted on (a dense items x items float32 inverse); larger ones skip it"""
    transition_windows: tuple[int, ...] = (1, 3, 5, 10, 20)
    """transitions: how many of the last videos are read, the count best on validation (with the decay) is used"""
    transition_decays: tuple[float, ...] = (0.5, 0.75, 1.0)
    """transitions: weight of each older video relative to the next newer one (the newest weighs 1), picked on
    validation"""
    batch_size: int = 256
    """Users scored at once (memory: batch_size x catalogue size floats)"""
    seed: int = 0
    """Seed of MF's initial factors and of the case sample"""

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        self.processed_dir, self.raw_dir = Path(self.processed_dir), Path(self.raw_dir)
        self.run_ids, self.baselines, self.ks = tuple(self.run_ids), tuple(self.baselines), tuple(self.ks)
        _require(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "ks must be one or more cut-offs of at least 1")
        _require(self.max_cases is None or self.max_cases >= 1, "max_cases must be at least 1 when given")
        self.knn_neighbours, self.mf_reg, self.mf_alpha = (
            tuple(self.knn_neighbours), tuple(self.mf_reg), tuple(self.mf_alpha))
        self.ease_lambdas, self.transition_windows = tuple(self.ease_lambdas), tuple(self.transition_windows)
        self.transition_decays = tuple(self.transition_decays)
        _require(len(self.knn_neighbours) > 0 and all(k >= 1 for k in self.knn_neighbours),
                 "knn_neighbours must be one or more counts of at least 1")
        _require(self.mf_factors >= 1, "mf_factors must be at least 1")
        _require(len(self.mf_reg) > 0 and all(r > 0 for r in self.mf_reg), "mf_reg must be one or more positive values")
        _require(len(self.mf_alpha) > 0 and all(a >= 0 for a in self.mf_alpha),
                 "mf_alpha must be one or more values of 0 or more")
        _require(len(self.ease_lambdas) > 0 and all(lam > 0 for lam in self.ease_lambdas),
                 "ease_lambdas must be one or more positive values")
        _require(self.ease_max_items >= 1, "ease_max_items must be at least 1")
        _require(len(self.transition_windows) > 0 and all(w >= 1 for w in self.transition_windows),
                 "transition_windows must be one or more counts of at least 1")
        _require(len(self.transition_decays) > 0 and all(0 < d <= 1 for d in self.transition_decays),
                 "transition_decays must be one or more values in (0, 1]")
        _require(self.mf_iterations >= 1, "mf_iterations must be at least 1")
        _require(self.batch_size >= 1, "batch_size must be at least 1")


@dataclass
class RecommendConfig(ServedVersionOptions):
    """For whom `recsys recommend` ranks videos, from which model, how many, and in which format."""

    user_id: str | None = None
    """External user ID; an ID unknown to the model falls back to the popularity (or --history) ranking"""
    k: int = field(default=10, metadata={"aliases": ("-k",)})
    """Number of videos to recommend"""
    exclude_seen: bool = field(default=True, metadata={"negative_flag": "--include-seen"})
    """Leave out videos the user has already watched (--include-seen keeps them)"""
    history: tuple[str, ...] = ()
    """Video IDs just watched, oldest first, comma-separated (v1,v2,...): recommend from them too"""
    dataset: Dataset = "movielens-100k"
    """Dataset whose registered model (recsys-<dataset>) ranks the videos"""
    processed_dir: Path = Path("data/processed")
    """Folder holding the prepared datasets (registered models are downloaded into <dataset>/served/)"""
    run_id: str | None = None
    """Use a trained model folder (a training run ID) instead of the registry, e.g. one never exported"""
    index: Literal["auto", "exact", "pq", "hnsw", "ivf"] | None = None
    """Item index; unset: the one the model was exported with (with --run-id: auto, pq for large catalogues)"""
    explain: bool = False
    """Say why each video is recommended: nearest watched video, shares of its score, ranked from content"""
    format: Literal["table", "json", "csv"] = field(default="table", metadata={"aliases": ("--output",)})
    """Print an aligned table, one JSON list of rows, or CSV"""
    all_users: bool = False
    """Rank for every user (new users with added views too) and write the top-k of each into --out (Parquet), in
    user batches"""
    out: Path | None = None
    """Parquet file that --all-users writes (user_id, rank, item_id, title, score)"""
    batch_size: int = 4096
    """Users ranked together by --all-users"""

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        self.processed_dir = Path(self.processed_dir)
        # "--history a,b c" and ("a", "b", "c") mean the same: split every entry on commas.
        self.history = tuple(v.strip() for entry in self.history for v in str(entry).split(",") if v.strip())
        _require(self.k >= 1, f"k must be at least 1, got {self.k}")
        _require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        if self.all_users:
            _require(self.out is not None, "--all-users writes a Parquet file: give it with --out FILE")
            _require(self.user_id is None and not self.history,
                     "--all-users ranks every user: no --user-id or --history")
            _require(not self.explain, "--explain is for one user's ranking, not --all-users")
            self.out = Path(self.out)
        else:
            _require(self.out is None, "--out is where --all-users writes; for one user, the ranking goes to stdout")
            _require(self.user_id is not None or bool(self.history), "give a --user-id, a --history, or both")


@dataclass
class SearchConfig(ServedVersionOptions):
    """What `recsys search` looks for, in which dataset, and for whom."""

    dataset: Dataset = "synth"
    """Prepared dataset whose videos are searched (its content model must be trained)"""
    query: str = ""
    """Words describing what the videos show or sound like, e.g. 'cat playing'"""
    k: int = field(default=10, metadata={"aliases": ("-k",)})
    """Number of videos to list"""
    user_id: str | None = None
    """Re-rank the best matches by this user's taste (the two-tower score); unknown users get plain matches"""
    rerank_depth: int | None = None
    """How many of the best matches a user's taste re-ranks; unset: 3k"""
    lexical_weight: float | None = None
    """Weight of the BM25 title match in the blend (0: content only, 1: titles only); unset: the fitted one"""
    processed_dir: Path = Path("data/processed")
    """Folder holding the prepared datasets and their trained models"""
    run_id: str | None = None
    """With --user-id: use a trained model folder (a training run ID) instead of the registry"""
    output: Literal["table", "json"] = "table"
    """Print an aligned table, or one JSON list of rows"""

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        self.processed_dir = Path(self.processed_dir)
        _require(self.k >= 1, f"k must be at least 1, got {self.k}")
        _require(self.rerank_depth is None or self.rerank_depth >= 1, "rerank_depth must be at least 1 when given")
        _require(self.lexical_weight is None or 0.0 <= self.lexical_weight <= 1.0,
                 f"lexical_weight must be between 0 and 1, got {self.lexical_weight}")


@dataclass
class SimilarConfig(ServedVersionOptions):
    """Which video `recsys similar` finds neighbours of in the item embedding space."""

    item_id: str | None = None
    """External video ID whose neighbours are listed (cold-start videos included); required"""
    k: int = field(default=10, metadata={"aliases": ("-k",)})
    """Number of similar videos to list"""
    dataset: Dataset = "movielens-100k"
    """Dataset whose registered model (recsys-<dataset>) embeds the videos"""
    processed_dir: Path = Path("data/processed")
    """Folder holding the prepared datasets (registered models are downloaded into <dataset>/served/)"""
    run_id: str | None = None
    """Use a trained model folder (a training run ID) instead of the registry, e.g. one never exported"""
    index: Literal["auto", "exact", "pq", "hnsw", "ivf"] | None = None
    """Item index; unset: the one the model was exported with (with --run-id: auto, pq for large catalogues)"""
    format: Literal["table", "json", "csv"] = field(default="table", metadata={"aliases": ("--output",)})
    """Print an aligned table, one JSON list of rows, or CSV"""

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        self.processed_dir = Path(self.processed_dir)
        _require(self.item_id is not None, "give the video whose neighbours to list with --item-id")
        _require(self.k >= 1, f"k must be at least 1, got {self.k}")


@dataclass
class DemoConfig:
    """How `recsys demo` runs the whole pipeline on the synthetic corpus."""

    preset: Literal["default", "small"] = "default"
    """Size of the synthetic corpus: default (~600 videos, the full demo) or small (a check in a few minutes)"""
    raw_dir: Path = Path("data/raw")
    """Folder for the raw corpus (its synth subfolder)"""
    processed_dir: Path = Path("data/processed")
    """Folder for the prepared data, feature store and trained models"""
    seed: int = 0
    """Seed of the corpus and of every training step"""
    workers: int = 0
    """Processes rendering and ingesting videos; 0 uses every core"""
    user_id: str | None = None
    """User whose recommendations are shown at the end; unset: the first user"""
    k: int = field(default=10, metadata={"aliases": ("-k",)})
    """Number of recommendations shown"""
    content_epochs: int = 5
    """Most epochs of content training (the demo's time budget; `recsys train content` allows more)"""
    retrieval_epochs: int = 20
    """Most epochs of two-tower training (the demo's time budget; `recsys train retrieval` allows more)"""
    pipeline: str | None = None
    """Pipeline ID tagged on every run of the demo (recsys.pipeline); unset: demo-<time>-<random>"""

    def __post_init__(self) -> None:
        self.raw_dir, self.processed_dir = Path(self.raw_dir), Path(self.processed_dir)
        _require(self.workers >= 0, "workers must be 0 (every core) or more")
        _require(self.k >= 1, f"k must be at least 1, got {self.k}")
        _require(self.content_epochs >= 1, "content_epochs must be at least 1")
        _require(self.retrieval_epochs >= 1, "retrieval_epochs must be at least 1")


@dataclass
class ContentConfig:
    """How `recsys train content` learns one embedding per video from its frames, motion, sound and title."""

    dataset: Dataset = "synth"
    """Dataset whose feature store (written by `recsys ingest`) is read; embeddings are written back into it"""
    processed_dir: Path = Path("data/processed")
    """Folder holding the prepared datasets and their feature stores (<processed_dir>/<dataset>/features)"""
    backbone: Literal["small", "mobilenet_v3_small", "resnet18"] = "small"
    """Per-frame CNN: small (fast on a CPU), or torchvision's mobilenet_v3_small or resnet18"""
    backbone_weights: str | None = None
    """Backbone weights: a local state-dict file or a torchvision weights name like DEFAULT (downloads); unset: none"""
    freeze_backbone: bool = False
    """Keep the backbone's weights fixed (sensible with pretrained weights)"""
    temporal: Literal["gru", "mean"] = "gru"
    """Motion encoder over the frame sequence: gru (sees the order) or mean (order-blind pooling, the ablation)"""
    bidirectional: bool = False
    """Run the GRU over the frames in both directions"""
    fusion: Literal["gated", "attention"] = "gated"
    """Fusion of the modality embeddings: per-dimension gates, or attention from a learned query"""
    embedding_dim: int = 64
    """Width of every modality embedding and of the fused content embedding"""
    hidden_dim: int = 128
    """Width of the encoders' hidden layers"""
    modality_dropout: float = 0.2
    """Probability of hiding each modality from the fusion during training, so missing ones are handled"""
    temperature: float = 0.1
    """Initial InfoNCE temperature (learned during training)"""
    motion_weight: float = 1.0
    """Weight of the arrow-of-time loss: a crop of a clip must match another crop of it, not that crop reversed"""
    augment: bool = True
    """Train on random stretches of each clip and sound and with title dimensions dropped (less memorising)"""
    fusion_weight: float = 0.5
    """Weight of the loss making the fused embedding of the other modalities find each held-out one"""
    fused_motion_weight: float = 2.0
    """Weight of the arrow-of-time loss asked of the fused embedding, so fusing keeps which way things move"""
    distill_weight: float = 0.0
    """Weight of the loss aligning fused embeddings with a trained two-tower model's item embeddings; 0: off"""
    distill_run: str | None = None
    """Two-tower run to distil from (see `recsys train retrieval`); unset: the dataset's latest"""
    batch_size: int = 32
    """Items per batch (each other's negatives in the contrastive losses)"""
    max_epochs: int = 12
    """Most passes over the training items"""
    patience: int = 3
    """Stop after this many epochs without a lower validation loss"""
    embed_from: Literal["last", "best"] = "last"
    """Checkpoint that embeds the items: the last epoch, or the one with the lowest validation loss"""
    learning_rate: float = 2e-3
    """AdamW learning rate (cosine-annealed over max_epochs)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    val_fraction: float = 0.15
    """Share of the ingested items held out for the validation loss and cross-modal retrieval accuracy"""
    seed: int = 0
    """Random seed of initialisation, the train/validation split, shuffling, crops and dropout"""
    workers: int = 0
    """Data loader worker processes; 0 reads batches in the training process"""
    threads: int = 0
    """CPU threads for torch; 0 keeps torch's default"""
    checkpoint_dir: Path = Path("checkpoints")
    """Folder for training checkpoints (<checkpoint_dir>/<dataset>/content/<run_id>)"""
    progress_bar: bool = True
    """Show a progress bar per epoch"""

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        self.processed_dir, self.checkpoint_dir = Path(self.processed_dir), Path(self.checkpoint_dir)
        _require(self.embedding_dim >= 2, "embedding_dim must be at least 2")
        _require(self.hidden_dim >= 1, "hidden_dim must be at least 1")
        _require(0 <= self.modality_dropout < 1, "modality_dropout must lie in [0, 1)")
        _require(self.temperature > 0, "temperature must be positive")
        for name in ("motion_weight", "fusion_weight", "fused_motion_weight", "distill_weight"):
            _require(getattr(self, name) >= 0, f"{name} must be 0 or more")
        _require(self.batch_size >= 2, "batch_size must be at least 2 (in-batch negatives need other items)")
        _require(self.max_epochs >= 1, "max_epochs must be at least 1")
        _require(self.patience >= 1, "patience must be at least 1")
        _require(self.learning_rate > 0, "learning_rate must be positive")
        _require(self.weight_decay >= 0, "weight_decay must be 0 or more")
        _require(0 < self.val_fraction < 1, "val_fraction must lie in (0, 1)")
        _require(self.workers >= 0, "workers must be 0 or more")
        _require(self.threads >= 0, "threads must be 0 (torch's default) or more")
        _require(self.distill_run is None or self.distill_weight > 0,
                 "distill_run is only used with distill_weight > 0")


# --------------------------------------------------------------------------------------------
# Command-line parsers, saved configs


def config_parser(cls: type, positional: Sequence[str] = (), **parser_args: Any) -> ArgumentParser:
    """A jsonargparse parser with one option per field of the config dataclass `cls`.

    jsonargparse checks every value against the field's type hint (Literal choices included),
    shows the field's docstring with its type and default as help, and reads `--config FILE`
    (JSON or YAML; options after it override it) and `--print_config`. What it does not spell
    natively is adapted here, per field: `--kebab-case` names (or metadata `flag`, plus
    `aliases`), booleans as a pair of switches (`--x` / `--no-x`, or metadata `negative_flag`)
    instead of `--x true`, tuples as several values (`--ks 10 20`) instead of `--ks [10,20]`,
    the fields named in `positional` as positional arguments too (one without a default only as a
    positional, jsonargparse's own way), and a field with metadata `const` as an option whose value
    may be left out (then it is the const).
    """
    parser = ArgumentParser(**parser_args)
    parser.add_argument("--config", action=ActionConfigFile, help="Read options from a JSON/YAML file; "
                        "options after it override it (--print_config writes one)")
    hints, docs = typing.get_type_hints(cls), _field_docs(cls)
    for f in dataclasses.fields(cls):
        hint, doc = hints[f.name], docs.get(f.name, "")
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if f.default is not dataclasses.MISSING:
            default: dict[str, Any] = {"default": f.default}
        elif f.default_factory is not dataclasses.MISSING:
            default = {"default": f.default_factory()}
        elif f.name in positional:
            parser.add_argument(f.name, type=hint, metavar=f.name.upper(), help=doc)
            continue
        else:
            default = {"required": True}
        if hint is bool:
            negative = f.metadata.get("negative_flag", "--no-" + flag.removeprefix("--"))
            parser.add_argument(flag, dest=f.name, action=_switches(flag, negative), help=doc, **default)
        elif typing.get_origin(hint) is tuple:
            # tuple[X, ...]: each value is checked as an X, and argparse collects them in a list
            (item, _) = typing.get_args(hint)
            if "default" in default:
                default["default"] = list(default["default"])
            parser.add_argument(flag, dest=f.name, type=item, nargs="+", help=doc, **default)
        else:
            # metadata `const`: the option alone means that value (`--resume`), with a value that value
            alone = {"nargs": "?", "const": f.metadata["const"]} if "const" in f.metadata else {}
            parser.add_argument(flag, *f.metadata.get("aliases", ()), dest=f.name, type=hint, help=doc, **default,
                                **alone)
        if f.name in positional:
            # Also a positional (`recsys data prepare NAME`) without a default of its own: left out, it
            # would put the default over a --config file's value (argparse sets it when none is given).
            parser.add_argument(f.name, type=hint, nargs="?", default=SUPPRESS, metavar=f.name.upper(),
                                help=f"the same as {flag}")
    return parser


@cache
def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field, on one line, fields of base classes included (read from the
    source: the slow part of a parser)."""
    return {p.arg_name: " ".join((p.description or "").split())
            for base in reversed(cls.__mro__[:-1]) for p in docstring_parser.parse_from_object(base).params}


def _switches(flag: str, negative: str) -> ActionYesNo:
    """jsonargparse's pair of boolean switches, for any two flags that share a suffix:
    --ids / --no-ids (prefixes '' and 'no-'), --exclude-seen / --include-seen ('ex' and 'in')."""
    yes, no = flag.removeprefix("--"), negative.removeprefix("--")
    shared = len(os.path.commonprefix([yes[::-1], no[::-1]]))
    return ActionYesNo(yes_prefix=yes[: len(yes) - shared], no_prefix=no[: len(no) - shared])


def config_from(cls: type[C], namespace: Namespace) -> C:
    """The config that a `config_parser(cls)` parse resolved; its `__post_init__` validates it."""
    hints = typing.get_type_hints(cls)
    values = {f.name: namespace[f.name] for f in dataclasses.fields(cls) if f.name in namespace}
    # Several values given on the command line arrive as a list.
    return cls(**{k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in values.items()})


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (paths as strings)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def save_config(config: Any, path: Path) -> Path:
    """Write a config as JSON or YAML (by the file's suffix), readable by `--config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_dict(config)
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2) + "\n")
    return path


__all__ = [
    "BUILTIN_DATASETS",
    "check_dataset_name",
    "ConfigError",
    "FetchConfig",
    "PrepareConfig",
    "config_from",
    "config_parser",
    "save_config",
    "to_dict",
]
