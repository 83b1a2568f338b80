"""Killing `train retrieval` anywhere and resuming it: the same run goes on exactly as if never stopped.

Training processes are killed for real (SIGKILL, nothing of them runs afterwards) at chosen points:
inside a training step before the first checkpoint, in the middle of an epoch, half-way through
writing a checkpoint file, and after the last checkpoint of a run that stopped early. The resumed
run must log the same per-epoch metrics as an uninterrupted run of the same config, and never
continue (or report) another run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from recsys.config import ConfigError, RetrievalConfig, save_config
from recsys.data.paths import PreparedPaths
from recsys.errors import MissingInputError
from recsys.tracking.store import KILLED_TAG
from recsys.twotower.module import RetrievalModule
from recsys.twotower.train import (
    LAST_CHECKPOINT,
    RESUMES_TAG,
    RetrievalResult,
    checkpoint_root,
    train_retrieval,
)
from recsys.twotower.trained_model import latest_run
from tests.twotower.test_module import DATASET, quick_config, write_topic_dataset

pytestmark = pytest.mark.slow

KILLER = """
import json, os, signal, sys
from pathlib import Path
import torch
from recsys.config import RetrievalConfig
from recsys.twotower.module import RetrievalModule
from recsys.twotower.train import train_retrieval

where, epoch, number = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if where == "step":  # SIGKILL inside training step `number` of epoch `epoch`
    step = RetrievalModule.training_step
    def training_step(self, batch, batch_idx):
        if self.trainer.current_epoch == epoch and batch_idx == number:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, batch, batch_idx)
    RetrievalModule.training_step = training_step
elif where == "after_training":  # SIGKILL after the last checkpoint, when the trained model is written
    import recsys.twotower.train as train
    def killed_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    train.save_trained = killed_save
else:  # SIGKILL half-way through writing checkpoint file `number`
    save, calls = torch.save, []
    def torn_save(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            handle.write(b"the first bytes of a checkpoint")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, handle, *args, **kwargs)
    torch.save = torn_save
train_retrieval(RetrievalConfig(**json.loads(Path(sys.argv[1]).read_text())))
"""


def _config(paths: PreparedPaths, **changes: object) -> RetrievalConfig:
    # Uniform negatives and dropout draw random numbers every step: a resume must restore them.
    return quick_config(paths, **{"max_epochs": 3, "patience": 10, "uniform_negatives": 8, **changes})


def _train_and_kill(config: RetrievalConfig, tmp_path: Path, where: str, epoch: int, number: int) -> None:
    """Run `train_retrieval(config)` in a new process that SIGKILLs itself at the given point."""
    config_file = save_config(config, tmp_path / f"config-{where}-{epoch}-{number}.json")
    process = subprocess.run([sys.executable, "-c", KILLER, str(config_file), where, str(epoch), str(number)],
                             env=os.environ.copy(), timeout=600, capture_output=True, text=True)
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]


def _curve(result: RetrievalResult) -> list[tuple[int, float, float]]:
    return [(int(h["epoch"]), h["val_ndcg_10"], h["train_loss"]) for h in result.history]


def _assert_same_curve(resumed: RetrievalResult, uninterrupted: RetrievalResult) -> None:
    assert [e for e, _, _ in _curve(resumed)] == [e for e, _, _ in _curve(uninterrupted)]
    for (_, ndcg, loss), (_, ndcg_ref, loss_ref) in zip(_curve(resumed), _curve(uninterrupted), strict=True):
        assert ndcg == pytest.approx(ndcg_ref, abs=1e-6) and loss == pytest.approx(loss_ref, abs=1e-6)
    assert resumed.best_val_ndcg == pytest.approx(uninterrupted.best_val_ndcg, abs=1e-6)


@pytest.fixture(scope="module")
def topic_data(tmp_path_factory: pytest.TempPathFactory, mlflow_store: str) -> Iterator[PreparedPaths]:
    with pytest.MonkeyPatch.context() as patch:  # module scope: the autouse per-test store is not set yet
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
        yield write_topic_dataset(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def uninterrupted(topic_data: PreparedPaths, mlflow_store: str) -> Iterator[RetrievalResult]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
        yield train_retrieval(_config(topic_data))


def _killed_run(before: set[str]) -> str:
    """The one train_retrieval run started since `before` (the IDs then)."""
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(DATASET).experiment_id],
                              filter_string="tags.`recsys.step` = 'train_retrieval'")
    (new,) = [r.info.run_id for r in runs if r.info.run_id not in before]
    return new


def _run_ids() -> set[str]:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(DATASET)
    return {r.info.run_id for r in client.search_runs([experiment.experiment_id])} if experiment else set()


def test_a_run_killed_before_its_first_checkpoint_is_refused_then_started_again(
    topic_data: PreparedPaths, uninterrupted: RetrievalResult, tmp_path: Path
) -> None:
    before = _run_ids()
    _train_and_kill(_config(topic_data), tmp_path, "step", epoch=0, number=2)
    killed = _killed_run(before)
    # The finished run of the same config is never taken instead: --resume refuses, and nothing moves.
    with pytest.raises(MissingInputError, match=f"run {killed} \\(KILLED\\) stopped before its first checkpoint"):
        train_retrieval(_config(topic_data, resume="latest"))
    assert latest_run(topic_data.root.parent, DATASET) == uninterrupted.run_id
    run = MlflowClient().get_run(killed)
    assert run.info.status == "KILLED" and "was gone" in run.data.tags[KILLED_TAG]

    restarted = train_retrieval(_config(topic_data, resume_or_start=True))
    assert restarted.run_id == killed  # the same MLflow run, trained from the start
    _assert_same_curve(restarted, uninterrupted)
    run = MlflowClient().get_run(killed)
    assert run.info.status == "FINISHED" and run.data.tags[RESUMES_TAG] == "1"
    assert latest_run(topic_data.root.parent, DATASET) == killed


@pytest.mark.parametrize("where, epoch, number", [
    ("step", 1, 5),        # in the middle of the second epoch
    ("checkpoint", 0, 4),  # writing the second epoch's last.ckpt, after its best.ckpt (epoch 0 wrote both)
])
def test_a_run_killed_mid_epoch_or_while_writing_a_checkpoint_resumes_exactly(
    topic_data: PreparedPaths, uninterrupted: RetrievalResult, tmp_path: Path, where: str, epoch: int, number: int
) -> None:
    before = _run_ids()
    _train_and_kill(_config(topic_data), tmp_path, where, epoch, number)
    killed = _killed_run(before)
    folder = checkpoint_root(topic_data.root.parent, DATASET) / killed
    assert (folder / LAST_CHECKPOINT).exists()
    assert bool(list(folder.glob(".*.part"))) == (where == "checkpoint")  # the torn write's temporary file

    resumed = train_retrieval(_config(topic_data, resume="latest", threads=2, progress_bar=True))
    assert resumed.run_id == killed
    _assert_same_curve(resumed, uninterrupted)
    assert not list(folder.glob(".*.part"))
    assert MlflowClient().get_run(killed).info.status == "FINISHED"


def test_a_run_killed_after_deciding_to_stop_early_stops_at_the_same_epoch(
    topic_data: PreparedPaths, tmp_path: Path
) -> None:
    # A learning rate this high makes validation NDCG@10 fall at some epoch: patience 1 stops there.
    config = _config(topic_data, max_epochs=8, patience=1, learning_rate=0.5)
    uninterrupted = train_retrieval(config)
    assert uninterrupted.epochs < config.max_epochs
    # last.ckpt follows every epoch, best.ckpt only the best one
    folder = checkpoint_root(topic_data.root.parent, DATASET) / uninterrupted.run_id
    saved = {name: torch.load(folder / name, map_location="cpu", weights_only=True)["epoch"]
             for name in (LAST_CHECKPOINT, "best.ckpt")}
    assert saved[LAST_CHECKPOINT] == uninterrupted.epochs - 1 > saved["best.ckpt"]
    before = _run_ids()
    _train_and_kill(config, tmp_path, "after_training", 0, 0)
    resumed = train_retrieval(replace(config, resume=_killed_run(before)))
    assert resumed.epochs == uninterrupted.epochs
    _assert_same_curve(resumed, uninterrupted)


def test_resume_never_continues_a_finished_run_or_other_settings(
    topic_data: PreparedPaths, uninterrupted: RetrievalResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="that run finished; a finished run is never continued"):
        train_retrieval(_config(topic_data, resume=uninterrupted.run_id))
    with pytest.raises(MissingInputError, match="no unfinished train_retrieval run"):
        train_retrieval(_config(topic_data, resume="latest", dim=16))

    step = RetrievalModule.training_step

    def failing_step(self: RetrievalModule, batch: object, batch_idx: int) -> object:
        if self.trainer.current_epoch == 1:
            raise RuntimeError("the machine ran out of memory")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(RetrievalModule, "training_step", failing_step)
    before = _run_ids()
    with pytest.raises(RuntimeError, match="out of memory"):
        train_retrieval(_config(topic_data, learning_rate=1e-3))
    failed = _killed_run(before)
    assert MlflowClient().get_run(failed).info.status == "FAILED"
    with pytest.raises(ConfigError, match=r"other settings or data \(learning_rate: 0.001 -> 0.0005\)"):
        train_retrieval(_config(topic_data, resume=failed))
    with pytest.raises(ConfigError, match="neither a run ID"):
        _config(topic_data, resume="yes")
