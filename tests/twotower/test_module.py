"""Training the two-tower model end to end on a tiny prepared dataset whose structure is known.

The dataset (written as MovieLens-100k files, then run through the real `prepare`): videos
belong to topics; each user follows one topic and watches its videos in a fixed cyclic order
from a random start. The next video is therefore predictable from the history, while every
video is about equally popular. One extra video per topic is never watched (cold start); its
"title embedding" in the feature store encodes its topic.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from recsys.cli import main
from recsys.config import PrepareConfig, RetrievalConfig
from recsys.data.paths import PreparedPaths
from recsys.data.prepare import prepare
from recsys.errors import DataFormatError, MissingInputError
from recsys.twotower.build import RetrievalResult, build_model, load_content
from recsys.twotower.datamodule import RetrievalDataModule, TrainWindows
from recsys.twotower.module import RetrievalObjective, sampled_softmax_loss
from recsys.twotower.new_videos import fit_new_video_scoring
from recsys.twotower.sparse import HISTORY_FEATURE
from recsys.twotower.train import train_retrieval
from recsys.twotower.trained_model import NEW_VIDEO_SCORING, load_trained
from recsys.twotower.validation import VAL_METRIC, ndcg_and_hits, rank_of_targets, validate
from tests.movielens_files import write_ml100k

TOPICS, PER_TOPIC, USERS_PER_TOPIC, EVENTS = 6, 10, 20, 8
DATASET = "movielens-100k"


def write_topic_dataset(root: Path, seed: int = 0) -> PreparedPaths:
    """Raw MovieLens-format files with topic-sequential users, prepared into `root/processed`."""
    rng = np.random.default_rng(seed)
    events = []
    user = 0
    for topic in range(TOPICS):
        for _ in range(USERS_PER_TOPIC):
            user += 1
            start = rng.integers(PER_TOPIC)
            for step in range(EVENTS):
                item = int(topic * PER_TOPIC + (start + step) % PER_TOPIC + 1)
                events.append((user, item, 4, 880000000 + user * 1000 + step))
    n_warm = TOPICS * PER_TOPIC
    titles = {i: f"Topic{topic_of_item_id(i)} video {i} (1995)" for i in range(1, n_warm + TOPICS + 1)}
    write_ml100k(root / "raw" / DATASET, events, titles)
    prepare(PrepareConfig(dataset=DATASET, raw_dir=root / "raw", processed_dir=root / "processed"))
    paths = PreparedPaths.of(root / "processed", DATASET)
    topics = item_topics(paths)
    noise = np.random.default_rng(seed + 1).normal(0, 0.1, (len(topics), 16))
    embedding = (np.eye(16)[topics] + noise).astype(np.float32)  # (N, 16) topic one-hot + noise
    paths.features.mkdir(parents=True)
    np.save(paths.features / "title_embedding.npy", embedding)
    return paths


def topic_of_item_id(item_id: int) -> int:
    n_warm = TOPICS * PER_TOPIC
    return (item_id - 1) // PER_TOPIC if item_id <= n_warm else item_id - n_warm - 1


def item_topics(paths: PreparedPaths) -> np.ndarray:
    """(N,) topic of each item_idx, read back from the prepared titles."""
    items = pl.read_parquet(paths.items).sort("item_idx")
    return items["title"].str.extract(r"Topic(\d+)").cast(pl.Int64).to_numpy()


def quick_config(paths: PreparedPaths, **changes: object) -> RetrievalConfig:
    config = RetrievalConfig(dataset=DATASET, processed_dir=paths.root.parent, dim=32, batch_size=64,
                             max_epochs=12, patience=4, threads=1, progress_bar=False)
    return replace(config, **changes)


@pytest.fixture(scope="module")
def topic_data(tmp_path_factory: pytest.TempPathFactory) -> PreparedPaths:
    return write_topic_dataset(tmp_path_factory.mktemp("topics"))


@pytest.fixture(scope="module")
def trained(topic_data: PreparedPaths) -> RetrievalResult:
    return train_retrieval(quick_config(topic_data))


def popularity_ndcg(paths: PreparedPaths) -> float:
    """Validation NDCG@10 of the most-popular ranking (train items excluded), by the same ranking code."""
    counts = pl.read_parquet(paths.popularity).sort("item_idx")["count"].to_numpy().astype(np.float32)
    train = pl.read_parquet(paths.train)
    valid = pl.read_parquet(paths.valid).sort("user_idx")
    rows = valid.with_row_index("row").join(train, on="user_idx", suffix="_seen")
    scores = torch.from_numpy(np.tile(counts, (valid.height, 1)))
    ranks = rank_of_targets(scores, torch.from_numpy(valid["item_idx"].to_numpy()),
                            torch.from_numpy(rows["row"].cast(pl.Int64).to_numpy()),
                            torch.from_numpy(rows["item_idx_seen"].to_numpy())).float()
    return float(torch.where(ranks < 10, 1 / torch.log2(ranks + 2), torch.zeros_like(ranks)).mean())


# ---------------------------------------------------------------------------------------------- the loss


def test_accidental_hits_are_masked_and_logq_correction_favours_popular_negatives() -> None:
    torch.manual_seed(0)
    users, items = torch.randn(4, 8), torch.randn(4, 8)
    targets = torch.tensor([5, 6, 5, 7])
    loss = sampled_softmax_loss(users, items, targets, 1.0, None)
    # Row 0's duplicate target (row 2) is not a negative for it: identical to dropping that column.
    def manual(logits: torch.Tensor) -> list[torch.Tensor]:
        return [torch.logsumexp(logits[i, [j for j in range(4) if j == i or targets[j] != targets[i]]], 0)
                - logits[i, i] for i in range(4)]

    logits = users @ items.T  # (4, 4)
    torch.testing.assert_close(loss, torch.stack(manual(logits)).mean())
    # logQ: every logit of a column drops by the log sampling probability of that column's item, so a
    # frequently sampled item pushes the other rows' scores down less.
    log_q = torch.tensor([0.0, 0.0, 0.0, 5.0])
    corrected = manual(logits - log_q)
    torch.testing.assert_close(sampled_softmax_loss(users, items, targets, 1.0, log_q), torch.stack(corrected).mean())
    assert all(c < u for c, u in zip(corrected[:3], manual(logits)[:3], strict=True))
    # Examples of one group (one user's window) are not negatives of each other: rows 1 and 3 here.
    groups = torch.tensor([0, 1, 2, 1])
    grouped = sampled_softmax_loss(users, items, targets, 1.0, None, groups=groups)
    by_hand = [torch.logsumexp(logits[i, [j for j in range(4) if j == i or (targets[j] != targets[i]
                                                                      and groups[j] != groups[i])]], 0)
               - logits[i, i] for i in range(4)]
    torch.testing.assert_close(grouped, torch.stack(by_hand).mean())


def test_uniform_negatives_equal_to_the_target_are_masked() -> None:
    user, item = torch.ones(1, 4), torch.ones(1, 4)
    target = torch.tensor([3])
    assert sampled_softmax_loss(user, item, target, 1.0, None) == 0  # alone in its batch: nothing to beat
    extra = torch.ones(2, 4)
    masked = sampled_softmax_loss(user, item, target, 1.0, None, extra, torch.tensor([3, 3]), 0.0)
    assert masked == 0  # the "negatives" are the target itself
    real = sampled_softmax_loss(user, item, target, 1.0, None, extra, torch.tensor([3, 8]), 0.0)
    torch.testing.assert_close(real, torch.log(torch.tensor(2.0)))  # one real negative as close as the target


@pytest.mark.parametrize("ids, content", [(True, "title"), (False, "title"), (True, "none")])
def test_the_content_only_loss_scores_every_target_from_its_content_alone(
    topic_data: PreparedPaths, ids: bool, content: str
) -> None:
    data = RetrievalDataModule(topic_data, batch_size=64)
    data.setup("fit")
    batch = data.train_batch(np.arange(16))
    config = quick_config(topic_data, ids=ids, content=content)
    model = build_model(config, data, load_content(topic_data, content, data.n_items)).eval()  # no dropout

    def loss(weight: float) -> torch.Tensor:
        return RetrievalObjective(model, data.item_probabilities(), 0.1, True, 0, content_only_weight=weight)(batch)

    if not (ids and content != "none"):  # content-only and ID-only models: nothing to add
        torch.testing.assert_close(loss(0.5), loss(0.0))
        return
    users, _ = model(batch.features, batch.target_rows, batch.target_steps)
    probabilities = torch.as_tensor(data.item_probabilities(), dtype=torch.float32)
    log_q = torch.log(probabilities)[batch.targets] + math.log(len(batch))
    new_videos = model.item_tower(batch.targets, None)  # (P, D): the targets as if nobody had watched them
    by_hand = sampled_softmax_loss(users, new_videos, batch.targets, 0.1, log_q, groups=batch.target_rows)
    torch.testing.assert_close(loss(0.5), loss(0.0) + 0.5 * by_hand)
    assert by_hand > 0


def test_rank_ignores_excluded_items() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4]])
    ranks = rank_of_targets(scores, torch.tensor([2, 0]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert ranks.tolist() == [1, 3]
    tied = rank_of_targets(torch.full((1, 3), 0.5), torch.tensor([1]), torch.tensor([], dtype=torch.long),
                           torch.tensor([], dtype=torch.long))
    assert tied.tolist() == [1]  # a tie earns no credit: the lower index goes first


@pytest.mark.parametrize("max_history", [1, 4, 50])
def test_training_windows_score_every_target_once_from_exactly_the_videos_before_it(
    topic_data: PreparedPaths, max_history: int
) -> None:
    data = RetrievalDataModule(topic_data, max_history=max_history, batch_size=64)
    data.setup("fit")
    assert data.train_log is not None and data.windows is not None
    batch = data.train_batch(np.arange(len(data.windows)))
    history = batch.features.items.to_dict()["history"]
    inputs = [h.numpy() for h in torch.split(history.values(), history.lengths().tolist())]
    assert all(len(x) <= max_history for x in inputs)
    # Every training interaction is a target exactly once, and its user's sequence is known from the log.
    assert len(batch) == len(data.train_log)
    sequences = {u: data.train_log.items[data.train_log.users == u] for u in np.unique(data.train_log.users)}
    seen_per_user: dict[int, int] = {}
    users = batch.features.users.values().numpy()
    shortest = min(max_history - TrainWindows.targets_per_window(max_history) + 1, max_history)
    for target, row, step in zip(batch.targets.tolist(), batch.target_rows.tolist(), batch.target_steps.tolist(),
                                 strict=True):
        user = int(users[row])
        position = seen_per_user.get(user, 0)  # targets come in time order within a user
        seen_per_user[user] = position + 1
        sequence = sequences[user]
        assert target == sequence[position]
        earlier = inputs[row][:step]
        assert earlier.tolist() == sequence[position - step:position].tolist()  # exactly the videos before it
        assert step >= min(position, shortest)  # and never fewer than a window guarantees
    assert seen_per_user == {u: len(s) for u, s in sequences.items()}


def test_validation_ranks_a_fixed_sample_of_users_when_asked(topic_data: PreparedPaths) -> None:
    every = RetrievalDataModule(topic_data, validation_users=0)
    every.setup("fit")
    pairs = set(zip(every.valid_users.tolist(), every.valid_items.tolist(), strict=True))
    samples = []
    for _ in range(2):
        data = RetrievalDataModule(topic_data, validation_users=10)
        data.setup("fit")
        samples.append(list(zip(data.valid_users.tolist(), data.valid_items.tolist(), strict=True)))
        rows = sum(len(batch) for batch in data.val_dataloader())
        assert rows == 10
    assert samples[0] == samples[1]  # the same users every time (and so every epoch)
    assert len(set(samples[0])) == 10 and set(samples[0]) <= pairs  # each user's own validation target
    assert len(pairs) > 10


def test_the_coefficients_are_fitted_on_validation_users_disjoint_from_those_picking_the_checkpoint(
        topic_data: PreparedPaths) -> None:
    every = RetrievalDataModule(topic_data, validation_users=0)
    every.setup("fit")
    checkpoint, fit = set(every.valid_users.tolist()), set(every.fit_users.tolist())
    assert not checkpoint & fit  # no user judges the model whose coefficients they fitted
    assert checkpoint | fit == set(every.fresh_users.tolist()) and abs(len(checkpoint) - len(fit)) <= 1
    assert sum(len(batch) for batch in every.fit_dataloader()) == len(fit)
    capped = RetrievalDataModule(topic_data, validation_users=10)
    capped.setup("fit")
    assert len(capped.valid_users) == len(capped.fit_users) == 10
    assert not set(capped.valid_users.tolist()) & set(capped.fit_users.tolist())


# ---------------------------------------------------------------------------------------------- training


def test_training_learns_the_sequences_and_beats_popularity(trained: RetrievalResult, topic_data: PreparedPaths
                                                            ) -> None:
    losses = [epoch["train_loss"] for epoch in trained.history]
    assert losses[-1] < 0.7 * losses[0]
    assert trained.content_source == "title"  # auto picks the title embedding when no fused one exists
    baseline = popularity_ndcg(topic_data)
    assert baseline < 0.3
    assert trained.best_val_ndcg > baseline + 0.4
    run = mlflow.get_run(trained.run_id)
    assert run.data.tags["recsys.step"] == "train_retrieval"
    assert "recsys.input.prepared" in run.data.tags
    per_epoch = mlflow.MlflowClient().get_metric_history(trained.run_id, "val_ndcg_10")
    assert len(per_epoch) == trained.epochs
    assert max(m.value for m in per_epoch) == pytest.approx(trained.best_val_ndcg)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(trained.run_id, "checkpoint")}
    assert "checkpoint/best.ckpt" in artifacts


def test_cold_items_are_ranked_by_their_content(trained: RetrievalResult, topic_data: PreparedPaths) -> None:
    scorer = load_trained(topic_data.root.parent, DATASET, trained.run_id)
    topics = item_topics(topic_data)
    counts = pl.read_parquet(topic_data.popularity).sort("item_idx")["count"].to_numpy()
    cold = np.flatnonzero(counts == 0)
    assert len(cold) == TOPICS
    embeddings = scorer.item_embeddings()  # (N, D)
    warm = np.flatnonzero(counts > 0)
    for item in cold:
        nearest = warm[np.argsort(-(embeddings[warm] @ embeddings[item]))[:5]]
        assert (topics[nearest] == topics[item]).mean() >= 0.8
    # Among the cold items, a user's own topic comes first.
    histories = [warm[topics[warm] == t][:4] for t in range(TOPICS)]
    scores = scorer.score(np.full(TOPICS, -1), histories)[:, cold]  # (topics, cold items)
    assert (topics[cold][scores.argmax(axis=1)] == np.arange(TOPICS)).all()


def test_new_video_scoring_follows_how_often_validation_targets_are_new_videos(
    trained: RetrievalResult, topic_data: PreparedPaths
) -> None:
    scorer = load_trained(topic_data.root.parent, DATASET, trained.run_id)
    data = RetrievalDataModule(topic_data)
    data.setup("fit")
    # This dataset's validation targets are all watched videos: boosting the new ones only hurts.
    assert scorer.new_video_scoring.bias == 0
    # Had every user's validation target been the new video of their topic, lifting new videos pays.
    topics = item_topics(topic_data)
    new_video_of_topic = {topics[i]: i for i in np.flatnonzero(~data.known_items)}
    targets = np.array([new_video_of_topic[t] for t in topics[data.valid_items]])
    batch = data.eval_batch(data.valid_users, targets)
    scoring, ndcg, plain = fit_new_video_scoring(scorer.model, [batch])
    assert scoring.bias > 0 and ndcg > plain[VAL_METRIC] + 0.1
    assert plain == pytest.approx(validate(scorer.model, [batch]))
    # The scorer, which serves the fitted scoring as one inner product, ranks exactly as the fit did.
    scorer.info[NEW_VIDEO_SCORING] = scoring.to_dict()
    history = batch.features.items[HISTORY_FEATURE]
    histories = np.split(history.values().numpy(), np.cumsum(history.lengths().numpy())[:-1])
    served = scorer.score(data.valid_users, histories)
    assert float(ndcg_and_hits(torch.from_numpy(served), batch)[0].mean()) == pytest.approx(ndcg, abs=1e-6)


def test_fresh_views_lift_the_new_videos_that_other_people_watch_now(trained: RetrievalResult,
                                                                    topic_data: PreparedPaths) -> None:
    scorer = load_trained(topic_data.root.parent, DATASET, trained.run_id)
    data = RetrievalDataModule(topic_data)
    data.setup("fit")
    # Users of topics 0-2 watch their topic's new video next; users of topics 3-5 a watched video.
    # Content tells each user's new video; only the fresh views tell which of them people watch.
    topics = item_topics(topic_data)
    new_video_of_topic = {topics[i]: i for i in np.flatnonzero(~data.known_items)}
    user_topics = topics[data.fresh_items]
    targets = np.where(user_topics < 3, [new_video_of_topic[t] for t in user_topics], data.fresh_items)
    batch = data.eval_batch(data.fresh_users, targets)
    model = scorer.model
    model.fresh_view_users.copy_(torch.from_numpy(data.fresh_users))
    model.fresh_view_items.copy_(torch.from_numpy(targets))
    with_fresh, ndcg, _ = fit_new_video_scoring(model, [batch])
    model.spec = replace(model.spec, fresh_views=0)
    without_fresh, ndcg_without, _ = fit_new_video_scoring(model, [batch])
    model.spec = replace(model.spec, fresh_views=len(targets))
    assert without_fresh.fresh_weight == 0 and with_fresh.fresh_weight > 0
    assert ndcg > ndcg_without + 0.05
    # Each user's own fresh view (the target) did not count: served scores rank as the fit did.
    scorer.info[NEW_VIDEO_SCORING] = with_fresh.to_dict()
    history = batch.features.items[HISTORY_FEATURE]
    histories = np.split(history.values().numpy(), np.cumsum(history.lengths().numpy())[:-1])
    served = scorer.score(data.fresh_users, histories)
    assert float(ndcg_and_hits(torch.from_numpy(served), batch)[0].mean()) == pytest.approx(ndcg, abs=1e-6)


def test_scores_add_the_new_video_terms_to_new_videos_only(trained: RetrievalResult, topic_data: PreparedPaths
                                                           ) -> None:
    scorer = load_trained(topic_data.root.parent, DATASET, trained.run_id)
    histories = [np.array([0, 1, 2]), np.array([30, 31])]
    users = np.array([0, -1])
    cosine = scorer.user_embeddings(users, histories) @ scorer.item_embeddings().T  # (2, N)
    new = ~scorer.model.item_tower.known_items.numpy()
    membership = scorer.model.cluster_membership.numpy()  # (N, K)
    assert membership.shape[1] == 20 and np.allclose(membership.sum(axis=1), 1.0, atol=1e-5)
    # The history's cluster shares, every view alike.
    log_shares = [np.log(membership[history].mean(axis=0) + 0.01) for history in histories]
    taste = np.array(log_shares) @ membership.T  # (2, N)
    # Fresh views are the validation interactions: log(N (c + 1) / (T + N)) of each video's count c,
    # user 0's own fresh view left out of what user 0 sees.
    valid = pl.read_parquet(topic_data.valid)
    n = len(new)
    counts = np.tile(np.bincount(valid["item_idx"].to_numpy(), minlength=n).astype(np.float64), (2, 1))  # (2, N)
    counts[0, valid.filter(pl.col("user_idx") == 0)["item_idx"].to_numpy()] -= 1
    fresh = np.log(n * (counts + 1) / (valid.height + n))  # (2, N)
    scorer.info[NEW_VIDEO_SCORING] = {"weight": 0.5, "taste_weight": 0.2, "bias": 0.25, "fresh_weight": 0.1,
                                      "watched_fresh_weight": 0.05}
    scores = scorer.score(users, histories)
    np.testing.assert_allclose(scores[:, new], 0.5 * cosine[:, new] + 0.2 * taste[:, new] + 0.1 * fresh[:, new]
                               + 0.25, atol=1e-5)
    np.testing.assert_allclose(scores[:, ~new], cosine[:, ~new] + 0.05 * fresh[:, ~new], atol=1e-5)
    # A model saved before this scoring existed kept one offset for new videos.
    legacy = load_trained(topic_data.root.parent, DATASET, trained.run_id)
    legacy.info = {"cold_item_bias": 0.25}
    expected = np.broadcast_to(0.25 * new, cosine.shape)
    np.testing.assert_allclose(legacy.score(users, histories) - cosine, expected, atol=1e-5)


def test_an_unseen_user_with_a_history_gets_the_next_video(trained: RetrievalResult, topic_data: PreparedPaths
                                                           ) -> None:
    scorer = load_trained(topic_data.root.parent, DATASET, trained.run_id)
    items = pl.read_parquet(topic_data.items).sort("item_idx")
    index_of = dict(zip(items["item_id"].cast(pl.Int64).to_list(), items["item_idx"].to_list(), strict=True))
    topic = 2
    watched = [index_of[topic * PER_TOPIC + k] for k in range(1, 6)]  # videos 1..5 of the topic, in order
    scores = scorer.score(np.array([-1]), [np.array(watched)])[0]
    scores[watched] = -math.inf
    top = np.argsort(-scores)[:3]
    assert index_of[topic * PER_TOPIC + 6] in top.tolist()


def test_missing_inputs_are_reported_clearly(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="holds no prepared dataset"):
        train_retrieval(RetrievalConfig(dataset=DATASET, processed_dir=tmp_path))
    paths = write_topic_dataset(tmp_path)
    with pytest.raises(MissingInputError, match="content_embedding.npy does not exist"):
        train_retrieval(quick_config(paths, content="fused"))
    with pytest.raises(MissingInputError, match="--resume: no unfinished train_retrieval run of movielens-100k"):
        train_retrieval(quick_config(paths, content="none", resume="latest"))
    np.save(paths.features / "title_embedding.npy", np.zeros((3, 16), np.float32))
    with pytest.raises(DataFormatError, match=r"expected \(66, D\) rows"):
        train_retrieval(quick_config(paths, content="title"))


def test_cli_trains_an_id_only_model(topic_data: PreparedPaths, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "retrieval", DATASET, "--processed-dir", str(topic_data.root.parent), "--content", "none",
                 "--max-epochs", "1", "--batch-size", "64", "--threads", "1", "--no-progress-bar"])
    assert code == 0
    out = capsys.readouterr().out
    assert "two-tower model (content: none) trained 1 epoch(s)" in out
    scorer = load_trained(topic_data.root.parent, DATASET)
    assert scorer.spec.content_dim == 0 and scorer.spec.use_ids
