"""`recsys data import`: a user's own watch log and catalogue, every bad input, and the whole pipeline on it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from recsys.cli import main
from recsys.config import ImportConfig, PrepareConfig
from recsys.data import canonical
from recsys.data.datasets import list_datasets, load_raw
from recsys.data.importers.files import import_dataset
from recsys.data.prepare import prepare
from recsys.errors import DataFormatError, RecsysError
from tests.data.own_data import CLIPS, MISSING, UNTITLED, OwnData, retitle, write_own_data

NAME = "mine"
COLUMNS = {"user_column": "viewer", "item_column": "video", "time_column": "watched_at"}


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> OwnData:
    return write_own_data(tmp_path_factory.mktemp("own"), shared_data)


def config(own: OwnData, raw_dir: Path, **changes: object) -> ImportConfig:
    settings: dict[str, object] = {"dataset": NAME, "interactions": own.views, "items": own.catalogue,
                                   "media_root": own.media_root, "raw_dir": raw_dir, **COLUMNS}
    return ImportConfig(**{**settings, **changes})  # type: ignore[arg-type]


def write_log(path: Path, rows: list[dict[str, object]]) -> Path:
    pl.DataFrame(rows).write_csv(path)
    return path


def assert_nothing_written(raw_dir: Path) -> None:
    """A refused import leaves neither the dataset nor a staging folder behind."""
    assert not raw_dir.exists() or not any(raw_dir.iterdir()), list(raw_dir.iterdir())


# --------------------------------------------------------------------------------------------
# What a good import keeps


def test_import_keeps_every_view_of_a_catalogue_video(own: OwnData, tmp_path: Path) -> None:
    report = import_dataset(config(own, tmp_path / "raw"))
    views = pl.read_csv(own.views)
    assert (report.rows_read, report.rows_kept, sum(report.skipped.values())) == (views.height, views.height, 0)
    raw = load_raw(NAME, tmp_path / "raw")
    interactions = raw.interactions.collect()
    assert interactions.columns == ["user_id", "item_id", "timestamp", "weight", "line"]
    first = views.row(0, named=True)
    # 2024-05-01T02:00:00+02:00 is midnight UTC
    assert interactions.item(0, "timestamp") == int(datetime.fromisoformat(first["watched_at"]).timestamp())
    assert interactions.item(0, "timestamp") == int(datetime(2024, 5, 1, tzinfo=UTC).timestamp())
    assert interactions.get_column("line").to_list()[:3] == [2, 3, 4]
    items = raw.items.collect()
    assert items.get_column("item_id").to_list() == own.item_ids
    lost = items.filter(pl.col("item_id") == MISSING).row(0, named=True)
    assert lost["video_path"] == str(own.media_root.resolve() / "clips" / "not_there.mp4")
    assert report.videos_not_found == ["clips/not_there.mp4"]
    assert items.filter(pl.col("item_id") == "v01").item(0, "text") == "clip 0 of the test catalogue demo test"
    assert items.filter(pl.col("item_id") == "v01").item(0, "genres").to_list() == ["demo", "test"]
    assert report.items_without_title == 1 and report.items == len(own.item_ids)


def test_imported_dataset_is_listed_and_prepared_like_a_built_in_one(own: OwnData, tmp_path: Path) -> None:
    import_dataset(config(own, tmp_path / "raw"))
    listed = list_datasets(tmp_path / "raw", tmp_path / "processed")
    row = listed.filter(pl.col("dataset") == NAME).row(0, named=True)
    assert (row["kind"], row["raw"], row["prepared"], row["interactions"]) == ("imported", True, False, 24 * 7)
    meta = prepare(PrepareConfig(NAME, raw_dir=tmp_path / "raw", processed_dir=tmp_path / "processed",
                                 min_user_interactions=1, min_item_interactions=1))
    assert meta["counts"]["rows_read"] == 24 * 7 and meta["counts"]["users"] == 24
    assert meta["counts"]["items"] == len(own.item_ids)  # unwatched videos stay: the cold-start catalogue
    listed = list_datasets(tmp_path / "raw", tmp_path / "processed")
    assert listed.filter(pl.col("dataset") == NAME).item(0, "prepared")


def test_times_in_seconds_milliseconds_and_iso_with_or_without_a_zone(own: OwnData, tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.csv", [
        {"viewer": "a", "video": "v00", "watched_at": "1714521600"},
        {"viewer": "a", "video": "v01", "watched_at": "1714521600000"},
        {"viewer": "a", "video": "v02", "watched_at": "2024-05-01T00:00:00Z"},
        {"viewer": "a", "video": "v03", "watched_at": "2024-05-01 02:00:00+02:00"},
        {"viewer": "a", "video": "v04", "watched_at": "2024-05-01T00:00:00"},
        {"viewer": "a", "video": "v05", "watched_at": "2024-05-01T00:00:00.250+0000"},
    ])
    import_dataset(config(own, tmp_path / "raw", interactions=log))
    times = load_raw(NAME, tmp_path / "raw").interactions.collect().get_column("timestamp")
    assert times.to_list() == [1714521600] * 6


def test_parquet_and_json_lines_logs_with_native_types(own: OwnData, tmp_path: Path) -> None:
    frame = pl.DataFrame({"viewer": [1, 2], "video": ["v00", "v01"],
                          "watched_at": [datetime(2024, 5, 1), datetime(2024, 5, 2)]})
    frame.write_parquet(tmp_path / "log.parquet")
    frame.with_columns(pl.col("watched_at").dt.epoch("s")).write_ndjson(tmp_path / "log.jsonl")
    for index, path in enumerate([tmp_path / "log.parquet", tmp_path / "log.jsonl"]):
        raw_dir = tmp_path / f"raw{index}"
        import_dataset(config(own, raw_dir, interactions=path))
        interactions = load_raw(NAME, raw_dir).interactions.collect()
        assert interactions.get_column("user_id").to_list() == ["1", "2"]  # IDs are strings
        assert interactions.get_column("timestamp").to_list() == [1714521600, 1714608000]


def test_weights_keep_only_real_views_and_are_counted(own: OwnData, tmp_path: Path) -> None:
    report = import_dataset(config(own, tmp_path / "raw", weight_column="fraction", min_weight=0.7))
    views = pl.read_csv(own.views)
    short = views.filter(pl.col("fraction") < 0.7).height
    assert short > 0
    assert report.skipped == {"weight below min_weight=0.7": short}
    assert report.rows_kept == views.height - short
    kept = load_raw(NAME, tmp_path / "raw").interactions.collect()
    assert kept.get_column("weight").min() >= 0.7


def test_catalogue_from_a_folder_of_videos_named_by_id_with_titles_from_their_tags(
        own: OwnData, tmp_path: Path, shared_data: Path) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    retitle(shared_data / "videos" / CLIPS[0], folder / "v00.mp4", "Waves at dawn")
    retitle(shared_data / "videos" / CLIPS[1], folder / "v01.mp4", "")
    log = write_log(tmp_path / "log.csv", [{"viewer": "a", "video": "v00", "watched_at": "2024-05-01"},
                                           {"viewer": "a", "video": "v09", "watched_at": "2024-05-01"}])
    report = import_dataset(config(own, tmp_path / "raw", interactions=log, items=None, media_root=folder))
    items = load_raw(NAME, tmp_path / "raw").items.collect()
    assert dict(zip(items["item_id"], items["title"], strict=True)) == {"v00": "Waves at dawn", "v01": ""}
    assert report.skipped == {"video not in the catalogue": 1}


# --------------------------------------------------------------------------------------------
# Bad input: one clear line naming file, line and value; nothing written


@pytest.mark.parametrize(("changes", "message"), [
    ({"user_column": "user"}, r"views.csv: no user ID column 'user' \(columns found: viewer, video, watched_at, "
                              r"fraction\); set it with --user-column NAME"),
    ({"time_column": "watched"}, r"no time column 'watched' .*did you mean 'watched_at'"),
    ({"weight_column": "fractoin"}, r"no weight column 'fractoin' .*did you mean 'fraction'"),
])
def test_missing_or_misspelled_column_lists_the_columns(own: OwnData, tmp_path: Path, changes: dict,
                                                        message: str) -> None:
    with pytest.raises(DataFormatError, match=message):
        import_dataset(config(own, tmp_path / "raw", **changes))
    assert_nothing_written(tmp_path / "raw")


def test_unparseable_timestamp_names_file_line_and_value(own: OwnData, tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.csv", [
        {"viewer": "a", "video": "v00", "watched_at": "2024-05-01T10:00:00Z"},
        {"viewer": "a", "video": "v01", "watched_at": "yesterday"},
        {"viewer": "b", "video": "v01", "watched_at": "31/12/2024"},
    ])
    with pytest.raises(DataFormatError, match=r"log.csv:3: unparseable timestamp: 'yesterday' \(1 more such row"):
        import_dataset(config(own, tmp_path / "raw", interactions=log))
    assert_nothing_written(tmp_path / "raw")
    report = import_dataset(config(own, tmp_path / "raw", interactions=log, on_bad_rows="skip"))
    assert (report.rows_read, report.rows_kept, report.skipped) == (3, 1, {"unparseable timestamp": 2})


def test_missing_ids_and_bad_weights_are_errors_or_counted_skips(own: OwnData, tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.csv", [
        {"viewer": "a", "video": "v00", "watched_at": "2024-05-01", "fraction": "0.5"},
        {"viewer": "", "video": "v00", "watched_at": "2024-05-01", "fraction": "0.5"},
        {"viewer": "b", "video": " ", "watched_at": "2024-05-01", "fraction": "0.5"},
        {"viewer": "c", "video": "v01", "watched_at": "2024-05-01", "fraction": "half"},
        {"viewer": "d", "video": "nope", "watched_at": "2024-05-01", "fraction": "1"},
    ])
    with pytest.raises(DataFormatError, match=r"log.csv:3: missing user ID"):
        import_dataset(config(own, tmp_path / "raw", interactions=log, weight_column="fraction"))
    report = import_dataset(config(own, tmp_path / "raw", interactions=log, weight_column="fraction",
                                   on_bad_rows="skip"))
    assert report.rows_read == report.rows_kept + sum(report.skipped.values()) == 5
    assert report.skipped == {"missing user ID": 1, "missing video ID": 1, "unparseable weight": 1,
                              "video not in the catalogue": 1}


def test_unknown_videos_are_dropped_and_counted_or_an_error_with_strict(own: OwnData, tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.csv", [{"viewer": "a", "video": "v00", "watched_at": "2024-05-01"},
                                           {"viewer": "a", "video": "v99", "watched_at": "2024-05-02"}])
    with pytest.raises(DataFormatError, match=r"log.csv:3: video not in the catalogue: 'v99'"):
        import_dataset(config(own, tmp_path / "raw", interactions=log, strict=True))
    assert_nothing_written(tmp_path / "raw")
    assert import_dataset(config(own, tmp_path / "raw", interactions=log)).skipped == {
        "video not in the catalogue": 1}


def test_empty_files_and_a_header_without_rows(own: OwnData, tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataFormatError, match=r"empty.csv: the file is empty"):
        import_dataset(config(own, tmp_path / "raw", interactions=tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("viewer,video,watched_at\n")
    with pytest.raises(DataFormatError, match=r"header.csv: holds no views"):
        import_dataset(config(own, tmp_path / "raw", interactions=tmp_path / "header.csv"))
    assert_nothing_written(tmp_path / "raw")


def test_non_utf8_text_names_the_line(own: OwnData, tmp_path: Path) -> None:
    log = tmp_path / "latin1.csv"
    log.write_bytes("viewer,video,watched_at\na,v00,2024-05-01\nJos\xe9,v01,2024-05-01\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1.csv:3: byte 0xe9 is not valid UTF-8"):
        import_dataset(config(own, tmp_path / "raw", interactions=log))
    assert_nothing_written(tmp_path / "raw")


def test_duplicate_catalogue_ids_name_both_lines(own: OwnData, tmp_path: Path) -> None:
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\nv00,First\nv01,Second\nv01,Second again\nv00,First again\n")
    with pytest.raises(DataFormatError, match=r"items.csv:4: duplicate video ID \(first on line 3\): 'v01' \(1 more"):
        import_dataset(config(own, tmp_path / "raw", items=items, media_root=None))
    assert_nothing_written(tmp_path / "raw")
    report = import_dataset(config(own, tmp_path / "raw", items=items, media_root=None, on_bad_rows="skip"))
    assert report.items == 2 and report.item_rows_skipped == {"duplicate video ID (the first row is kept)": 2}
    titles = load_raw(NAME, tmp_path / "raw").items.collect().get_column("title").to_list()
    assert titles == ["First", "Second"]


@pytest.mark.parametrize(("video", "message"), [
    ("/etc/passwd", "absolute video path"),
    ("../../outside.mp4", "video path outside the media root"),
    ("clips/../../x.mp4", "video path outside the media root"),
])
def test_video_paths_outside_the_media_root_are_refused(own: OwnData, tmp_path: Path, video: str,
                                                         message: str) -> None:
    items = tmp_path / "items.csv"
    pl.DataFrame({"item_id": ["v00", "v01"], "title": ["a", "b"],
                  "video": ["clips/" + Path(CLIPS[0]).name, video]}).write_csv(items)
    with pytest.raises(DataFormatError, match=rf"items.csv:3: {message}.*{video!r}"):
        import_dataset(config(own, tmp_path / "raw", items=items))
    assert_nothing_written(tmp_path / "raw")


def test_a_link_out_of_the_media_root_is_refused(own: OwnData, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape.mp4").symlink_to(own.media_root / "clips" / Path(CLIPS[0]).name)
    items = tmp_path / "items.csv"
    pl.DataFrame({"item_id": ["v00"], "title": ["a"], "video": ["escape.mp4"]}).write_csv(items)
    with pytest.raises(DataFormatError, match=r"items.csv:2: video path is a link to a file outside the media root"):
        import_dataset(config(own, tmp_path / "raw", items=items, media_root=root))


def test_an_existing_dataset_is_replaced_only_with_overwrite(own: OwnData, tmp_path: Path) -> None:
    import_dataset(config(own, tmp_path / "raw"))
    with pytest.raises(RecsysError, match=r"dataset 'mine' exists already; pass --overwrite"):
        import_dataset(config(own, tmp_path / "raw"))
    report = import_dataset(config(own, tmp_path / "raw", overwrite=True, weight_column="fraction", min_weight=0.9))
    assert load_raw(NAME, tmp_path / "raw").interactions.collect().height == report.rows_kept
    assert [p.name for p in (tmp_path / "raw").iterdir()] == [NAME]


def test_a_failure_while_writing_leaves_the_old_dataset_untouched(own: OwnData, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = import_dataset(config(own, tmp_path / "raw"))

    def killed(folder: Path, manifest: dict) -> None:
        raise KeyboardInterrupt  # as if the import were stopped just before its last file

    monkeypatch.setattr("recsys.data.importers.files.write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        import_dataset(config(own, tmp_path / "raw", overwrite=True, weight_column="fraction", min_weight=0.9))
    assert [p.name for p in (tmp_path / "raw").iterdir()] == [NAME]
    manifest = json.loads((tmp_path / "raw" / NAME / canonical.MANIFEST).read_text())
    assert manifest["report"]["rows_kept"] == first.rows_kept


def test_cli_errors_are_one_line_with_a_non_zero_exit(own: OwnData, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["data", "import", NAME, "--interactions", str(own.views), "--items", str(own.catalogue),
                   "--media-root", str(own.media_root), "--raw-dir", str(tmp_path / "raw"),
                   "--user-column", "viewer", "--item-column", "video", "--time-column", "when"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("recsys: error: ") and "no time column 'when'" in err
    assert "Traceback" not in err


def test_cli_import_prints_the_report(own: OwnData, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["data", "import", NAME, "--interactions", str(own.views), "--items", str(own.catalogue),
                   "--media-root", str(own.media_root), "--raw-dir", str(tmp_path / "raw"),
                   "--user-column", "viewer", "--item-column", "video", "--time-column", "watched_at"])
    out = capsys.readouterr().out
    assert status == 0
    assert f"mine: {24 * 7} of {24 * 7} views kept, 24 users; 14 videos in the catalogue" in out
    assert "1 video file(s) not found (e.g. clips/not_there.mp4)" in out
    assert "next: recsys data prepare mine" in out


def test_a_built_in_name_cannot_be_imported_over(own: OwnData, tmp_path: Path) -> None:
    with pytest.raises(RecsysError, match="'synth' is a built-in dataset"):
        config(own, tmp_path / "raw", dataset="synth")
    with pytest.raises(RecsysError, match="dataset name 'My Data'"):
        config(own, tmp_path / "raw", dataset="My Data")


def test_unknown_dataset_says_how_to_import_it(tmp_path: Path) -> None:
    with pytest.raises(RecsysError, match=r"dataset 'nosuch' not found; import it with `recsys data import nosuch"):
        load_raw("nosuch", tmp_path)


# --------------------------------------------------------------------------------------------
# The whole pipeline on imported data


@pytest.mark.slow
def test_pipeline_on_own_data_recommends_catalogue_videos_and_the_lost_one_from_its_title(
        own: OwnData, tmp_path: Path) -> None:
    import mlflow
    import pandas as pd

    from recsys.config import ContentConfig, ExportConfig, IngestConfig, RetrievalConfig
    from recsys.content.train import train_content
    from recsys.media.ingest import ingest
    from recsys.serving.export import export
    from recsys.serving.registry import champion_uri
    from recsys.twotower.train import train_retrieval

    raw, processed = tmp_path / "raw", tmp_path / "processed"
    import_dataset(config(own, raw, weight_column="fraction"))
    prepare(PrepareConfig(NAME, raw_dir=raw, processed_dir=processed, min_user_interactions=1,
                          min_item_interactions=1))
    summary = ingest(IngestConfig(NAME, processed_dir=processed, frames=4, frame_size=32, workers=1,
                                  audio_seconds=1.0))
    assert summary["counts"]["videos_failed"] == 1  # the lost file, recorded
    again = ingest(IngestConfig(NAME, processed_dir=processed, frames=4, frame_size=32, workers=1, audio_seconds=1.0))
    assert again["counts"]["processed_videos"] == 0  # a second ingest decodes nothing again
    train_content(ContentConfig(NAME, processed_dir=processed, max_epochs=1, batch_size=4, embedding_dim=16,
                                hidden_dim=16, checkpoint_dir=tmp_path / "ckpt", progress_bar=False))
    trained = train_retrieval(RetrievalConfig(NAME, processed_dir=processed, max_epochs=2, dim=16, batch_size=32,
                                              taste_clusters=0, progress_bar=False))
    export(ExportConfig(NAME, processed_dir=processed, run_id=trained.run_id, raw_dir=raw))

    model = mlflow.pyfunc.load_model(champion_uri(NAME))
    views = pl.read_csv(own.views)
    users = views.get_column("viewer").unique().sort().to_list()
    k = len(own.item_ids)
    ranked = pl.from_pandas(model.predict(pd.DataFrame({"user_id": users, "k": [k] * len(users)})))
    catalogue = set(own.item_ids)
    lost_ranked = False
    for user in users:
        mine = ranked.filter(pl.col("user_id") == user)
        history = set(views.filter(pl.col("viewer") == user).get_column("video"))
        assert set(mine.get_column("item_id")) <= catalogue
        assert not set(mine.get_column("item_id")) & history, user
        assert mine.height == len(catalogue - history)  # every unseen video has a score
        lost_ranked |= MISSING in mine.get_column("item_id").to_list()
    assert lost_ranked
    assert ranked.get_column("score").is_finite().all()
    manifest = pl.read_parquet(processed / NAME / "features" / "manifest.parquet")
    lost = manifest.filter(pl.col("item_id") == MISSING).row(0, named=True)
    assert lost["status"] == "failed" and lost["has_title"]
    assert not manifest.filter(pl.col("item_id") == UNTITLED).item(0, "has_title")
    # Search through the same logged model: the 30 s clip is matched on one of its 1 s windows.
    found = pl.from_pandas(model.predict(pd.DataFrame({"query": ["big buck bunny"], "k": [k]})))
    spans = found.join(manifest.select("item_id", "duration"), on="item_id").filter(pl.col("start_s").is_not_null())
    assert (spans["start_s"] >= 0).all() and (spans["end_s"] <= spans["duration"] + 1e-3).all()
    long = spans.filter(pl.col("duration") > 20)
    assert long.height == 2 and ((long["end_s"] - long["start_s"]).round(2) == 1.0).all()
    assert found.filter(pl.col("item_id") == MISSING).item(0, "start_s") is None, "no video, no span"


def test_ingest_after_new_videos_are_imported_decodes_only_those(own: OwnData, tmp_path: Path,
                                                                  shared_data: Path) -> None:
    import numpy as np

    from recsys.config import IngestConfig
    from recsys.media.feature_store import FeatureStore
    from recsys.media.ingest import ingest

    raw, processed = tmp_path / "raw", tmp_path / "processed"
    settings = {"processed_dir": processed, "frames": 4, "frame_size": 32, "workers": 1, "audio_seconds": 1.0}
    prepare_config = PrepareConfig(NAME, raw_dir=raw, processed_dir=processed, min_user_interactions=1,
                                   min_item_interactions=1)
    import_dataset(config(own, raw))
    prepare(prepare_config)
    first = ingest(IngestConfig(NAME, **settings))
    before = FeatureStore.open(processed / NAME / "features")
    frames_before = {item: before.frames[i].copy() for i, item in enumerate(before.manifest.get_column("item_id"))}

    catalogue = pl.read_csv(own.catalogue)
    new_clip = own.media_root / "clips" / "new.mp4"
    retitle(shared_data / "videos" / CLIPS[3], new_clip, "a new upload")
    bigger = pl.concat([pl.DataFrame({"item_id": ["fresh"], "title": ["a new upload"], "video": ["clips/new.mp4"],
                                      "description": [""], "tags": [""]}), catalogue])  # new item first: all idx move
    bigger.write_csv(tmp_path / "catalogue.csv")
    import_dataset(config(own, raw, items=tmp_path / "catalogue.csv", overwrite=True))
    prepare(prepare_config)
    second = ingest(IngestConfig(NAME, **settings))
    assert first["counts"]["processed_videos"] == len(own.item_ids)
    assert second["counts"]["processed_videos"] == 2  # the new video, and the lost file tried again
    assert second["counts"]["carried_over_rows"] == len(own.item_ids) - 1
    after = FeatureStore.open(processed / NAME / "features")
    rows = {item: i for i, item in enumerate(after.manifest.get_column("item_id"))}
    for item, frames in frames_before.items():
        np.testing.assert_array_equal(after.frames[rows[item]], frames)
    assert after.frame_mask[rows["fresh"]].any()
    assert not (processed / NAME / "features.previous").exists()


def test_a_row_with_more_fields_than_the_header_names_its_line(own: OwnData, tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("viewer,video,watched_at\na,v00,2024-05-01\nb,v01,2024-05-01,extra,fields\n")
    with pytest.raises(DataFormatError, match=r"log.csv:3: 5 fields where the header names 3"):
        import_dataset(config(own, tmp_path / "raw", interactions=log))
    assert_nothing_written(tmp_path / "raw")
