"""Content training: the losses, the DataModule over the feature store, `train_content` writing embeddings
for every item, and (slow) learning on the synthetic corpus: the fused embedding beats every single one."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from recsys.cli import main
from recsys.config import ContentConfig, IngestConfig, PrepareConfig, SynthConfig
from recsys.content.datamodule import ContentDataModule
from recsys.content.encoder import MODALITIES, ContentEncoder, EncoderSpec
from recsys.content.module import ContentModule, cross_modal_retrieval, info_nce
from recsys.content.temporal import random_crop, reverse_time
from recsys.content.train import ExtractedEmbeddings, _log_plots, extract_embeddings, topic_probe, train_content
from recsys.errors import MissingInputError
from recsys.media.feature_store import FeatureStore
from recsys.threads import torch_threads
from recsys.tracking.store import start_run
from tests.content.content_store import write_store
from tests.plot_artifacts import plot_artifacts
from tests.tiny_model import TinyModel

DATASET = "synth"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster than several contending for a shared CPU."""
    with torch_threads(1):
        yield


def prepared_store(root: Path, **store: object) -> tuple[Path, np.ndarray]:
    """A processed dir whose `synth` dataset has only what content training reads: meta.json + a store."""
    dataset = root / "processed" / DATASET
    dataset.mkdir(parents=True)
    (dataset / "meta.json").write_text("{}\n")
    topics = write_store(dataset / "features", **store)  # type: ignore[arg-type]
    return root / "processed", topics


def small_config(processed: Path, tmp_path: Path, **overrides: object) -> ContentConfig:
    values: dict[str, object] = dict(dataset=DATASET, processed_dir=processed, checkpoint_dir=tmp_path / "ckpt",
                                     embedding_dim=16, hidden_dim=32, batch_size=8, max_epochs=2, threads=1,
                                     progress_bar=False)
    return ContentConfig(**{**values, **overrides})  # type: ignore[arg-type]


def test_info_nce_is_low_for_matching_rows_and_high_for_shuffled_ones() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    matched = info_nce(a, a, scale)
    shuffled = info_nce(a, a[torch.randperm(16, generator=g)], scale)
    assert matched < math.log(16) < shuffled


def test_cross_modal_retrieval_is_perfect_for_aligned_modalities() -> None:
    g = torch.Generator().manual_seed(0)
    shared = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=-1)
    stacked = shared.unsqueeze(1).repeat(1, len(MODALITIES), 1)  # (20, M, 8)
    mask = torch.ones(20, len(MODALITIES), dtype=torch.bool)
    metrics = cross_modal_retrieval(stacked, mask)
    assert metrics["val_r1"] == 1.0
    stacked[:, MODALITIES.index("audio")] = stacked[torch.randperm(20, generator=g), 2]
    assert cross_modal_retrieval(stacked, mask)["val_r1_audio_title"] < 0.5


def test_crops_are_contiguous_windows_of_valid_frames_and_reversal_reverses() -> None:
    mask = torch.tensor([[True] * 8 + [False] * 2, [True] * 4 + [False] * 6])
    crop = random_crop(mask, 0.5, 0.5, generator=torch.Generator().manual_seed(0))
    assert crop.sum(1).tolist() == [4, 2]
    assert not (crop & ~mask).any()
    for row in crop:
        on = row.nonzero().squeeze(1)
        assert (on.diff() == 1).all()  # one contiguous window
    x = torch.arange(10.0).view(1, 10, 1).repeat(2, 1, 1)
    flipped, flipped_mask = reverse_time(x, mask)
    assert flipped[1, :4, 0].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert flipped_mask[1].tolist() == [True] * 4 + [False] * 6


def test_only_an_order_aware_encoder_learns_the_arrow_of_time() -> None:
    """The motion loss asks a crop of a clip to prefer another crop of it over that crop played backwards:
    mean pooling scores both alike, so its loss stays at log 2; the GRU learns to go well below."""
    losses = {}
    for kind in ("gru", "mean"):
        torch.manual_seed(0)
        encoder = ContentEncoder(EncoderSpec(embedding_dim=8, hidden_dim=16, n_mels=16, temporal=kind))  # type: ignore[arg-type]
        module = ContentModule(encoder)
        features = torch.randn(16, 8, encoder.frame_cnn.out_dim)  # (B, T, F): 16 clips of 8 frames
        mask = torch.ones(16, 8, dtype=torch.bool)
        stacked = torch.zeros(16, len(MODALITIES), 8)
        present = torch.ones(16, len(MODALITIES), dtype=torch.bool)
        optimiser = torch.optim.Adam(encoder.temporal.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            motion, _ = module._views(features, mask, stacked, present, stacked.sum() * 0, g)
            optimiser.zero_grad()
            motion.backward()
            optimiser.step()
        losses[kind] = motion.item()
    assert losses["mean"] == pytest.approx(math.log(2), abs=1e-4)
    assert losses["gru"] < 0.25 * math.log(2)


def test_gru_tells_apart_topics_that_differ_only_in_motion_and_mean_pooling_cannot(tmp_path: Path) -> None:
    """Two topics with the same look, sound and title, moving opposite ways: after the real training
    objective, a linear probe finds the topic in the GRU's motion embedding, not in mean pooling's
    (chance: 0.5; over store seeds 0, 1, 2 the GRU scored 0.76, 0.82, 0.81 and mean pooling 0.57, 0.53, 0.49)."""
    topics = write_store(tmp_path / "features", n_items=96, topics=2, motion_only=True)
    data = ContentDataModule(tmp_path / "features", batch_size=16)
    data.setup("fit")
    assert data.arrays is not None
    accuracy = {}
    for kind in ("gru", "mean"):
        torch.manual_seed(0)
        module = ContentModule(ContentEncoder(EncoderSpec(embedding_dim=16, hidden_dim=32, n_mels=16, temporal=kind)))  # type: ignore[arg-type]
        optimiser = module.configure_optimizers()["optimizer"]
        module.train()
        for _ in range(20):  # the training step without the Trainer: a few seconds per encoder
            for batch in data.train_dataloader():
                terms, _ = module.losses(module.augment(batch))
                optimiser.zero_grad()
                module.total(terms).backward()
                optimiser.step()
        embeddings = extract_embeddings(module.encoder, data.arrays)
        accuracy[kind] = topic_probe(embeddings.modality("motion"), topics, seed=0)
    assert accuracy["gru"] >= 0.65 and accuracy["mean"] <= 0.6, accuracy
    assert accuracy["gru"] >= accuracy["mean"] + 0.15, accuracy


def test_distillation_needs_collaborative_embeddings_and_skips_cold_items() -> None:
    encoder = ContentEncoder(EncoderSpec(embedding_dim=8, hidden_dim=16, n_mels=16))
    with pytest.raises(ValueError, match="collaborative"):
        ContentModule(encoder, distill_weight=1.0)
    collab = torch.randn(6, 4)
    collab[4:] = 0  # cold items: no collaborative embedding
    module = ContentModule(encoder, distill_weight=1.0, collab_embeddings=collab)
    fused = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    zero = fused.sum() * 0
    assert module._distill(fused, torch.tensor([4, 5]), zero) == 0  # only cold items: nothing to align
    assert module._distill(fused, torch.arange(6), zero) > 0


def test_datamodule_trains_on_ok_items_only_with_a_seeded_disjoint_split(tmp_path: Path) -> None:
    write_store(tmp_path / "features", n_items=30, failed=(2, 7))
    data = ContentDataModule(tmp_path / "features", batch_size=8, val_fraction=0.2, seed=3)
    data.setup("fit")
    assert set(data.train_rows) | set(data.val_rows) == set(range(30)) - {2, 7}
    assert not set(data.train_rows) & set(data.val_rows)
    assert len(data.val_rows) == round(0.2 * 28)
    again = ContentDataModule(tmp_path / "features", batch_size=8, val_fraction=0.2, seed=3)
    again.setup("fit")
    assert again.val_rows.tolist() == data.val_rows.tolist()
    batch = next(iter(data.val_dataloader()))
    assert batch.frames.shape == (6, 6, 32, 32, 3) and batch.frames.dtype == torch.uint8
    assert batch.item_idx.tolist() == data.val_rows.tolist()
    assert sum(len(b.item_idx) for b in data.train_dataloader()) >= len(data.train_rows) - 1


def test_missing_feature_store_says_to_run_ingest(tmp_path: Path) -> None:
    dataset = tmp_path / "processed" / DATASET
    dataset.mkdir(parents=True)
    (dataset / "meta.json").write_text("{}\n")
    with pytest.raises(MissingInputError, match="recsys ingest"):
        train_content(small_config(tmp_path / "processed", tmp_path))


def test_train_content_writes_embeddings_for_every_item_and_logs_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    processed, _ = prepared_store(tmp_path, n_items=24, failed=(3,), no_audio=(4, 9), no_title=(5,))
    code = main(["train", "content", DATASET, "--processed-dir", str(processed), "--checkpoint-dir",
                 str(tmp_path / "ckpt"), "--embedding-dim", "16", "--hidden-dim", "32", "--batch-size", "8",
                 "--max-epochs", "2", "--threads", "1", "--no-progress-bar"])
    assert code == 0
    assert "embeddings of every item" in capsys.readouterr().out

    store = FeatureStore.open(processed / DATASET / "features")
    fused = store.array("content_embedding")
    assert fused.shape == (24, 16) and fused.dtype == np.float32
    for name in MODALITIES:
        assert store.array(f"embedding_{name}").shape == (24, 16)
    norms = np.linalg.norm(fused, axis=1)
    assert np.allclose(norms[np.arange(24) != 3], 1.0, atol=1e-5)  # every usable item is embedded
    assert norms[3] == 0  # the failed item has no modality at all
    assert np.abs(store.array("embedding_audio")[[4, 9]]).sum() == 0
    assert np.abs(store.array("embedding_title")[5]).sum() == 0
    assert np.allclose(np.linalg.norm(store.array("embedding_motion")[[4, 5]], axis=1), 1.0, atol=1e-5)

    info = json.loads((store.folder / "content.json").read_text())
    assert info["D"] == 16 and info["present"]["audio"] == 24 - 3 and info["no_modality"] == 1
    run = mlflow.get_run(info["run_id"])
    assert run.data.tags["recsys.step"] == "content"
    assert run.data.params["embedding_dim"] == "16"
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(info["run_id"], "val_loss")) == 2  # one value per epoch
    assert len(client.get_metric_history(info["run_id"], "train_motion_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(info["run_id"], "plots")}
    assert {"plots/content_training.png", "plots/fusion_weights.png"} <= artifacts
    assert client.list_artifacts(info["run_id"], "checkpoint")
    assert Path(info["checkpoint"]).exists()


def test_same_seed_gives_the_same_embeddings(tmp_path: Path) -> None:
    processed, _ = prepared_store(tmp_path, n_items=16)
    store = processed / DATASET / "features"
    first = train_content(small_config(processed, tmp_path, max_epochs=1))
    a = np.load(store / "content_embedding.npy")
    second = train_content(small_config(processed, tmp_path, max_epochs=1))
    np.testing.assert_allclose(np.load(store / "content_embedding.npy"), a, atol=1e-5)
    assert first["run_id"] != second["run_id"]


# ---------------------------------------------------------------------------------------------
# Learning on the synthetic corpus (real videos, real ingestion)


@pytest.fixture(scope="module")
def synth_processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic corpus (360 videos, 12 topics, six of them in pairs that differ only in motion),
    prepared and ingested."""
    from recsys.data.prepare import prepare
    from recsys.media.ingest import ingest
    from recsys.synthetic.generator import synthesize

    root = tmp_path_factory.mktemp("synth_content")
    synthesize(SynthConfig(preset="default", raw_dir=root / "raw", n_videos=360, n_users=360,
                           events_per_user=30, workers=2))
    prepare(PrepareConfig(dataset=DATASET, raw_dir=root / "raw", processed_dir=root / "processed"))
    ingest(IngestConfig(dataset=DATASET, processed_dir=root / "processed", workers=2))
    return root / "processed"


@pytest.mark.slow
def test_fused_embedding_beats_every_single_modality_on_the_synthetic_corpus(
    synth_processed: Path, tmp_path: Path
) -> None:
    """Margin: over seeds 0, 1, 2 the fused probe beat the best single modality (motion each time) by 0.026,
    0.049, 0.083 (fused 0.725, 0.742, 0.736). The corpus' frames differ slightly from build to build (video
    encoding); on another build of it the margins were 0.065, 0.100, 0.080."""
    config = ContentConfig(dataset=DATASET, processed_dir=synth_processed, seed=0, max_epochs=25, patience=25,
                           checkpoint_dir=tmp_path / "ckpt", progress_bar=False)
    result = train_content(config)
    singles = {m: result[f"probe_{m}"] for m in MODALITIES}
    assert result["probe_fused"] >= max(singles.values()) + 0.02, (result["probe_fused"], singles)
    assert result["probe_fused_no_audio"] > 2 / 12  # silent videos still land near their topic (chance: 1/12)
    history = mlflow.MlflowClient().get_metric_history(result["run_id"], "train_loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert losses[-1] < 0.6 * losses[0]  # the loss falls
    store = FeatureStore.open(synth_processed / DATASET / "features")
    fused = store.array("content_embedding")
    assert fused.shape[0] == len(store)  # every item, cold-start included
    assert (np.linalg.norm(fused, axis=1) > 0.99).all()


@pytest.mark.slow
def test_distillation_aligns_fused_embeddings_with_a_trained_two_tower_model(
    tmp_path: Path, trained_tiny_model: TinyModel
) -> None:
    """With a trained two-tower model, the distillation loss is part of training and falls; the run
    records which model it distilled from (read from the item embeddings file the training wrote)."""
    import polars as pl

    from tests.tiny_model import DATASET as TINY

    processed, trained = tmp_path / "processed", trained_tiny_model.result
    shutil.copytree(trained_tiny_model.processed_dir, processed)  # the session's dataset stays as it is
    n_items = pl.read_parquet(processed / TINY / "items.parquet").height
    write_store(processed / TINY / "features", n_items=n_items, topics=4)
    config = ContentConfig(dataset=TINY, processed_dir=processed, checkpoint_dir=tmp_path / "ckpt",
                           embedding_dim=16, hidden_dim=32, batch_size=16, max_epochs=4, patience=4, threads=1,
                           distill_weight=1.0, progress_bar=False)
    result = train_content(config)
    client = mlflow.MlflowClient()
    history = sorted(client.get_metric_history(result["run_id"], "train_distill_loss"), key=lambda m: m.step)
    assert len(history) == 4 and history[-1].value < history[0].value
    assert mlflow.get_run(result["run_id"]).data.tags["recsys.input.two_tower"] == trained.run_id


def test_content_plots_include_a_topic_coloured_map_of_the_embedded_items() -> None:
    rng = np.random.default_rng(0)
    n, m = 20, len(MODALITIES)
    fused = rng.normal(size=(n, 8)).astype(np.float32)  # (N, D)
    fused[3] = 0  # an item without any usable modality stays off the map
    embeddings = ExtractedEmbeddings(fused, np.zeros((n, m, 8), np.float32), np.ones((n, m), bool),
                                     np.full((n, m), 1 / m, np.float32))
    epochs = [{"train_loss": 2.0, "val_loss": 2.1, "val_r1": 0.2, "val_r5": 0.5, "temperature": 0.07},
              {"train_loss": 1.5, "val_loss": 1.9, "val_r1": 0.3, "val_r5": 0.6, "temperature": 0.06}]
    with start_run("plots-test", "content", {}, inputs={}) as run:
        _log_plots(epochs, embeddings, topics=np.arange(n) % 4)
    assert plot_artifacts(run.info.run_id) == [
        "plots/content_training.png", "plots/fusion_weights.png", "plots/item_embeddings.png"]
