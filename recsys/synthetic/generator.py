"""`recsys data synth`: a synthetic multimodal video corpus whose latent structure is known.

K latent topics. Topics come in *groups*: a group fixes a look (colour + shape), a sound (tone
band + rhythm) and title words. The first K // 4 groups hold two topics each that differ ONLY in
the direction of motion (same axis, opposite ways), so telling them apart needs the order of the
frames: mean-pooled frames cannot, a temporal model can. Every other group holds one topic with
its own motion. Each modality is partial and noisy on purpose: a video's colour, shape, motion
and sound each show its topic only with some probability, some videos have no audio track, and
titles mix topic words with filler, some empty, some misleading.

Users have topic tastes that drift over time, plus a popularity bias; each watch event is drawn
from taste × popularity (see `recsys.synthetic.truth`). Cold-start videos are watched only as
users' last two events, so a time-ordered leave-one-out split puts them only in validation and
test, each by enough users to survive the default 5-core filter.

Output folder (`<raw_dir>/synth/`):

- `items.parquet`: item_id, title, video_path (relative to the folder), duration (s)
- `events.parquet`: user_id, item_id, timestamp (unix seconds, strictly increasing per user)
- `videos/<item_id>.mp4`: H.264 video + AAC mono audio (some without audio)
- `truth/`: the latent truth and the oracle's inputs (see `recsys.synthetic.truth`)
- `synth.json`: settings, counts, generator version
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import ConfigError, SynthConfig, to_dict
from recsys.environment import environment
from recsys.files import read_json, write_json
from recsys.synthetic.render import SHAPES, VideoSpec, render_videos
from recsys.synthetic.truth import SynthTruth

GENERATOR_VERSION = 1
"""Bumped whenever the same settings would produce different files."""

FOLDER = "synth"
START_TIME = 1_704_067_200  # 2024-01-01 00:00 UTC
DAY = 86_400

WORDS = (
    ("ocean", "waves", "surfing", "beach"),
    ("mountain", "hiking", "summit", "trail"),
    ("cooking", "recipe", "kitchen", "baking"),
    ("football", "goal", "match", "stadium"),
    ("guitar", "concert", "melody", "chords"),
    ("cat", "kitten", "purring", "whiskers"),
    ("racing", "engine", "supercar", "lap"),
    ("rocket", "galaxy", "astronaut", "orbit"),
    ("dance", "choreography", "ballet", "salsa"),
    ("gaming", "speedrun", "boss fight", "console"),
    ("garden", "flowers", "seedlings", "compost"),
    ("chess", "checkmate", "gambit", "grandmaster"),
    ("chemistry", "experiment", "laboratory", "molecule"),
    ("travel", "airport", "passport", "backpacking"),
    ("workout", "fitness", "squats", "cardio"),
    ("painting", "watercolor", "canvas", "brushstroke"),
    ("puppy", "dog", "fetch", "leash"),
    ("stocks", "investing", "budget", "savings"),
    ("storm", "thunder", "tornado", "rainfall"),
    ("history", "ancient", "empire", "pharaoh"),
    ("programming", "python", "debugging", "algorithm"),
    ("fashion", "runway", "outfit", "sneakers"),
    ("birds", "parrot", "eagle", "birdwatching"),
    ("train", "railway", "locomotive", "subway"),
)
"""Title words per topic group (group g uses WORDS[g])."""

FILLER = ("video", "clip", "today", "amazing", "my", "new", "best", "moments", "part 2", "vlog",
          "highlights", "compilation", "watch this", "daily", "short", "epic", "first time", "live")

RHYTHMS_HZ = (1.5, 3.0, 5.0)


@dataclass(frozen=True)
class SynthSpec:
    """Every number the generator uses: a preset with the config's overrides applied."""

    preset: str
    seed: int
    n_topics: int
    n_videos: int
    n_users: int
    events_per_user: int
    cold_fraction: float
    no_audio_fraction: float
    frame_size: int
    fps_range: tuple[int, int]
    duration_range: tuple[float, float]
    sample_rate: int
    beta: float = 2.0
    epsilon: float = 0.01
    cold_boost: float = 3.0
    min_cold_users: int = 7
    """Users per cold video at least: the default 5-core keeps it with slack"""
    p_colour: float = 0.8
    """Probability that a video's colour shows its topic's (else a random hue)"""
    p_shape: float = 0.8
    p_motion: float = 0.85
    p_band: float = 0.75
    p_rhythm: float = 0.75
    title_kinds: tuple[tuple[str, float], ...] = (("topic", 0.6), ("misleading", 0.12), ("empty", 0.15),
                                                  ("filler", 0.13))
    version: int = GENERATOR_VERSION

    @property
    def n_pairs(self) -> int:
        """Groups whose two topics differ only in motion."""
        return self.n_topics // 4

    @property
    def n_groups(self) -> int:
        return self.n_topics - self.n_pairs

    @property
    def n_cold(self) -> int:
        return 0 if self.cold_fraction == 0 else max(1, round(self.cold_fraction * self.n_videos))


PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(n_topics=4, n_videos=32, n_users=48, events_per_user=12, frame_size=64, fps_range=(8, 12),
                  duration_range=(1.0, 1.6)),
    "default": dict(n_topics=12, n_videos=600, n_users=1000, events_per_user=50, frame_size=64,
                    fps_range=(8, 12), duration_range=(2.0, 4.0)),
    "large": dict(n_topics=24, n_videos=3000, n_users=5000, events_per_user=60, frame_size=64,
                  fps_range=(8, 12), duration_range=(2.0, 4.0)),
}


def resolve(config: SynthConfig) -> SynthSpec:
    """The generator's settings: the preset's, overridden by every size the config sets."""
    preset = dict(PRESETS[config.preset])
    for name in ("n_topics", "n_videos", "n_users", "events_per_user"):
        if getattr(config, name) is not None:
            preset[name] = getattr(config, name)
    spec = SynthSpec(preset=config.preset, seed=config.seed, cold_fraction=config.cold_fraction,
                     no_audio_fraction=config.no_audio_fraction, sample_rate=16_000, **preset)
    n_warm = spec.n_videos - spec.n_cold
    if spec.events_per_user > n_warm // 2:
        raise ConfigError(
            f"events_per_user={spec.events_per_user} is too many for {n_warm} videos outside the cold set: "
            f"use at most {n_warm // 2} or more videos"
        )
    if spec.n_cold * spec.min_cold_users > spec.n_users:
        raise ConfigError(
            f"{spec.n_cold} cold videos need {spec.min_cold_users} users each but there are {spec.n_users} "
            "users: lower cold_fraction or add users"
        )
    if spec.n_groups > len(WORDS):
        raise ConfigError(f"n_topics={spec.n_topics} needs more title word groups than the {len(WORDS)} known")
    return spec


# --------------------------------------------------------------------------------------------
# Topics and items


def make_topics(spec: SynthSpec, rng: np.random.Generator) -> list[dict[str, Any]]:
    """The topic table: each topic's group (look, sound, words) and motion."""
    bands = np.geomspace(220.0, 4000.0, num=math.ceil(spec.n_groups / len(RHYTHMS_HZ)))
    groups = []
    for g in range(spec.n_groups):
        groups.append({
            "hue": g / spec.n_groups,
            "shape": SHAPES[g % len(SHAPES)],
            "band_hz": float(bands[g // len(RHYTHMS_HZ)]),
            "rhythm_hz": RHYTHMS_HZ[g % len(RHYTHMS_HZ)],
            "words": list(WORDS[g]),
        })
    topics: list[dict[str, Any]] = []
    for g in range(spec.n_groups):
        speed = float(rng.choice([14.0, 22.0]))  # pixels per second at 64 px; scaled with frame size
        angle = float(rng.choice(np.arange(0, 360, 45)))
        # Paired groups: the second topic moves the opposite way along the same axis.
        for sign in (0.0, 180.0) if g < spec.n_pairs else (0.0,):
            topics.append({"topic": len(topics), "group": g, "pair": g < spec.n_pairs,
                           "direction_deg": (angle + sign) % 360, "speed_px_s": speed, **groups[g]})
    return topics


def make_title(kind: str, words: list[str], other_words: list[str], rng: np.random.Generator) -> str:
    """A title of the given kind: topic words among filler, misleading words, filler only, or empty."""
    if kind == "empty":
        return ""
    n_filler = int(rng.integers(1, 4))
    parts = list(rng.choice(FILLER, size=n_filler, replace=False))
    if kind in ("topic", "misleading"):
        source = words if kind == "topic" else other_words
        parts += list(rng.choice(source, size=int(rng.integers(1, 3)), replace=False))
    rng.shuffle(parts)
    title = " ".join(parts)
    if rng.random() < 0.3:
        title += f" #{int(rng.integers(1, 100))}"
    return title[0].upper() + title[1:]


def make_items(spec: SynthSpec, topics: list[dict[str, Any]], rng: np.random.Generator
               ) -> tuple[pl.DataFrame, list[VideoSpec]]:
    """Per-item facts (truth columns + title + duration) and the specs to render their videos."""
    width = len(str(spec.n_videos))
    scale = spec.frame_size / 64
    kinds, probabilities = zip(*spec.title_kinds, strict=True)
    rows: list[dict[str, Any]] = []
    videos: list[VideoSpec] = []
    for index in range(spec.n_videos):
        item_id = f"v{index + 1:0{width}d}"
        topic = topics[int(rng.integers(spec.n_topics))]
        colour_ok, shape_ok, motion_ok, band_ok, rhythm_ok = rng.random(5) < (
            spec.p_colour, spec.p_shape, spec.p_motion, spec.p_band, spec.p_rhythm)
        hue = topic["hue"] + rng.normal(0, 0.015) if colour_ok else rng.random()
        shape = topic["shape"] if shape_ok else str(rng.choice(SHAPES))
        direction = topic["direction_deg"] + rng.normal(0, 8) if motion_ok else rng.uniform(0, 360)
        speed = topic["speed_px_s"] * rng.uniform(0.85, 1.15) * scale
        band = topic["band_hz"] if band_ok else float(rng.choice([t["band_hz"] for t in topics]))
        rhythm = topic["rhythm_hz"] if rhythm_ok else float(rng.choice(RHYTHMS_HZ))
        has_audio = bool(rng.random() >= spec.no_audio_fraction)
        fps = int(rng.integers(spec.fps_range[0], spec.fps_range[1] + 1))
        n_frames = max(1, round(rng.uniform(*spec.duration_range) * fps))
        kind = str(rng.choice(kinds, p=probabilities))
        other_group = (topic["group"] + int(rng.integers(1, spec.n_groups))) % spec.n_groups
        title = make_title(kind, topic["words"], list(WORDS[other_group]), rng)
        video = VideoSpec(
            file=f"videos/{item_id}.mp4",
            seed=int(rng.integers(2**31)),
            size=spec.frame_size,
            fps=fps,
            n_frames=n_frames,
            hue=float(hue % 1.0),
            shape=shape,
            radius=float(rng.uniform(9, 13) * scale),
            start=(float(rng.uniform(0, spec.frame_size)), float(rng.uniform(0, spec.frame_size))),
            velocity=(float(speed * np.cos(np.radians(direction))), float(speed * np.sin(np.radians(direction)))),
            has_audio=has_audio,
            sample_rate=spec.sample_rate,
            band_hz=float(band * rng.uniform(0.96, 1.04)),
            rhythm_hz=float(rhythm * rng.uniform(0.95, 1.05)),
            noise=float(rng.uniform(0.02, 0.3)),
        )
        videos.append(video)
        rows.append({
            "item_id": item_id, "title": title, "video_path": video.file, "duration": video.duration,
            "group": topic["group"], "title_kind": kind, "has_audio": has_audio, "hue": video.hue,
            "shape": shape, "direction_deg": float(direction % 360), "speed_px_s": float(speed),
            "band_hz": video.band_hz, "rhythm_hz": video.rhythm_hz, "fps": fps, "n_frames": n_frames,
            "colour_shows_topic": bool(colour_ok), "shape_shows_topic": bool(shape_ok),
            "motion_shows_topic": bool(motion_ok), "audio_shows_topic": bool(band_ok and rhythm_ok and has_audio),
            "_topic": topic["topic"],
        })
    return pl.DataFrame(rows), videos


# --------------------------------------------------------------------------------------------
# Users and watch events


def make_watch_log(spec: SynthSpec, item_topic: np.ndarray, rng: np.random.Generator,
                   item_ids: list[str]) -> tuple[SynthTruth, pl.DataFrame]:
    """Draw users' tastes and their watch events; returns the truth and the events table."""
    n_items, n_users, k = spec.n_videos, spec.n_users, spec.n_topics
    cold = np.zeros(n_items, dtype=bool)
    cold[rng.choice(n_items, size=spec.n_cold, replace=False)] = True
    popularity = rng.lognormal(0.0, 1.0, size=n_items)

    sigma = 0.5
    counts = rng.lognormal(np.log(spec.events_per_user) - sigma**2 / 2, sigma, size=n_users)
    n_warm = n_items - spec.n_cold
    counts = np.clip(np.round(counts), 7, min(4 * spec.events_per_user, n_warm - 2)).astype(np.int64)
    starts = START_TIME + rng.integers(0, 120 * DAY, size=n_users)
    times = [starts[u] + np.cumsum(60 + rng.exponential(6 * 3600, size=counts[u]).astype(np.int64))
             for u in range(n_users)]
    truth = SynthTruth(
        item_ids=np.array(item_ids),
        item_topic=item_topic,
        popularity=popularity,
        cold=cold,
        user_ids=np.array([f"u{u + 1:0{len(str(n_users))}d}" for u in range(n_users)]),
        taste_start=rng.dirichlet(np.full(k, 0.3), size=n_users),
        taste_end=rng.dirichlet(np.full(k, 0.3), size=n_users),
        drift=rng.uniform(0.0, 0.8, size=n_users),
        t_start=np.array([t[0] for t in times], dtype=np.int64),
        t_end=np.array([t[-1] for t in times], dtype=np.int64),
        beta=spec.beta,
        epsilon=spec.epsilon,
        cold_boost=spec.cold_boost,
    )

    watched: list[np.ndarray] = []
    for u in range(n_users):
        n = int(counts[u])
        users = np.full(n, u)
        logits = np.concatenate([truth.log_weights(users[:-2], times[u][:-2], tail=False),
                                 truth.log_weights(users[-2:], times[u][-2:], tail=True)])  # (n, N)
        noise = rng.gumbel(size=logits.shape)  # (n, N): Gumbel-max draws ∝ exp(logits)
        seen = np.zeros(n_items, dtype=bool)
        picks = np.empty(n, dtype=np.int64)
        for j in range(n):
            row = np.where(seen, -np.inf, logits[j] + noise[j])
            picks[j] = int(np.argmax(row))
            seen[picks[j]] = True
        watched.append(picks)
    _top_up_cold(spec, truth, watched, times, rng)

    width = len(str(n_users))
    events = pl.DataFrame(
        {
            "user_id": np.repeat([f"u{u + 1:0{width}d}" for u in range(n_users)], counts),
            "item_id": np.array(item_ids)[np.concatenate(watched)],
            "timestamp": np.concatenate(times).astype(np.int64),
        }
    )
    return truth, events


def _top_up_cold(spec: SynthSpec, truth: SynthTruth, watched: list[np.ndarray], times: list[np.ndarray],
                 rng: np.random.Generator) -> None:
    """Give every cold video at least `min_cold_users` viewers, taken from the users who like it most.

    A chosen user's warm last or second-to-last event becomes the cold video, drawn in
    proportion to that user's choice weight for it, so the oracle's weights stay the ones
    the events follow.
    """
    cold_items = np.flatnonzero(truth.cold)
    users = np.arange(len(watched))
    last_times = np.array([t[-1] for t in times])
    for item in cold_items:
        viewers = {u for u in users if item in watched[u][-2:]}
        missing = spec.min_cold_users - len(viewers)
        if missing <= 0:
            continue
        candidates = np.array([u for u in users
                               if u not in viewers and not truth.cold[watched[u][-2:]].all()])
        weights = np.exp(truth.log_weights(candidates, last_times[candidates], np.array([item]))[:, 0])
        chosen = rng.choice(candidates, size=missing, replace=False, p=weights / weights.sum())
        for u in chosen:
            slots = [s for s in (-2, -1) if not truth.cold[watched[u][s]]]
            watched[u][slots[int(rng.integers(len(slots)))]] = item


# --------------------------------------------------------------------------------------------
# The whole corpus


def synthesize(config: SynthConfig) -> Path:
    """Generate the corpus into `<raw_dir>/synth/` (skipped when it exists with the same settings)."""
    spec = resolve(config)
    folder = Path(config.raw_dir) / FOLDER
    existing = folder / "synth.json"
    if not config.overwrite and existing.exists() and read_json(existing).get("spec") == _plain(spec):
        return folder

    started = time.perf_counter()
    topic_rng, item_rng, user_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(3))
    topics = make_topics(spec, topic_rng)
    facts, videos = make_items(spec, topics, item_rng)
    item_ids = facts.get_column("item_id").to_list()
    truth, events = make_watch_log(spec, facts.get_column("_topic").to_numpy(), user_rng, item_ids)

    tmp = folder.with_name(f".{FOLDER}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "videos").mkdir(parents=True)
    try:
        video_bytes = _render_all(videos, tmp, config.workers)
        facts.select("item_id", "title", "video_path", "duration").write_parquet(tmp / "items.parquet")
        events.write_parquet(tmp / "events.parquet")
        truth.save(tmp, topics, facts.drop("title", "video_path", "duration", "_topic"))
        summary = {
            "generator_version": GENERATOR_VERSION,
            "spec": _plain(spec),
            "config": to_dict(config),
            "counts": {
                "videos": spec.n_videos,
                "videos_without_audio": int((~facts.get_column("has_audio")).sum()),
                "cold_videos": int(truth.cold.sum()),
                "users": spec.n_users,
                "events": events.height,
                "topics": spec.n_topics,
                "motion_only_topic_pairs": spec.n_pairs,
                "empty_titles": int((facts.get_column("title") == "").sum()),
            },
            "video_bytes": video_bytes,
            "seconds": round(time.perf_counter() - started, 2),
        }
        write_json(tmp / "synth.json", summary)
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log_run(config, folder, summary)
    return folder


def _plain(spec: SynthSpec) -> dict[str, Any]:
    """The spec as JSON gives it back (tuples as lists), for comparing with a saved synth.json."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


DETERMINISTIC_HEAP = "165"
"""glibc's MALLOC_PERTURB_ for the rendering workers: every block they allocate starts as the same bytes.

x264 reads some memory it allocated without writing it first (with these 64x64 frames), so
without this 11-14 of 40 videos encoded to different bits from one run to the next: decoded
frames then differed slightly and, through content training, so did the benchmark results of one
seed. With it, runs are byte-identical (checked over 40 videos x 3 runs, and by the tests)."""


def _render_all(videos: list[VideoSpec], folder: Path, workers: int) -> int:
    """Render every video, spread over `workers` processes (0 = every core); deterministic in any order."""
    workers = min(workers or os.cpu_count() or 1, len(videos)) or 1
    chunk = max(1, math.ceil(len(videos) / (workers * 8)))
    batches = [videos[i:i + chunk] for i in range(0, len(videos), chunk)]
    # Always in spawned workers, even for one: a fresh interpreter per worker is safe whatever threads
    # the parent has started, and the encoded bytes cannot depend on what the calling process did before
    # (in-process rendering after other PyAV work gave different H.264 frames in a full test run).
    with environment(MALLOC_PERTURB_=DETERMINISTIC_HEAP), ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("spawn")) as pool:
        return sum(pool.map(render_videos, batches, [str(folder)] * len(batches)))


def _replace_folder(new: Path, folder: Path) -> None:
    """Swap the finished corpus into place; an older corpus is removed only once the new one is complete."""
    old = folder.with_name(f".{FOLDER}.{os.getpid()}.old")
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _log_run(config: SynthConfig, folder: Path, summary: dict[str, Any]) -> None:
    import mlflow

    from recsys.tracking.store import fingerprint_files, start_run

    fingerprint = fingerprint_files([folder / "items.parquet", folder / "events.parquet"])
    counts = summary["counts"]
    name = f"synth {config.preset} {counts['videos']}v {counts['users']}u {counts['topics']}t s{config.seed}"
    with start_run("synth", "synth", to_dict(config), {"generated": fingerprint}, run_name=name):
        mlflow.log_metrics({f"count.{name}": value for name, value in summary["counts"].items()})
        mlflow.log_metric("seconds", summary["seconds"])
        mlflow.log_artifact(str(folder / "synth.json"))
        mlflow.log_artifact(str(folder / "truth" / "truth.json"))
