"""A live catalogue: `catalogue add` and `views add` change what the registered model serves, without retraining.

The dataset: 4 topics of 10 videos whose titles say the topic; 60 users, each watching 8 videos of
one topic in time order. The two-tower model reads titles as content, so a new video is embedded
from its title by the trained item tower.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from recsys.cli import main
from recsys.config import CatalogueAddConfig, ExportConfig, ImportConfig, IngestConfig, PrepareConfig, RetrievalConfig
from recsys.errors import RecsysError
from recsys.serving.live_catalogue import add_videos, add_views
from recsys.serving.registry import champion_version
from recsys.serving.serve import ServerProcess, free_port, venv_env
from recsys.serving.served_check import served_mismatches
from recsys.serving.served_model import load_ranker

NAME = "live"
TOPICS = {
    "cat": ["kitten", "cats", "cat toy", "kitty nap", "cat video", "kittens play", "cat jumps", "cat purring",
            "cat food", "cat tricks"],
    "surf": ["surfing", "ocean waves", "surf board", "big wave", "beach surf", "surf trip", "wave riding",
             "surf lesson", "surf contest", "reef break"],
    "cook": ["cooking", "kitchen recipe", "pasta recipe", "baking bread", "soup recipe", "chef cooks",
             "cake baking", "grill meat", "salad recipe", "cooking show"],
    "hike": ["hiking", "mountain trail", "summit climb", "forest hike", "alpine trail", "hiking boots",
             "mountain view", "trail run", "camping hike", "peak climb"],
}
USERS_PER_TOPIC = 15
WATCHED = 8


@dataclass(frozen=True)
class Live:
    root: Path
    processed_dir: Path
    version: str
    """The exported version every test updates"""

    def users_of(self, topic: str) -> list[str]:
        return [f"{topic}-u{u}" for u in range(USERS_PER_TOPIC)]


def topic_of(item_id: str) -> str:
    return item_id.split("-")[0]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Live:
    from recsys.config import ContentConfig
    from recsys.content.train import train_content
    from recsys.data.importers.files import import_dataset
    from recsys.data.prepare import prepare
    from recsys.media.ingest import ingest
    from recsys.serving.export import export
    from recsys.twotower.train import train_retrieval

    root = tmp_path_factory.mktemp("live")
    raw, processed = root / "raw", root / "processed"
    items = [(f"{topic}-{i}", title) for topic, titles in TOPICS.items() for i, title in enumerate(titles)]
    pl.DataFrame(items, schema=["item_id", "title"], orient="row").write_csv(root / "items.csv")
    rng = np.random.default_rng(0)
    views = []
    for topic in TOPICS:
        for user in range(USERS_PER_TOPIC):
            for step, i in enumerate(rng.permutation(len(TOPICS[topic]))[:WATCHED]):
                views.append((f"{topic}-u{user}", f"{topic}-{i}", 1_700_000_000 + 1000 * user + step))
    pl.DataFrame(views, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(root / "views.csv")
    import_dataset(ImportConfig(NAME, interactions=root / "views.csv", items=root / "items.csv", raw_dir=raw))
    prepare(PrepareConfig(NAME, raw_dir=raw, processed_dir=processed, min_user_interactions=1,
                          min_item_interactions=1))
    ingest(IngestConfig(NAME, processed_dir=processed, frames=4, frame_size=32, workers=1, audio_seconds=1.0))
    # A content model too, so that the exported versions search by query (and catalogue add keeps that up)
    train_content(ContentConfig(NAME, processed_dir=processed, checkpoint_dir=root / "ckpt", embedding_dim=16,
                                hidden_dim=32, batch_size=20, max_epochs=2, patience=2, threads=1,
                                progress_bar=False, seed=0))
    trained = train_retrieval(RetrievalConfig(NAME, processed_dir=processed, content="title", dim=16, batch_size=32,
                                              learning_rate=1e-2, max_epochs=8, patience=8, seed=0, threads=1,
                                              progress_bar=False))
    exported = export(ExportConfig(NAME, processed_dir=processed, run_id=trained.run_id, raw_dir=raw))
    return Live(root, processed, exported.version)


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    pl.DataFrame(rows).write_csv(path)
    return path


def recommend(live: Live, version: str, users: list[str], k: int = 10) -> pl.DataFrame:
    ranker = load_ranker(NAME, live.processed_dir, version=version)
    return ranker.rank(pd.DataFrame({"user_id": users, "k": [k] * len(users)}))


@pytest.mark.slow
def test_a_new_video_of_a_users_topic_enters_their_top_k_and_similar_finds_it(live: Live, tmp_path: Path) -> None:
    items = write_csv(tmp_path / "new.csv", [{"item_id": "cat-new", "title": "kitten cat playing"},
                                            {"item_id": "cook-new", "title": "kitchen cooking recipe"}])
    result = add_videos(CatalogueAddConfig(NAME, items=items, processed_dir=live.processed_dir, version=live.version))
    assert (result.added, result.updated, result.rows_read) == (2, 0, 2)
    after = recommend(live, result.version, live.users_of("cat") + live.users_of("cook"))
    cat_users = after.filter(pl.col("user_id").str.starts_with("cat-"))
    cook_users = after.filter(pl.col("user_id").str.starts_with("cook-"))
    # The new cat video is in nearly every cat lover's top 10, and in no cook's; the other way round too.
    assert cat_users.filter(pl.col("item_id") == "cat-new")["user_id"].n_unique() >= 0.8 * USERS_PER_TOPIC
    assert cook_users.filter(pl.col("item_id") == "cat-new").is_empty()
    assert cook_users.filter(pl.col("item_id") == "cook-new")["user_id"].n_unique() >= 0.8 * USERS_PER_TOPIC
    # The version it updates still serves the old catalogue.
    before = recommend(live, live.version, live.users_of("cat"), k=40)
    assert "cat-new" not in before["item_id"].to_list()
    similar = load_ranker(NAME, live.processed_dir, version=result.version).recommender.similar("cat-new", k=5)
    assert sum(topic_of(i) == "cat" for i in similar["item_id"]) >= 4
    # REST search of the new version finds the new video by its title, and carries its content embedding.
    served = load_ranker(NAME, live.processed_dir, version=result.version)
    found = served.rank(pd.DataFrame({"query": ["kitten playing"], "k": [3]}))
    assert found["item_id"][0] == "cat-new"
    assert len(served.search.content) == len(served.recommender.item_ids) == sum(map(len, TOPICS.values())) + 2


@pytest.mark.slow
def test_re_adding_an_existing_video_changes_its_title_not_the_catalogue_size(live: Live, tmp_path: Path) -> None:
    items = write_csv(tmp_path / "again.csv", [{"item_id": "surf-0", "title": "surfing the biggest waves"}])
    result = add_videos(CatalogueAddConfig(NAME, items=items, processed_dir=live.processed_dir, version=live.version))
    assert (result.added, result.updated) == (0, 1)
    recommender = load_ranker(NAME, live.processed_dir, version=result.version).recommender
    assert len(recommender.item_ids) == sum(len(t) for t in TOPICS.values())
    assert recommender.titles[recommender.item_lookup["surf-0"]] == "surfing the biggest waves"


@pytest.mark.slow
def test_a_new_video_is_decoded_from_its_file(live: Live, tmp_path: Path, shared_data: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(shared_data / "videos" / "moviepy" / "example3.mp4", media / "clip.mp4")
    items = write_csv(tmp_path / "clip.csv", [{"item_id": "hike-clip", "title": "mountain trail", "video": "clip.mp4"}])
    result = add_videos(CatalogueAddConfig(NAME, items=items, media_root=media, processed_dir=live.processed_dir,
                                           version=live.version, workers=1))
    assert result.added == 1
    manifests = pl.concat([pl.read_parquet(p) for p in
                           (live.processed_dir / NAME / "additions").glob("*/*/features/manifest.parquet")],
                          how="diagonal_relaxed")
    clip = manifests.filter(pl.col("item_id") == "hike-clip").row(0, named=True)
    assert clip["status"] == "ok" and clip["n_frames"] > 0
    # The 2 s clip is longer than the store's 1 s window: search of the new version returns where it matches.
    served = load_ranker(NAME, live.processed_dir, version=result.version)
    found = served.rank(pd.DataFrame({"query": ["mountain trail"], "k": [len(TOPICS) * 10 + 1]}))
    span = found.filter(pl.col("item_id") == "hike-clip").row(0, named=True)
    assert 0.0 <= span["start_s"] and span["end_s"] - span["start_s"] == pytest.approx(1.0, abs=0.05)
    assert span["end_s"] <= clip["duration"] + 1e-3
    assert found.filter(pl.col("item_id") == "hike-0").row(0, named=True)["start_s"] is None, "no video: no span"
    # The same batch again resumes its store: nothing is decoded twice.
    again = add_videos(CatalogueAddConfig(NAME, items=items, media_root=media, processed_dir=live.processed_dir,
                                          version=live.version, workers=1))
    assert again.added == 1 and again.version != result.version


@pytest.mark.slow
def test_views_of_one_kind_move_a_ranking_toward_it_and_unknown_videos_are_skipped(live: Live, tmp_path: Path
                                                                                   ) -> None:
    user = "cat-u0"
    views = [{"user_id": user, "item_id": f"surf-{i}", "timestamp": 1_800_000_000 + i} for i in range(6)]
    views.append({"user_id": user, "item_id": "no-such-video", "timestamp": 1_800_000_100})
    result = add_views(add_views_config(live, write_csv(tmp_path / "views.csv", views)))
    assert (result.rows_read, result.added, result.skipped) == (7, 6, {"video not in the catalogue": 1})
    before = recommend(live, live.version, [user], k=40)
    after = recommend(live, result.version, [user], k=40)
    others = [f"surf-{i}" for i in range(6, 10)]  # the surf videos they have not watched yet

    def rank_of_others(ranking: pl.DataFrame) -> float:
        return float(ranking.filter(pl.col("item_id").is_in(others))["rank"].mean())

    assert rank_of_others(after) < rank_of_others(before) - 3
    # What they watched is never recommended again.
    assert not set(after["item_id"]) & {f"surf-{i}" for i in range(6)}


@pytest.mark.slow
def test_a_new_user_with_added_views_is_ranked_from_them_not_by_popularity(live: Live, tmp_path: Path) -> None:
    views = [{"user_id": "newcomer", "item_id": f"hike-{i}", "timestamp": 1_800_000_000 + i} for i in range(4)]
    result = add_views(add_views_config(live, write_csv(tmp_path / "views.csv", views)))
    ranked = recommend(live, result.version, ["newcomer", "stranger"])
    newcomer = ranked.filter(pl.col("user_id") == "newcomer")["item_id"].to_list()
    popular = ranked.filter(pl.col("user_id") == "stranger")["item_id"].to_list()  # unknown: popularity
    assert newcomer != popular
    assert sum(topic_of(i) == "hike" for i in newcomer[:5]) >= 4


def post(url: str, rows: list[dict[str, object]]) -> tuple[pl.DataFrame, str]:
    """The predictions a running server answers for `rows`, and the version its header names."""
    body = json.dumps({"dataframe_records": rows}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return pl.DataFrame(json.loads(response.read())["predictions"]), response.headers["X-Recsys-Model-Version"]


@pytest.mark.slow
def test_a_running_server_follows_the_champion_to_an_update_and_answers_like_the_cli(
        live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str], mlflow_store: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "recsys"), "serve", "--dataset", NAME, "--port", str(port),
               "--follow-every", "1"]
    users = live.users_of("surf")[:3]
    rows = [{"user_id": user, "k": 5} for user in users]
    with ServerProcess(command, tmp_path / "serve.log", env=venv_env({"MLFLOW_TRACKING_URI": mlflow_store})) as server:
        server.wait_ready(f"{url}/ping", timeout=240)
        champion = str(champion_version(NAME).version)
        assert post(url, rows)[1] == champion
        items = write_csv(tmp_path / "new.csv", [{"item_id": "surf-new", "title": "surfing ocean waves"}])
        result = add_videos(CatalogueAddConfig(NAME, items=items, processed_dir=live.processed_dir))
        assert result.promoted and result.base_version == champion
        assert str(champion_version(NAME).version) == result.version
        deadline = time.monotonic() + 120
        while (answered := post(url, rows))[1] != result.version:  # no restart: the server loads the new champion
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.5)
        assert f"now serving models:/recsys-{NAME}/{result.version} (alias champion)" in server.log_tail()
    rest = answered[0]
    for user in users:
        assert main(["recommend", "--dataset", NAME, "--user-id", user, "-k", "5", "--format", "csv",
                     "--processed-dir", str(live.processed_dir)]) == 0
        captured = capsys.readouterr()
        assert f"models:/recsys-{NAME}/{result.version} (alias champion)" in captured.err
        cli = pl.read_csv(io.StringIO(captured.out))
        assert cli["item_id"].to_list() == rest.filter(pl.col("user_id") == user)["item_id"].to_list()


@pytest.mark.slow
def test_a_failed_batch_leaves_the_served_version_unchanged(live: Live, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    champion = str(champion_version(NAME).version)
    media = tmp_path / "media"
    media.mkdir()
    bad_items = write_csv(tmp_path / "bad.csv", [{"item_id": "ok-1", "title": "fine", "video": ""},
                                                 {"item_id": "evil", "title": "escape", "video": "../../etc/passwd"}])
    code = main(["catalogue", "add", NAME, "--items", str(bad_items), "--media-root", str(media),
                 "--processed-dir", str(live.processed_dir)])
    err = capsys.readouterr().err
    assert code == 1 and "bad.csv" in err and "../../etc/passwd" in err and "Traceback" not in err
    bad_views = write_csv(tmp_path / "views.csv", [{"user_id": "cat-u1", "item_id": "cat-1", "timestamp": "soon"}])
    code = main(["views", "add", NAME, "--interactions", str(bad_views), "--processed-dir", str(live.processed_dir)])
    err = capsys.readouterr().err
    assert code == 1 and "views.csv" in err and "'soon'" in err
    strict = write_csv(tmp_path / "strict.csv", [{"user_id": "cat-u1", "item_id": "ghost", "timestamp": 1}])
    with pytest.raises(RecsysError, match="ghost"):
        add_views(add_views_config(live, strict, strict=True))
    assert str(champion_version(NAME).version) == champion


def add_views_config(live: Live, path: Path, **changes: object):  # noqa: ANN201 - a ViewsAddConfig
    from recsys.config import ViewsAddConfig

    settings = {"interactions": path, "processed_dir": live.processed_dir, "version": live.version, **changes}
    return ViewsAddConfig(NAME, **settings)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_new_video_is_placed_by_its_viewers_and_its_explained_terms_add_up(live: Live, tmp_path: Path) -> None:
    """A video whose title says nothing is ranked from content alone; once cooks watch it, it is folded in
    where they are and reaches the other cooks' top 10."""
    items = write_csv(tmp_path / "vague.csv", [{"item_id": "mystery", "title": "new upload"}])
    videos = add_videos(CatalogueAddConfig(NAME, items=items, processed_dir=live.processed_dir, version=live.version))
    watchers, others = live.users_of("cook")[:8], live.users_of("cook")[8:]
    views = [{"user_id": u, "item_id": "mystery", "timestamp": 1_800_000_000 + i} for i, u in enumerate(watchers)]
    result = add_views(add_views_config(live, write_csv(tmp_path / "views.csv", views), version=videos.version))

    def mean_rank(version: str, users: list[str]) -> float:
        ranked = recommend(live, version, users, k=41)
        return float(ranked.filter(pl.col("item_id") == "mystery")["rank"].mean())

    cats = live.users_of("cat")
    # Once cooks watch it, it rises for the other cooks, and stands higher for them than for cat lovers.
    assert mean_rank(result.version, others) < mean_rank(videos.version, others)
    assert mean_rank(result.version, others) < mean_rank(result.version, cats)
    recommender = load_ranker(NAME, live.processed_dir, version=result.version).recommender
    explained = recommender.recommend(others[0], k=10, explain=True)
    row = explained.filter(pl.col("item_id") == "mystery").row(0, named=True)
    assert not row["from_content"]  # placed by its viewers now, scored like a watched video


@pytest.mark.slow
def test_the_served_ranking_is_the_evaluated_one_before_and_after_updates(live: Live, tmp_path: Path) -> None:
    users = [u for topic in TOPICS for u in live.users_of(topic)[:3]]
    assert served_mismatches(load_ranker(NAME, live.processed_dir, version=live.version), users) == []
    items = write_csv(tmp_path / "new.csv", [{"item_id": "hike-new", "title": "mountain hiking trail"}])
    videos = add_videos(CatalogueAddConfig(NAME, items=items, processed_dir=live.processed_dir, version=live.version))
    views = [{"user_id": u, "item_id": "hike-new", "timestamp": 1_800_000_000 + i}
             for i, u in enumerate(live.users_of("hike")[:5])]
    result = add_views(add_views_config(live, write_csv(tmp_path / "views.csv", views), version=videos.version))
    assert served_mismatches(load_ranker(NAME, live.processed_dir, version=result.version), users) == []
