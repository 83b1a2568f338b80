"""Model-parallel training of the same two-tower model with TorchRec `DistributedModelParallel`.

Sharding is an option on top of the model, not a copy of it: the `TwoTower` from `build_model`
and the loss of `RetrievalObjective` are wrapped as they are. The planner places each embedding
table whole on one process (table-wise sharding); DMP routes every KeyedJaggedTensor to the
process that holds its table and wraps the dense towers in DDP. Each process trains on its own
share of every epoch's shuffled examples.

The embedding tables are updated by TorchRec's fused row-wise Adagrad inside the backward pass
(the optimizer FBGEMM supports for sharded tables on CPU and GPU); the dense towers by AdamW.
At the end rank 0 gathers the shards into an ordinary `TwoTower` and saves it like a
single-process model, so evaluation and retrieval cannot tell them apart.

Launch: `train_sharded(config)` (or `recsys train retrieval DATASET --world-size N`) starts N local
processes with torchrun (gloo on CPU, NCCL on GPUs). On several GPUs or hosts, start torchrun
yourself: every process runs `python -m recsys.twotower.distributed DATASET [options]`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.optim import RowWiseAdagrad, apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys.config import RetrievalConfig, config_from, config_parser, save_config, to_dict
from recsys.data.paths import PreparedPaths
from recsys.errors import RecsysError
from recsys.files import read_json
from recsys.twotower.batch import RetrievalBatch
from recsys.twotower.build import RetrievalResult, build_model, load_content, training_run, upstream_inputs
from recsys.twotower.datamodule import RetrievalDataModule
from recsys.twotower.module import RetrievalObjective, optimizer_groups
from recsys.twotower.new_videos import fit_new_videos, new_video_metrics
from recsys.twotower.plots import log_retrieval_plots
from recsys.twotower.sparse import ITEM_TABLE, USER_TABLE
from recsys.twotower.trained_model import MODEL_FILE, NEW_VIDEO_SCORING, WEIGHTS_FILE, models_dir, save_trained
from recsys.twotower.validation import VAL_METRIC, validate


def sharders() -> list[ModuleSharder[nn.Module]]:
    """The sharders of the two kinds of TorchRec modules in the model (user bags, item sequences)."""
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]  # type: ignore[list-item]


def sharding_plan(module: nn.Module, world_size: int, compute_device: str, group: dist.ProcessGroup
                  ) -> ShardingPlan:
    """Table-wise plan: each table lives whole on one process (agreed by all processes of `group`)."""
    table_wise = ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value])
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=compute_device),
        constraints={USER_TABLE: table_wise, ITEM_TABLE: table_wise},
    )
    return planner.collective_plan(module, sharders(), group)


def rank_batches(data: RetrievalDataModule, rank: int, world_size: int, epoch: int, seed: int,
                 batch_size: int) -> Iterator[RetrievalBatch]:
    """This process's batches of one epoch: a disjoint share of a seeded shuffle of the training
    windows, equal counts on every rank.

    Every process must run the same number of steps (each step is a collective), so the share
    is cut to a whole number of batches; at most world_size * batch_size windows rest per epoch.
    """
    assert data.windows is not None
    order = np.random.default_rng([seed, epoch]).permutation(len(data.windows))
    share = len(order) // world_size
    mine = order[rank * share:(rank + 1) * share]
    size = min(batch_size, share)
    for start in range(0, share - size + 1, size):
        yield data.train_batch(mine[start:start + size])


def gather_state(module: nn.Module, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0, on CPU (sharded tables gathered; empty dict on other ranks)."""
    state: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        if isinstance(value, ShardedTensor):
            # NCCL gathers into device memory; gloo into CPU memory.
            full = torch.empty(value.size(), dtype=value.dtype, device=device) if rank == 0 else None
            value.gather(dst=0, out=full)  # a collective: every rank takes part
            if full is not None:
                state[name] = full.cpu()
        elif rank == 0:
            state[name] = value.detach().cpu()
    return state


def train_rank(config: RetrievalConfig, rank: int, world_size: int, device: torch.device,
               run_id: str | None) -> dict[str, Any] | None:
    """One process of sharded training; rank 0 (which needs `run_id`) saves the model and returns its summary."""
    L.seed_everything(config.seed, verbose=False)  # equal dense initialisation on every rank
    paths = PreparedPaths.of(config.processed_dir, config.dataset).require()
    data = RetrievalDataModule(paths, max_history=config.max_history, batch_size=config.batch_size,
                               seed=config.seed, validation_users=config.validation_users)
    data.setup("fit")
    content = load_content(paths, config.content, data.n_items)
    model = build_model(config, data, content)
    objective = RetrievalObjective(model, data.item_probabilities(), config.temperature, config.logq_correction,
                                   config.uniform_negatives, config.content_only_weight)
    # Fused into the backward pass of the sharded tables; must be declared before sharding.
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse.parameters(), {"lr": config.learning_rate})
    group = dist.GroupMember.WORLD
    assert group is not None
    plan = sharding_plan(objective, world_size, device.type, group)
    sharded = DistributedModelParallel(objective, device=device, plan=plan, sharders=sharders())
    dense_parameters = dict(in_backward_optimizer_filter(sharded.named_parameters()))
    groups = optimizer_groups(dense_parameters.items(), config.weight_decay)
    dense = KeyedOptimizerWrapper(dense_parameters, lambda _: torch.optim.AdamW(groups, lr=config.learning_rate))
    client = _mlflow_client() if rank == 0 and run_id else None
    history: list[dict[str, float]] = []
    for epoch in range(config.max_epochs):
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, batches)
        for batch in rank_batches(data, rank, world_size, epoch, config.seed + 1, data.windows_per_batch):
            loss = sharded(batch.to(device))
            loss.backward()
            dense.step()
            dense.zero_grad()
            total += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
        dist.all_reduce(total)  # mean over every process's batches
        history.append({"epoch": float(epoch), "train_loss": float(total[0] / total[1])})
        if client is not None:
            client.log_metric(run_id, "train_loss", history[-1]["train_loss"], step=epoch)

    state = gather_state(sharded, rank, device)
    if rank != 0:
        return None
    # The same TwoTower, unsharded: DMP's state keys are those of the wrapped RetrievalObjective.
    full = build_model(config, data, content)
    full.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    scoring, scored_ndcg, _ = fit_new_videos(full, data.fit_dataloader(), data.fresh_view_dataloader(), config.seed)
    metrics = validate(full, data.val_dataloader())  # the checkpoint half of the validation users, as in training
    history[-1].update(metrics)
    info = {"best_val_ndcg_10": metrics[VAL_METRIC], "epochs": config.max_epochs, "content_source": content.source,
            NEW_VIDEO_SCORING: scoring.to_dict(), "sharded": {"world_size": world_size, "plan": str(plan)},
            "history": history, "config": to_dict(config)}
    assert run_id is not None, "rank 0 saves the model under its MLflow run ID"
    folder = save_trained(full, config.processed_dir, config.dataset, run_id, info)
    if client is not None:
        client.log_metric(run_id, VAL_METRIC, metrics[VAL_METRIC], step=config.max_epochs - 1)
        client.log_metric(run_id, "best_val_ndcg_10", metrics[VAL_METRIC])
        for name, value in new_video_metrics(scoring, scored_ndcg).items():
            client.log_metric(run_id, name, value)
        client.log_artifact(run_id, str(folder / WEIGHTS_FILE), artifact_path="model")
        log_retrieval_plots(run_id, full, paths)
    return {"folder": str(folder), "history": history, "metrics": metrics}


def _mlflow_client() -> Any:
    import mlflow

    from recsys.tracking.store import configure

    configure()
    return mlflow.MlflowClient()


def _device(local_rank: int) -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def _launch_command(config_path: Path, run_id: str, world_size: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            "-m", "recsys.twotower.distributed", "--config", str(config_path), "--run-id", run_id]


def train_sharded(config: RetrievalConfig) -> RetrievalResult:
    """Train with `config.world_size` local processes started by torchrun (the same path as on a cluster).

    This process opens the MLflow run; rank 0 logs into it and saves the gathered model.
    """
    paths = PreparedPaths.of(config.processed_dir, config.dataset).require()
    with training_run(config, paths, upstream_inputs(config, paths)) as run:
        run_id = run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            config_path = save_config(config, Path(tmp) / "config.json")
            env = {**os.environ, "OMP_NUM_THREADS": str(config.threads or 1)}  # the processes share the cores
            completed = subprocess.run(_launch_command(config_path, run_id, config.world_size), env=env)
        if completed.returncode != 0:
            raise RecsysError(f"sharded training failed in a worker process (exit code {completed.returncode}); "
                              f"its error is printed above")
    folder = models_dir(config.processed_dir, config.dataset) / run_id
    info = read_json(folder / MODEL_FILE)["info"]
    return RetrievalResult(run_id, folder, folder / WEIGHTS_FILE, info["best_val_ndcg_10"], info["epochs"],
                           info["content_source"], info["history"])


def torchrun_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one torchrun process; takes the options of `recsys train retrieval`.

    `--run-id` logs into an MLflow run opened by the launcher; without it rank 0 opens one.
    """
    parser = config_parser(RetrievalConfig, ("dataset",), prog="python -m recsys.twotower.distributed",
                           description="One process of sharded two-tower training (start it with torchrun)")
    parser.add_argument("--run-id", type=str | None, default=None,
                        help="MLflow run to log into (opened by the launcher)")
    namespace = parser.parse_args(argv)
    config = config_from(RetrievalConfig, namespace)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if config.threads:
        torch.set_num_threads(config.threads)
    device, backend = _device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        if rank != 0:
            train_rank(config, rank, world_size, device, None)
        elif namespace.run_id is not None:
            train_rank(config, rank, world_size, device, namespace.run_id)
        else:
            paths = PreparedPaths.of(config.processed_dir, config.dataset).require()
            with training_run(config, paths, upstream_inputs(config, paths)) as run:
                summary = train_rank(config, rank, world_size, device, run.info.run_id)
            assert summary is not None
            print(f"{config.dataset}: sharded two-tower model over {world_size} processes -> {summary['folder']} "
                  f"(validation NDCG@10 {summary['metrics'][VAL_METRIC]:.4f}, MLflow run {run.info.run_id})")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(torchrun_main())
