"""The Lightning callback through which every trained stage (content encoders, two-tower) logs its epochs."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as L


class MlflowEpochMetrics(L.Callback):
    """Logs every epoch's scalar train and validation metrics to the active MLflow run (step = epoch).

    `history` keeps them, one dict per epoch with its `epoch` number, for the run's result and plots.
    It is part of the callback's checkpointed state, so a resumed run's history holds every epoch of
    the run, those before the kill included.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        import mlflow

        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
        mlflow.log_metrics(metrics, step=trainer.current_epoch)
        self.history.append({**metrics, "epoch": trainer.current_epoch})

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
