"""`RetrievalModule`: the training objective and validation of the two-tower model.

The towers only embed; this module owns the loss. Each batch holds (user, history, target)
examples — several consecutive targets of one user per batch row, see `RetrievalDataModule` —
and every other example's target is a negative for an example (in-batch sampled softmax).
Popular items are over-sampled as negatives that way, so each logit is corrected by the log of
the item's expected count in the sample (logQ correction, Yi et al. 2019); optional uniformly
drawn extra negatives reach the long tail. A negative that is in fact the example's own target
(the same item twice in a batch) is masked, and so are the targets of the same batch row: they
are videos the same user watched too. With content and IDs, a second loss of the same form
(weight `content_only_weight`) scores every target from its content alone, as if nobody had
watched it: ID dropout hides a few IDs at random, this trains the content path on every target,
which is what new videos are ranked by. Validation ranks the whole catalogue for every validation
user (a fixed sample of them on large datasets) by the served score (`recsys.twotower.scoring`,
with its default coefficients until they are fitted), excluding their training items, and reports
NDCG@10 and HR@10, which drive checkpointing and early stopping.

Videos nobody watched in training never appear as targets, so the loss cannot tell how often users
pick such a video: the scores of those items are only comparable among themselves. After training,
`recsys.twotower.new_videos` fits how they are scored beside watched videos on the validation split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytorch_lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from recsys.twotower.batch import RetrievalBatch
from recsys.twotower.scoring import ItemState, NewVideoScoring
from recsys.twotower.sparse import collate
from recsys.twotower.towers import TwoTower
from recsys.twotower.validation import VAL_METRIC, catalogue_embeddings, ranking_metrics


def sampled_softmax_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None,
    extra_items: torch.Tensor | None = None,
    extra_ids: torch.Tensor | None = None,
    extra_log_q: float = 0.0,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of each example's target against in-batch (and extra) negatives.

    users, items (B, D): example i's user and target embeddings; targets (B,) target item IDs;
    log_q (B,): log expected count of each target in a batch (None: no correction);
    extra_items (M, D) / extra_ids (M,): uniformly sampled negatives with log expected count extra_log_q;
    groups (B,): examples of one group (one user's) are not negatives of each other.
    """
    logits = users @ items.T / temperature  # (B, B)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)  # (B, B)
    same = targets.unsqueeze(0) == targets.unsqueeze(1)  # (B, B)
    if groups is not None:
        same = same | (groups.unsqueeze(0) == groups.unsqueeze(1))
    accidental = same & ~torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    logits = logits.masked_fill(accidental, float("-inf"))
    if extra_items is not None and extra_ids is not None:
        extra = users @ extra_items.T / temperature  # (B, M)
        if log_q is not None:
            extra = extra - extra_log_q
        extra = extra.masked_fill(extra_ids.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))  # (B, M)
        logits = torch.cat([logits, extra], dim=1)  # (B, B + M)
    labels = torch.arange(len(targets), device=targets.device)  # (B,) the diagonal is the positive
    return F.cross_entropy(logits, labels)


def optimizer_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float
                     ) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on dense weight matrices only.

    Decaying every embedding row at each step would shrink rarely seen items towards zero
    whatever the data says, so ID tables (and biases, norms) are not decayed.
    """
    decay, no_decay = [], []
    for name, parameter in named_parameters:
        sparse = ".sparse." in f".{name}"
        (decay if parameter.ndim >= 2 and not sparse else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class RetrievalObjective(nn.Module):
    """The towers and their loss as one module whose `forward(batch)` is the batch loss.

    Like TorchRec's `TwoTowerTrainTask`: DistributedModelParallel (and DDP inside it) wraps a
    module's forward, so the sharded trainer wraps this one; `RetrievalModule` trains the same.
    """

    def __init__(self, model: TwoTower, item_probabilities: np.ndarray, temperature: float,
                 logq_correction: bool, uniform_negatives: int, content_only_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.logq_correction = logq_correction
        self.uniform_negatives = uniform_negatives
        # A content-only model's main loss already is that loss; an ID-only model has no content.
        has_both = model.spec.use_ids and model.spec.content_dim > 0
        self.content_only_weight = content_only_weight if has_both else 0.0
        probabilities = torch.as_tensor(np.asarray(item_probabilities), dtype=torch.float32)  # (N,)
        self.register_buffer("log_p", torch.log(probabilities.clamp(min=1e-12)), persistent=False)

    def forward(self, batch: RetrievalBatch) -> torch.Tensor:
        users, items = self.model(batch.features, batch.target_rows, batch.target_steps)  # (P, D), (P, D)
        device = batch.targets.device
        # Expected count of an item among the P in-batch candidates is P * p(item).
        log_q = self.log_p[batch.targets] + math.log(len(batch)) if self.logq_correction else None  # (P,)
        extra_items = extra_ids = None
        extra_log_q = 0.0
        if self.uniform_negatives > 0:
            n_items, m = self.model.spec.n_items, self.uniform_negatives
            extra_ids = torch.randint(n_items, (m,))  # (M,)
            features = collate(None, extra_ids.numpy(), np.empty(0, np.int64), np.zeros(m, np.int64))
            extra_items = self.model.item_embeddings(features.to(device))  # (M, D)
            extra_ids = extra_ids.to(device)
            extra_log_q = math.log(m / n_items)
        loss = sampled_softmax_loss(users, items, batch.targets, self.temperature, log_q,
                                    extra_items, extra_ids, extra_log_q, groups=batch.target_rows)
        if self.content_only_weight > 0:
            content_only = self.model.item_tower(batch.targets, None)  # (P, D) as if never watched
            loss = loss + self.content_only_weight * sampled_softmax_loss(
                users, content_only, batch.targets, self.temperature, log_q, groups=batch.target_rows)
        return loss


class RetrievalModule(L.LightningModule):
    """Trains a `TwoTower` with in-batch sampled softmax (logQ-corrected); validates by full ranking."""

    def __init__(
        self,
        model: TwoTower,
        item_probabilities: np.ndarray,
        temperature: float = 0.05,
        logq_correction: bool = True,
        uniform_negatives: int = 0,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        eval_chunk: int = 4096,
        content_only_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "item_probabilities"])
        self.hparams["spec"] = model.spec.to_dict()
        self.objective = RetrievalObjective(model, item_probabilities, temperature, logq_correction,
                                            uniform_negatives, content_only_weight)
        self._val_items: ItemState | None = None

    @property
    def model(self) -> TwoTower:
        return self.objective.model

    # ------------------------------------------------------------------ training
    def loss(self, batch: RetrievalBatch) -> torch.Tensor:
        """The training loss of one batch."""
        return self.objective(batch)

    def training_step(self, batch: RetrievalBatch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(optimizer_groups(self.model.named_parameters(), self.hparams.weight_decay),
                                 lr=self.hparams.learning_rate)

    # ------------------------------------------------------------------ validation: full ranking
    def on_validation_epoch_start(self) -> None:
        embeddings = catalogue_embeddings(self.model, self.device, self.hparams.eval_chunk)  # (N, D)
        self._val_items = ItemState.of(self.model, embeddings)

    def validation_step(self, batch: RetrievalBatch, batch_idx: int) -> None:
        assert self._val_items is not None
        # The served score, with the coefficients in force during training (they are fitted after it).
        ndcg, hit = ranking_metrics(self.model, self._val_items, batch, NewVideoScoring())  # (B,), (B,)
        self.log(VAL_METRIC, ndcg.mean(), prog_bar=True, batch_size=len(batch))
        self.log("val_hr_10", hit.mean(), batch_size=len(batch))

    def on_validation_epoch_end(self) -> None:
        self._val_items = None
