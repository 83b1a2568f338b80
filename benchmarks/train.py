"""Two-tower training throughput: the Lightning module against a plain PyTorch loop (target >= 0.9x).

Both train the same model (the default `RetrievalConfig`: GRU user tower, dim 64, history 50,
batches of about 1024 targets in windows of 25, one torch thread, ID-only) on the same pre-built
batches of MovieLens-100k (from ../shared/data, prepared in a temporary folder), from the same
initial weights, with the same AdamW optimizer:

- plain loop: `loss = objective(batch); loss.backward(); optimizer.step(); optimizer.zero_grad()`
- Lightning: `Trainer.fit` of `RetrievalModule` over a DataLoader that yields those batches,
  validation, checkpointing and logging off; timed from the first to the last training batch.

Runs alternate (plain, Lightning, plain, ...) so that load on the machine hits both alike;
examples/s are medians over the repeats. The ratio is Lightning / plain.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import SHARED_DATA, parse_args, report

TARGET_RATIO = 0.9


def main() -> None:
    args = parse_args(__doc__ or "")
    batches_per_run, repeats = (8, 3) if args.quick else (30, 5)
    with tempfile.TemporaryDirectory(prefix="recsys-train-bench-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        result = run(Path(tmp), batches_per_run, repeats)
    result["quick"] = args.quick
    report("train", result)


def run(root: Path, batches_per_run: int, repeats: int) -> dict[str, Any]:
    import numpy as np
    import pytorch_lightning as L
    import torch
    from pytorch_lightning.callbacks import Callback
    from torch.utils.data import DataLoader

    from recsys.config import FetchConfig, PrepareConfig, RetrievalConfig
    from recsys.data.fetch import fetch
    from recsys.data.paths import PreparedPaths
    from recsys.data.prepare import prepare
    from recsys.twotower.build import ItemContent, build_model
    from recsys.twotower.datamodule import RetrievalDataModule
    from recsys.twotower.module import RetrievalModule

    dataset = "movielens-100k"
    fetch(FetchConfig(dataset=dataset, source=SHARED_DATA / "movielens" / "ml-100k", dest=root / "raw"))
    prepare(PrepareConfig(dataset=dataset, raw_dir=root / "raw", processed_dir=root / "processed"))
    config = RetrievalConfig(dataset=dataset, processed_dir=root / "processed", content="none")
    L.seed_everything(config.seed, verbose=False)
    torch.set_num_threads(config.threads or torch.get_num_threads())  # as `recsys train retrieval` runs
    data = RetrievalDataModule(PreparedPaths.of(config.processed_dir, dataset), config.max_history,
                               config.batch_size, seed=config.seed)
    data.setup("fit")
    windows, per_batch = np.random.default_rng(config.seed).permutation(len(data.windows)), data.windows_per_batch
    batches = [data.train_batch(windows[i * per_batch:(i + 1) * per_batch]) for i in range(batches_per_run)]
    initial = build_model(config, data, ItemContent("none", None))

    def fresh_module() -> RetrievalModule:
        return RetrievalModule(copy.deepcopy(initial), data.item_probabilities(), config.temperature,
                               config.logq_correction, config.uniform_negatives, config.learning_rate,
                               config.weight_decay)

    def plain_loop() -> float:
        module = fresh_module()
        objective, optimizer = module.objective.train(), module.configure_optimizers()
        start = time.perf_counter()
        for batch in batches:
            loss = objective(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return time.perf_counter() - start

    class TrainClock(Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, i: int) -> None:
            if i == 0:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, out: Any, batch: Any,
                               i: int) -> None:
            self.end = time.perf_counter()

    def lightning() -> float:
        clock = TrainClock()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, callbacks=[clock],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0)
        loader = DataLoader(batches, batch_size=None, shuffle=False, collate_fn=_identity)
        trainer.fit(fresh_module(), train_dataloaders=loader)
        return clock.end - clock.start

    lightning()  # warm-up: first-call costs (allocator, lazy imports) are not training throughput
    plain_loop()
    plain_s, lightning_s = [], []
    for _ in range(repeats):
        plain_s.append(plain_loop())
        lightning_s.append(lightning())
    examples = sum(len(b) for b in batches)
    plain_rate = examples / statistics.median(plain_s)
    lightning_rate = examples / statistics.median(lightning_s)
    ratio = lightning_rate / plain_rate
    return {
        "dataset": dataset,
        "model": f"two-tower {config.encoder}, dim {config.dim}, history {config.max_history}, ID-only",
        "batch_size": config.batch_size,
        "batches_per_run": batches_per_run,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "plain_examples_per_s": round(plain_rate, 1),
        "lightning_examples_per_s": round(lightning_rate, 1),
        "lightning_vs_plain_ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "plain_seconds": [round(s, 3) for s in plain_s],
        "lightning_seconds": [round(s, 3) for s in lightning_s],
        "target_met": ratio >= TARGET_RATIO,
    }


def _identity(batch: Any) -> Any:
    return batch


if __name__ == "__main__":
    main()
