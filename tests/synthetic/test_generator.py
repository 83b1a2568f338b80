"""The synthetic corpus: deterministic, decodable, structured as promised, readable like any dataset."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import polars as pl
import pytest

from recsys.config import PrepareConfig, SynthConfig
from recsys.data.importers.synth import load_synth
from recsys.data.paths import PreparedPaths
from recsys.errors import DataFormatError, MissingInputError
from recsys.synthetic.generator import make_items, make_topics, make_watch_log, resolve, synthesize
from recsys.synthetic.truth import SynthTruth, corpus_folder, oracle_scores, truth_items


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small preset, generated once for this module."""
    return synthesize(SynthConfig(preset="small", raw_dir=tmp_path_factory.mktemp("raw"), workers=2))


def _decode_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_same_seed_gives_same_bytes_and_frames_whatever_the_worker_count(corpus: Path, tmp_path: Path) -> None:
    again = synthesize(SynthConfig(preset="small", raw_dir=tmp_path / "again", workers=1))
    for name in ("items.parquet", "events.parquet"):
        assert (again / name).read_bytes() == (corpus / name).read_bytes()
    videos = sorted((corpus / "videos").glob("*.mp4"))
    # Every file: without DETERMINISTIC_HEAP one to a few of them differed in some encoded bits.
    differing = [video.name for video in videos if video.read_bytes() != (again / "videos" / video.name).read_bytes()]
    assert differing == []
    for video in videos[:4]:
        np.testing.assert_array_equal(_decode_frames(video), _decode_frames(again / "videos" / video.name))

    other = synthesize(SynthConfig(preset="small", raw_dir=tmp_path / "other", seed=1, workers=1))
    assert (other / "events.parquet").read_bytes() != (corpus / "events.parquet").read_bytes()


def test_rerun_with_same_settings_keeps_the_corpus(corpus: Path) -> None:
    before = (corpus / "events.parquet").stat().st_mtime_ns
    synthesize(SynthConfig(preset="small", raw_dir=corpus.parent, workers=2))
    assert (corpus / "events.parquet").stat().st_mtime_ns == before


def test_videos_decode_with_the_promised_frames_size_and_audio(corpus: Path) -> None:
    items = pl.read_parquet(corpus / "items.parquet")
    truth = pl.read_parquet(corpus / "truth" / "items.parquet")
    assert items.columns == ["item_id", "title", "video_path", "duration"]
    assert not truth.get_column("has_audio").all(), "some videos must lack an audio track"
    for item, facts in zip(items.iter_rows(named=True), truth.iter_rows(named=True), strict=True):
        with av.open(str(corpus / item["video_path"])) as container:
            video = container.streams.video[0]
            assert video.codec_context.name == "h264"
            assert (video.codec_context.width, video.codec_context.height) == (64, 64)
            frames = sum(1 for _ in container.decode(video=0))
            assert frames == facts["n_frames"]
            assert item["duration"] == pytest.approx(facts["n_frames"] / facts["fps"])
        with av.open(str(corpus / item["video_path"])) as container:
            if not facts["has_audio"]:
                assert not container.streams.audio
                continue
            audio = container.streams.audio[0]
            assert (audio.codec_context.name, audio.codec_context.sample_rate) == ("aac", 16_000)
            samples = sum(f.samples for f in container.decode(audio=0))
            # AAC codes whole 1024-sample frames: the tail of the last one is padding.
            assert 0 <= samples - item["duration"] * 16_000 < 1024


def test_cold_videos_are_only_last_or_second_to_last_events_of_enough_users(corpus: Path) -> None:
    truth = SynthTruth.load(corpus)
    events = pl.read_parquet(corpus / "events.parquet").sort("user_id", "timestamp")
    positions = events.with_columns(
        (pl.len().over("user_id") - 1 - pl.int_range(pl.len()).over("user_id")).alias("from_end"),
        pl.col("timestamp").diff().over("user_id").alias("gap"),
    )
    assert positions.get_column("gap").drop_nulls().min() > 0, "timestamps strictly increase per user"
    cold = positions.filter(pl.col("item_id").is_in(truth.item_ids[truth.cold].tolist()))
    assert truth.cold.sum() >= 1
    assert cold.get_column("from_end").max() <= 1
    viewers = cold.group_by("item_id").agg(pl.col("user_id").n_unique().alias("users"))
    assert viewers.height == truth.cold.sum()
    assert viewers.get_column("users").min() >= 7
    assert events.select(pl.struct("user_id", "item_id").is_unique().all()).item(), "no repeated watches"


def test_topic_pairs_differ_only_in_motion(corpus: Path) -> None:
    topics = json.loads((corpus / "truth" / "truth.json").read_text())["topics"]
    pairs = [t for t in topics if t["pair"]]
    assert len(pairs) == 2  # small preset: 4 topics, one motion-only pair
    first, second = pairs
    for key in ("hue", "shape", "band_hz", "rhythm_hz", "words", "speed_px_s", "group"):
        assert first[key] == second[key]
    assert (second["direction_deg"] - first["direction_deg"]) % 360 == 180
    singles = [t for t in topics if not t["pair"]]
    assert len({t["shape"] for t in singles} | {first["shape"]}) == 3


def test_load_synth_gives_the_common_schema_without_leaking_topics(corpus: Path) -> None:
    raw = load_synth(corpus)
    items = raw.items.collect()
    assert items.get_column("genres").list.len().max() == 0
    assert all(Path(p).is_absolute() and Path(p).exists() for p in items.get_column("video_path"))
    assert (items.get_column("title") == "").any(), "some titles are empty"
    events = raw.interactions.collect()
    assert events.height == pl.read_parquet(corpus / "events.parquet").height
    assert events.get_column("weight").null_count() == events.height
    assert events.get_column("line").to_list() == list(range(1, events.height + 1))


def test_load_synth_reports_or_skips_incomplete_rows(tmp_path: Path) -> None:
    pl.DataFrame({"item_id": ["v1"], "title": ["x"], "video_path": ["videos/v1.mp4"], "duration": [1.0]}).write_parquet(
        tmp_path / "items.parquet")
    pl.DataFrame({"user_id": ["u1", None, "u1"], "item_id": ["v1", "v1", "v1"], "timestamp": [1, 2, 3]}).write_parquet(
        tmp_path / "events.parquet")
    with pytest.raises(DataFormatError, match="row 2 lacks a user_id"):
        load_synth(tmp_path, "error")
    raw = load_synth(tmp_path, "skip")
    assert raw.interactions.collect().height == 2
    assert sum(raw.rejected.values()) == 1
    with pytest.raises(MissingInputError, match="recsys data synth"):
        load_synth(tmp_path / "nowhere")


def test_prepare_keeps_cold_videos_out_of_training(corpus: Path, tmp_path: Path) -> None:
    from recsys.data.prepare import prepare

    prepare(PrepareConfig(dataset="synth", raw_dir=corpus.parent, processed_dir=tmp_path))
    truth = SynthTruth.load(corpus)
    items = pl.read_parquet(tmp_path / "synth" / "items.parquet")
    cold = items.filter(pl.col("item_id").is_in(truth.item_ids[truth.cold].tolist()))
    assert cold.height == truth.cold.sum(), "the 5-core keeps every cold video"
    assert cold.get_column("train_count").max() == 0
    held_out = pl.concat([pl.read_parquet(tmp_path / "synth" / f"{s}.parquet") for s in ("valid", "test")])
    assert set(cold.get_column("item_idx")) <= set(held_out.get_column("item_idx"))


def test_oracle_ranks_test_events_far_above_popularity(tmp_path: Path) -> None:
    # The watch log alone (no videos): 200 items, 400 users.
    spec = resolve(SynthConfig(n_videos=200, n_users=400, events_per_user=30, n_topics=8))
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(7).spawn(3)]
    facts, _ = make_items(spec, make_topics(spec, rngs[0]), rngs[1])
    truth, events = make_watch_log(spec, facts.get_column("_topic").to_numpy(), rngs[2],
                                   facts.get_column("item_id").to_list())
    truth.save(tmp_path, [], facts.select("item_id"))
    events = events.sort("user_id", "timestamp")
    last = events.group_by("user_id", maintain_order=True).last()
    seen = events.join(last, on=["user_id", "item_id"], how="anti")
    scores = oracle_scores(tmp_path, last.get_column("user_id").to_list(), last.get_column("timestamp").to_numpy())
    popularity = np.zeros(spec.n_videos)
    counts = seen.group_by("item_id").len()
    popularity[truth.item_index(counts.get_column("item_id").to_list())] = counts.get_column("len").to_numpy()

    def hit_rate(score: np.ndarray) -> float:
        score = score.copy()
        for row, user in enumerate(last.get_column("user_id")):
            watched = seen.filter(pl.col("user_id") == user).get_column("item_id").to_list()
            score[row, truth.item_index(watched)] = -np.inf
        top = np.argsort(-score, axis=1)[:, :10]
        target = truth.item_index(last.get_column("item_id").to_list())
        return float((top == target[:, None]).any(axis=1).mean())

    oracle_hr = hit_rate(scores)
    popular_hr = hit_rate(np.tile(popularity, (last.height, 1)))
    assert oracle_hr > 1.5 * popular_hr
    assert oracle_hr > 0.2


def test_truth_items_is_found_beside_the_raw_corpus_that_prepare_read(tmp_path: Path) -> None:
    paths = PreparedPaths(tmp_path / "processed" / "synth")
    paths.root.mkdir(parents=True)
    paths.meta.write_text(f'{{"config": {{"raw_dir": "{tmp_path / "raw"}"}}}}')
    assert truth_items(paths) is None and corpus_folder(paths) is None  # no corpus there (MovieLens, or moved)
    truth = tmp_path / "raw" / "synth" / "truth" / "items.parquet"
    truth.parent.mkdir(parents=True)
    pl.DataFrame({"item_id": ["a"], "topic": [0]}).write_parquet(truth)
    assert truth_items(paths) == truth
    assert corpus_folder(paths) == tmp_path / "raw" / "synth"
