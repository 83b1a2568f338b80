"""Lightning checkpoints that survive a kill: written atomically, and carrying the random state.

A training resumed from a checkpoint must go on exactly as if it had never stopped. Lightning's
checkpoint holds the weights, the optimiser, the loop counters and every callback's state, but
not the random number generators that dropout, ID dropout and sampled negatives draw from, and a
checkpoint file being written when the process is killed would be left cut short. So:

- `AtomicCheckpointIO` writes each checkpoint to a temporary file beside it, syncs it to disk and
  renames it over the old one: a kill at any moment leaves the previous checkpoint or the new one.
- `RandomState` is a callback whose state, saved in every checkpoint, is the global torch, numpy
  and Python generators; loading it puts them back. What a datamodule's own seeded generators
  hold goes into the datamodule's `state_dict` (see `RetrievalDataModule`).
- `ResumableEarlyStopping` stops a run restored from the checkpoint of the epoch where it had
  decided to stop, instead of training on.

Checkpoints hold tensors and plain values only, so they load with `weights_only=True`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as L
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import EarlyStopping


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into `.<name>.<pid>.part` beside the checkpoint, fsync, then rename over it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
                        ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            with tmp.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself reaches the disk
        finally:
            os.close(directory)


def remove_partial_files(folder: Path) -> None:
    """Delete the temporary files a checkpoint write killed half-way left in `folder`."""
    for leftover in Path(folder).glob(".*.part"):
        leftover.unlink(missing_ok=True)


class RandomState(L.Callback):
    """Saves the global torch, numpy and Python random states in every checkpoint and restores them."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, cached = np.random.get_state()
        version, python_state, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        saved = state_dict["numpy"]
        np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["position"],
                             saved["has_gauss"], saved["cached_gaussian"]))
        python = state_dict["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))


class ResumableEarlyStopping(EarlyStopping):
    """`EarlyStopping` that, restored with its patience used up, stops the run before another epoch.

    Lightning keeps the callback's counters in the checkpoint but not the trainer's `should_stop`,
    so a run killed after the checkpoint of its stopping epoch would otherwise train on.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.wait_count >= self.patience:
            trainer.should_stop = True
