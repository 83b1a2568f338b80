"""Text → video search on a tiny trained content model: topic queries, withheld titles, bad input, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch

from recsys.cli import main
from recsys.config import ConfigError, ContentConfig
from recsys.content.embed_items import trained_encoder
from recsys.content.title_encoder import TitleEncoder as TitleProjection
from recsys.content.title_encoder import save_title_projection
from recsys.content.train import train_content
from recsys.content.windows import embed_windows, window_starts, write_windows
from recsys.data.paths import PreparedPaths
from recsys.evaluation.search import Query, chance_metrics, search_metrics
from recsys.media.feature_store import MANIFEST, SOURCES, FeatureStore, write_array
from recsys.media.titles import TitleEncoder
from recsys.serving.export import input_example, log_ranker
from recsys.serving.pyfunc_model import Ranker, RequestError, write_bundle
from recsys.serving.recommend import Recommender, UnknownUserWarning
from recsys.serving.search import SearchWarning, VideoSearch, fit_lexical_weight, save_lexical_weight, tokenize
from recsys.synthetic.render import write_mp4
from recsys.threads import torch_threads
from recsys.twotower.trained_model import TwoTowerScorer, save_trained
from tests.content.content_store import write_store
from tests.evaluation.grouped_data import build_prepared
from tests.serving.test_explain import explained_model

DATASET = "synth"
TOPIC_TITLES = ("guitar concert melody", "cat kitten purring", "rocket galaxy astronaut")
"""Title of each topic's videos (the tiny store's topic k: its colour, motion and tone)."""
N_ITEMS = 36
WITHHELD = (0, 1, 2, 3, 4, 5)
"""Videos without a title (two per topic): only their frames, motion and sound can find them."""


def _topics() -> np.ndarray:
    return np.arange(N_ITEMS) % 3


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared `synth` dataset holding a feature store with MiniLM titles and a trained content model."""
    root = tmp_path_factory.mktemp("search")
    dataset = root / "processed" / DATASET
    dataset.mkdir(parents=True)
    (dataset / "meta.json").write_text("{}\n")
    topics = write_store(dataset / "features", n_items=N_ITEMS, topics=3, no_title=WITHHELD)
    titles = [("" if i in WITHHELD else f"{TOPIC_TITLES[t]} #{i}") for i, t in enumerate(topics)]
    write_array(dataset / "features", "title_embedding", TitleEncoder(None).encode(titles))
    pl.DataFrame({"item_idx": np.arange(N_ITEMS), "item_id": [f"item{i}" for i in range(N_ITEMS)],
                  "title": titles}).write_parquet(PreparedPaths(dataset).items)
    config = ContentConfig(dataset=DATASET, processed_dir=root / "processed", checkpoint_dir=root / "ckpt",
                           embedding_dim=16, hidden_dim=32, batch_size=12, max_epochs=15, patience=15, threads=1,
                           progress_bar=False, seed=0)
    with torch_threads(1):
        train_content(config)
    return root / "processed"


@pytest.fixture(scope="module")
def engine(processed: Path) -> VideoSearch:
    return VideoSearch.load(DATASET, processed)


@pytest.mark.slow
def test_a_topic_query_ranks_that_topic_s_videos_first(engine: VideoSearch) -> None:
    topics = _topics()
    for topic, query in enumerate(("guitar", "kitten", "astronaut in space")):
        ranking = engine.search(query, k=6)
        found = [topics[int(i.removeprefix("item"))] for i in ranking["item_id"]]
        assert found == [topic] * 6, (query, found)
        assert ranking["score"].is_sorted(descending=True)


@pytest.mark.slow
def test_a_video_without_a_title_is_found_by_its_content(engine: VideoSearch) -> None:
    topics = _topics()
    relevant = np.stack([topics == t for t in range(3)])[:, list(WITHHELD)]  # (3, 6)
    scores = np.stack([engine.rank_all(q).content[list(WITHHELD)] for q in ("guitar", "kitten", "rocket")])
    content = search_metrics(scores, relevant, k=2)
    assert content["ndcg_2"] > chance_metrics(relevant, k=2)["ndcg_2"] + 0.3
    # Their titles are empty, so the title match cannot tell them apart.
    assert not engine.rank_all("guitar").lexical[list(WITHHELD)].any()
    ranking = engine.search("guitar", k=N_ITEMS // 3)
    assert {"item0", "item3"} & set(ranking["item_id"])  # the untitled guitar videos among the guitar matches


@pytest.mark.slow
def test_lexical_weight_is_fitted_on_validation_queries_and_kept(engine: VideoSearch, processed: Path) -> None:
    queries = [Query(q, t, "word") for t, q in enumerate(("concert", "purring", "galaxy"))]
    weight, table = fit_lexical_weight(engine, queries, _topics())
    assert table[weight] == max(table.values()) and 0.0 <= weight <= 1.0
    folder = PreparedPaths.of(processed, DATASET).features
    path = save_lexical_weight(folder, 0.35, "test")
    try:
        assert VideoSearch.load(DATASET, processed).lexical_weight == 0.35
    finally:
        path.unlink()


# --------------------------------------------------------------------------------------------
# Requests on a catalogue with an untrained projection and a two-tower model (no training: fast)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> PreparedPaths:
    return build_prepared(tmp_path_factory.mktemp("grouped"))


@pytest.fixture(scope="module")
def recommender(paths: PreparedPaths) -> Recommender:
    model, info = explained_model(paths)
    return Recommender(paths, model=TwoTowerScorer(model, info=info), index_kind="exact")


def _untrained(recommender: Recommender, lexical_weight: float) -> VideoSearch:
    """Search over the catalogue's titles with random content embeddings and an untrained projection."""
    torch.manual_seed(0)
    n = len(recommender.item_ids)
    content = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    return VideoSearch(recommender.item_ids, recommender.titles, list(recommender.titles), content,
                       TitleProjection(8, hidden_dim=16), lexical_weight)


@pytest.fixture(scope="module")
def quick_engine(recommender: Recommender) -> VideoSearch:
    return _untrained(recommender, 0.3)


def test_bad_queries_get_clear_messages(quick_engine: VideoSearch) -> None:
    with pytest.raises(ConfigError, match="query is empty"):
        quick_engine.search("   ")
    with pytest.raises(ConfigError, match="k must be at least 1"):
        quick_engine.search("group", k=0)
    with pytest.warns(SearchWarning, match="only stop words.*content alone"):
        ranking = quick_engine.search("the of and", k=3)
    assert ranking.height == 3 and (ranking["lexical_score"] == 0).all()


def test_title_words_rank_the_videos_that_hold_them(recommender: Recommender) -> None:
    ranking = _untrained(recommender, 1.0).search("video 12", k=2)
    assert ranking["item_id"][0] == "12"  # the only title with "12"; "video" is in every title
    assert ranking["lexical_score"].to_list()[0] == 1.0 and ranking["lexical_score"][1] < 1.0


def test_bm25_reads_the_query_words_postings_as_bm25s_scores_them(quick_engine: VideoSearch) -> None:
    for query in ("group", "group 3", "video 12 of group", "group group 2", "1995 12 zebra", "zebra"):
        tokens = tokenize([query])[0]
        docs, raw = quick_engine.bm25_matches(tokens)
        full = np.asarray(quick_engine.bm25.get_scores(tokens), np.float32)  # (N,) bm25s' own pass
        assert docs.tolist() == np.flatnonzero(full).tolist(), query
        np.testing.assert_allclose(raw, full[docs], rtol=1e-6)
    assert not quick_engine.bm25_matches(["zebra"])[0].size, "a word in no title matches nothing"


def test_search_ranks_as_the_blend_over_every_video(quick_engine: VideoSearch) -> None:
    n = len(quick_engine.item_ids)
    assert n <= quick_engine.candidates  # so the candidates are every video: search must equal the full blend
    for query in ("group 3", "video 12", "group group 7 1995", "zebra"):
        blended = quick_engine.blend(quick_engine.rank_all(query))  # (N,)
        expected = np.lexsort((np.arange(n), -blended))[:10]
        ranking = quick_engine.search(query, k=10)
        assert ranking["item_id"].to_list() == quick_engine.item_ids[expected].tolist(), query
        np.testing.assert_allclose(ranking["score"].to_numpy(), blended[expected], atol=1e-5)


def test_a_repeated_query_reuses_its_embedding_and_the_cache_is_bounded(recommender: Recommender) -> None:
    engine = _untrained(recommender, 0.3)
    engine.query_cache_size = 2
    threads = torch.get_num_threads()
    first = engine.search("group 3", k=5)
    misses = engine.sentences.misses
    assert engine.search("group 3", k=5).equals(first) and engine.sentences.misses == misses, "no second encoding"
    engine.search("group 4")
    engine.search("group 5")  # "group 3" is now the least recently used: out
    assert list(engine._query_cache) == ["group 4", "group 5"]
    assert engine.search("group 3", k=5).equals(first) and engine.sentences.misses == misses + 3
    assert torch.get_num_threads() == threads, "a query's thread setting is the query's alone"


def test_a_user_re_ranks_the_best_matches_by_the_two_tower_score(quick_engine: VideoSearch,
                                                                 recommender: Recommender) -> None:
    plain = quick_engine.search("group", k=12)
    ranked = quick_engine.search("group", k=4, user_id="3", recommender=recommender, rerank_depth=12)
    assert set(ranked["item_id"]) <= set(plain["item_id"])
    assert ranked["taste_score"].is_sorted(descending=True) and ranked["rank"].to_list() == [1, 2, 3, 4]
    user = recommender.user_lookup["3"]
    scores = recommender.model.user_vectors(np.array([user]), [recommender.histories[user]]) @ \
        recommender.model.item_vectors().T  # (1, N) the one score
    expected = scores[0, [recommender.item_lookup[i] for i in plain["item_id"]]]
    assert ranked["taste_score"].to_list() == pytest.approx(sorted(expected, reverse=True)[:4], abs=1e-5)
    with pytest.warns(UnknownUserWarning, match="'nobody' is not known.*without their taste"):
        fallback = quick_engine.search("group", k=4, user_id="nobody", recommender=recommender)
    assert fallback["item_id"].to_list() == plain["item_id"].head(4).to_list()


@pytest.mark.slow
def test_cli_search_table_json_and_errors(processed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--processed-dir", str(processed)]
    assert main(["search", DATASET, "kitten", *base, "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "video", "score"] and len(lines) == 4
    assert all("cat kitten purring" in line or line.split()[1] in {"item1", "item4"} for line in lines[1:])
    assert main(["search", DATASET, "kitten", *base, "--output", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 10 and {"content_score", "lexical_score"} <= set(rows[0])
    assert main(["search", DATASET, "", *base]) == 1
    err = capsys.readouterr().err
    assert "recsys: error: the search query is empty" in err and "Traceback" not in err
    assert main(["search", "movielens-100k", "cat", *base]) == 1
    assert "recsys data prepare movielens-100k" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Search through the exported model (the pyfunc `query` field) on the same catalogue


RUN_ID = "run0"


@pytest.fixture(scope="module")
def bundle(paths: PreparedPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the grouped dataset with a two-tower model and the search files of `_untrained`'s engine."""
    model, info = explained_model(paths)
    save_trained(model, paths.root.parent, paths.root.name, RUN_ID, info)
    torch.manual_seed(0)
    n = pl.read_parquet(paths.items).height
    paths.features.mkdir(exist_ok=True)
    write_array(paths.features, "content_embedding", np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32))
    save_title_projection(TitleProjection(8, hidden_dim=16), paths.features)
    save_lexical_weight(paths.features, 0.3, "test")
    return write_bundle(tmp_path_factory.mktemp("bundle") / "bundle", paths.root.parent, paths.root.name, RUN_ID)


@pytest.fixture(scope="module")
def served_ranker(bundle: Path) -> Ranker:
    return Ranker(bundle)


def _cli_search(paths: PreparedPaths, query: str, k: int, user_id: str | None = None) -> pl.DataFrame:
    """What `recsys search` answers with the dataset's own files (the user's taste from run `RUN_ID`)."""
    engine = VideoSearch.load(paths.root.name, paths.root.parent)
    recommender = Recommender.load(paths.root.name, paths.root.parent, RUN_ID) if user_id is not None else None
    return engine.search(query, k, user_id, recommender)


def test_a_query_row_returns_the_search_results_of_the_cli(served_ranker: Ranker, paths: PreparedPaths) -> None:
    for query in ("group 3", "video 12", "zebra"):
        answer = served_ranker.rank(pd.DataFrame({"query": [query], "k": [5]}))
        expected = _cli_search(paths, query, 5)
        assert answer["item_id"].to_list() == expected["item_id"].to_list(), query
        assert answer["rank"].to_list() == [1, 2, 3, 4, 5] and (answer["query"] == query).all()
        np.testing.assert_allclose(answer["score"].to_numpy(), expected["score"].to_numpy(), atol=1e-6)
        assert answer["user_id"].is_null().all() and answer["taste_score"].is_null().all()
        assert answer["start_s"].is_null().all(), "no clip lengths in this store: no spans"


def test_a_query_row_with_a_user_is_re_ranked_by_their_taste(served_ranker: Ranker, paths: PreparedPaths) -> None:
    answer = served_ranker.rank(pd.DataFrame({"user_id": ["3"], "query": ["group"], "k": [4]}))
    expected = _cli_search(paths, "group", 4, user_id="3")
    assert answer["item_id"].to_list() == expected["item_id"].to_list()
    assert answer["taste_score"].is_sorted(descending=True) and (answer["user_id"] == "3").all()
    assert answer["item_id"].to_list() != _cli_search(paths, "group", 4)["item_id"].to_list(), "the taste reorders"


def test_search_and_recommendation_rows_are_answered_in_request_order(served_ranker: Ranker) -> None:
    request = pd.DataFrame({"user_id": ["3", None, "5"], "query": [None, "group 3", None], "k": [2, 3, 2]})
    answer = served_ranker.rank(request)
    assert answer["user_id"].to_list() == ["3", "3", None, None, None, "5", "5"]
    assert answer["query"].to_list() == [None, None, "group 3", "group 3", "group 3", None, None]
    alone = served_ranker.rank(pd.DataFrame({"user_id": ["3", "5"], "k": [2, 2]}))
    assert answer.filter(pl.col("query").is_null())["item_id"].to_list() == alone["item_id"].to_list()
    assert alone.columns == ["user_id", "rank", "item_id", "score", "title"], "recommendations alone: as before"
    with pytest.raises(RequestError, match="^row 2: unknown history video ID"):  # the request's row, not the 2nd
        served_ranker.rank(pd.DataFrame({"user_id": ["3", None, "5"], "query": [None, "group", None],
                                         "history": [None, None, ["nosuch"]]}))


@pytest.mark.parametrize(("row", "message"), [
    ({"query": "   "}, "row 0: the search query is empty: give some words"),
    ({"query": "the of and"}, "row 0: the query 'the of and' holds only stop words: no title words to match; add"),
    ({"query": 7}, "row 0: query must be a string of words, got 7"),
    ({"user_id": "3", "query": "group", "history": ["1"]}, "row 0: a search .query. re-ranks by the user's own"),
    ({"k": 3}, "no user_id column .nor a query column"),
])
def test_bad_query_rows_get_one_line_request_errors(served_ranker: Ranker, row: dict[str, object],
                                                    message: str) -> None:
    with pytest.raises(RequestError, match=message) as caught:
        served_ranker.rank(pd.DataFrame([row]))
    assert "\n" not in str(caught.value)


def test_rest_search_answers_from_the_logged_model_alone(bundle: Path, paths: PreparedPaths, tmp_path: Path) -> None:
    """Through MLflow: the model logged from the bundle, loaded back and asked over JSON as the server does."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    # An experiment of its own, its artifacts under tmp_path: the store's Default one keeps them in ./mlruns.
    experiment = mlflow.create_experiment(f"rest-search-{tmp_path.name}", artifact_location=tmp_path.as_uri())
    with mlflow.start_run(experiment_id=experiment):
        logged = log_ranker(bundle, input_example(paths))
    model = mlflow.pyfunc.load_model(logged.model_uri)
    schema = model.metadata.get_input_schema()
    body = json.dumps({"dataframe_records": [{"query": "group 3", "k": 4}, {"user_id": "3", "query": "group"}]})
    answer = scoring_server.invocations(body, "application/json", model, schema)
    assert answer.status == 200 and "NaN" not in answer.response, "nulls are JSON null"
    rows = pl.DataFrame(json.loads(answer.response)["predictions"])
    assert rows.filter(pl.col("user_id").is_null())["item_id"].to_list() == \
        _cli_search(paths, "group 3", 4)["item_id"].to_list()
    assert rows.filter(pl.col("user_id") == "3")["item_id"].to_list() == \
        _cli_search(paths, "group", 10, user_id="3")["item_id"].to_list()
    with pytest.raises(MlflowException, match="the search query is empty"):
        scoring_server.invocations(json.dumps({"dataframe_records": [{"query": ""}]}), "application/json", model,
                                   schema)


def test_cli_search_with_a_user_ranks_with_the_registered_version(
    served_ranker: Ranker, paths: PreparedPaths, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import recsys.serving.served_model as served_model

    def registered(dataset: str, processed_dir: Path, version: str | None, alias: str, index: str | None) -> Ranker:
        assert (dataset, version, alias) == (paths.root.name, None, "champion")
        served_ranker.version = "7"
        return served_ranker

    monkeypatch.setattr(served_model, "load_ranker", registered)
    base = ["--processed-dir", str(paths.root.parent), "--output", "json"]
    assert main(["search", paths.root.name, "group", "-k", "4", "--user-id", "3", *base]) == 0
    out, err = capsys.readouterr()
    assert "model: models:/recsys-movielens-100k/7 (alias champion)" in err
    served = served_ranker.rank(pd.DataFrame({"user_id": ["3"], "query": ["group"], "k": [4]}))
    assert [row["item_id"] for row in json.loads(out)] == served["item_id"].to_list()


# --------------------------------------------------------------------------------------------
# Time spans: where in a clip longer than one window the query matches


def test_windows_cover_a_clip_half_overlapping_to_its_end() -> None:
    assert window_starts(6, 6).tolist() == [0] and window_starts(4, 6).tolist() == [0]
    assert window_starts(24, 6).tolist() == [0, 3, 6, 9, 12, 15, 18]
    assert window_starts(14, 6).tolist() == [0, 3, 6, 8], "the last window ends with the clip"


def _two_topic_clip(path: Path, seconds: float = 6.0, fps: int = 8, size: int = 128, rate: int = 16_000) -> Path:
    """A clip that looks and sounds like topic 0 of the tiny store (a red square moving right, a tone in mel
    band 0) for its first half, then like topic 2 (blue, moving left, mel band 8): the store's look at 4x
    its size (decoded back to 32 px); tone and noise at the store's -20 and -60 dB."""
    from recsys.media.audio import mel_band_edges

    n = int(seconds * fps)
    side, speed = size * 6 // 32, size * 3 // 32 * 4 / fps  # the store's 6 px square, 3 px per frame at 4 fps
    frames = np.zeros((n, size, size, 3), np.uint8)
    for step in range(n):
        channel, direction = (2, -1) if step >= n // 2 else (0, 1)
        x = int(10 + direction * speed * step) % (size - side)
        frames[step, 50 : 50 + side, x : x + side, channel] = 255
    centres = mel_band_edges(rate, 16)[1:-1]  # the store's 16 mel bands
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(np.where(t < seconds / 2, centres[0], centres[8])) / rate  # no click between
    audio = 0.015 * np.sin(phase) + np.random.default_rng(0).normal(0, 5e-4, t.size)
    return write_mp4(path, frames, fps, audio.astype(np.float32), rate)


@pytest.mark.slow
def test_a_long_clip_returns_the_span_that_shows_the_query(processed: Path, tmp_path: Path) -> None:
    root = tmp_path / "processed"
    shutil.copytree(processed, root)
    features = PreparedPaths.of(root, DATASET).features
    clip_item = 8  # a topic-2 video ("rocket galaxy astronaut #8"), now 6 s long: 4 windows of 1.5 s
    clip = _two_topic_clip(tmp_path / "clip.mp4")
    pl.DataFrame({"item_idx": np.arange(N_ITEMS), "item_id": [f"item{i}" for i in range(N_ITEMS)],
                  "video_path": [str(clip) if i == clip_item else None for i in range(N_ITEMS)]}
                 ).write_parquet(features / SOURCES)
    manifest = pl.read_parquet(features / MANIFEST)
    manifest.with_columns(pl.when(pl.col("item_idx") == clip_item).then(6.0).otherwise(pl.col("duration"))
                          .alias("duration")).write_parquet(features / MANIFEST)
    windows = embed_windows(trained_encoder(features), FeatureStore.open(features))
    assert windows.item_idx.tolist() == [clip_item] * 7  # 1.5 s windows every 0.75 s over 6 s
    assert windows.start_s[0] == 0.0 and windows.end_s[-1] == pytest.approx(6.0)
    write_windows(features, windows)

    engine = VideoSearch.load(DATASET, root)
    spans = {}
    for query in ("astronaut in space", "guitar"):
        found = engine.search(query, k=N_ITEMS).filter(pl.col("item_id") == f"item{clip_item}").row(0, named=True)
        spans[query] = (found["start_s"], found["end_s"])
        assert found["end_s"] - found["start_s"] == pytest.approx(1.5, abs=0.01)
    assert spans["astronaut in space"][0] >= 3.0 - 0.75, spans  # the blue half (at most half a window before it)
    assert spans["guitar"][1] <= 3.0 + 0.75, spans
    # A clip of one window spans all of it.
    other = engine.search("kitten", k=3).row(0, named=True)
    assert other["start_s"] == 0.0 and other["end_s"] == pytest.approx(windows.seconds[int(other["item_id"][4:])])
