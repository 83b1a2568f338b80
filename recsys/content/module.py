"""`ContentModule`: trains the content encoder without labels or interactions.

Loss terms, all scaled by one learnable temperature:
- cross: InfoNCE between the video (frames, motion), audio and title embeddings of the same
  item among the batch; pairs only join modalities of different sources, so the only way to
  agree is through what the video is about (its topic), not its pixels;
- motion (arrow of time): of two random temporal crops of a clip, the second must match the
  first better than the second played backwards does. The reversed crop has the same look,
  sound and title and differs only in which way things move, so this is what teaches the
  motion encoder direction (the synthetic corpus has topics that differ only in that);
  order-blind mean pooling scores both alike and can never win it, which is the point of the GRU;
- fusion: InfoNCE between the fused embedding of all *other* sources and each held-out
  modality, which trains the fusion weights and makes the fused embedding work when a modality
  is missing; fused_motion: the arrow-of-time choice made from the fused embedding, so that
  fusing does not average the direction of motion away. It weighs more than the
  leave-one-out term (2 against 0.5 by default), which rewards a fused embedding that mirrors
  frames, sound and title, none of which can tell apart topics that differ only in motion.
  On the synthetic corpus with weights 0.5 or 1, the fused embedding's topic probe stayed at
  or below the motion embedding's (0.710 against 0.716, 0.705 against 0.719); with 2 it beat
  every single modality by 0.026-0.10 over three seeds and two builds of the test's corpus
  (margins in that test's docstring). The motion embedding then keeps the direction but less
  of the cues the other modalities carry too (on one seed, the probe found the right topic
  group from it 0.67 of the time instead of 0.74), and the fused embedding gathers those cues
  from all modalities (0.77 instead of 0.75);
- distill (optional, weight > 0): InfoNCE between a linear head on the fused embedding and the
  item's collaborative embedding from a trained two-tower model, for items with interactions;
  cold-start items then inherit collaborative structure through their content.
"""

from __future__ import annotations

import dataclasses
import math
from itertools import combinations
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys.content.audio_encoder import STEM_STRIDE
from recsys.content.encoder import (
    MODALITIES,
    SOURCES,
    ContentEmbeddings,
    ContentEncoder,
    ContentInputs,
)
from recsys.content.temporal import random_crop, reverse_time

CROSS_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (i, j) for i, j in combinations(range(len(MODALITIES)), 2) if SOURCES[i] != SOURCES[j]
)
"""Modality index pairs contrasted with each other (never two modalities of the same source)."""

MAX_LOGIT_SCALE = math.log(100.0)


def info_nce(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE between unit-length rows of `a` (n, D) and `b` (n, D): row i matches row i."""
    logits = scale * a @ b.T  # (n, n)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def retrieval_top_k(query: Tensor, keys: Tensor, k: int) -> float:
    """Share of rows whose own key is among the `k` most similar keys (query, keys: (n, D))."""
    scores = query @ keys.T  # (n, n)
    own = scores.diagonal().unsqueeze(1)  # (n, 1)
    rank = (scores > own).sum(1)  # (n,) keys strictly better than the item's own
    return (rank < k).float().mean().item()


class ContentModule(pl.LightningModule):
    """Owns the content encoder's training objective, metrics and optimiser."""

    def __init__(
        self,
        encoder: ContentEncoder,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        temperature: float = 0.1,
        fusion_weight: float = 0.5,
        motion_weight: float = 1.0,
        fused_motion_weight: float = 2.0,
        crop: tuple[float, float] = (0.5, 0.8),
        augment: bool = True,
        distill_weight: float = 0.0,
        collab_embeddings: Tensor | None = None,
        max_epochs: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "collab_embeddings"])
        self.encoder = encoder
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        if distill_weight > 0 and collab_embeddings is None:
            raise ValueError("distill_weight > 0 needs collaborative item embeddings")
        self.distill_head: nn.Module | None = None
        if collab_embeddings is not None:
            collab = F.normalize(collab_embeddings.float(), dim=-1)  # (N, Dc)
            self.register_buffer("collab", collab, persistent=False)
            self.register_buffer("collab_valid", collab_embeddings.abs().sum(1) > 0, persistent=False)
            self.distill_head = nn.Linear(encoder.spec.embedding_dim, collab.shape[1])
        self._val_outputs: list[tuple[Tensor, Tensor, Tensor]] = []
        self._val_generator: torch.Generator | None = None

    @property
    def scale(self) -> Tensor:
        """The inverse temperature, kept at most 100 as in CLIP."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, inputs: ContentInputs) -> ContentEmbeddings:
        return self.encoder(inputs)

    # ---------------------------------------------------------------------------------------
    # Losses

    def losses(self, inputs: ContentInputs, generator: torch.Generator | None = None
               ) -> tuple[dict[str, Tensor], ContentEmbeddings]:
        """Each loss term (zero when a batch has too few items to contrast) and the embeddings.

        `generator` draws the temporal crops (validation passes a fixed one, so its loss is comparable).
        """
        features = self.encoder.frame_features(inputs.frames, inputs.frame_mask)  # (B, T, F)
        stacked, mask = self.encoder.encode_modalities(inputs, features)  # (B, M, D), (B, M)
        fused = self.encoder.fuse(stacked, mask)  # (B, D)
        zero = stacked.sum() * 0.0  # keeps the graph when a term has nothing to contrast
        motion, fused_motion = self._views(features, inputs.frame_mask, stacked, mask, zero, generator)
        terms = {
            "cross": self._cross_modal(stacked, mask, zero),
            "motion": motion,
            "fused_motion": fused_motion,
            "fusion": self._leave_one_out(stacked, mask, zero),
        }
        if self.distill_head is not None:
            terms["distill"] = self._distill(fused, inputs.item_idx, zero)
        return terms, ContentEmbeddings(stacked=stacked, mask=mask, fused=fused)

    def _cross_modal(self, stacked: Tensor, mask: Tensor, zero: Tensor) -> Tensor:
        terms = []
        for i, j in CROSS_PAIRS:
            rows = mask[:, i] & mask[:, j]  # (B,)
            if rows.sum() >= 2:
                terms.append(info_nce(stacked[rows, i], stacked[rows, j], self.scale))
        return torch.stack(terms).mean() if terms else zero

    def _views(self, features: Tensor, frame_mask: Tensor, stacked: Tensor, mask: Tensor, zero: Tensor,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Arrow-of-time losses: (motion of crop a, fused embedding with crop a) must prefer crop b to crop b
        played backwards, for two random crops a, b of each clip.

        The reversed crop has the same frames, so the same look; only which way things move tells
        it apart. Contrasting with other items as well would let appearance alone solve the task
        (and the cross-modal loss already covers appearance), so the choice is between the two.
        """
        rows = frame_mask.sum(1) >= 4  # (B,) room for two crops of at least two frames
        if rows.sum() < 1:
            return zero, zero
        features, frame_mask = features[rows], frame_mask[rows]  # (n, T, F), (n, T)
        stacked, mask = stacked[rows], mask[rows]  # (n, M, D), (n, M)
        low, high = self.hparams.crop
        crops = [random_crop(frame_mask, low, high, generator=generator) for _ in range(2)]
        # Each crop is also moved to a random place in the frame, so where the object is (for
        # instance at the end of the crop, which its reversal does not share) cannot give the
        # answer away: only which way it moves can.
        cnn = self.encoder.frame_cnn
        shifted = [cnn.translate(features, torch.rand(len(features), 1, 2, generator=generator,
                                                      device=features.device) - 0.5) for _ in crops]
        motion = [self.encoder.embed_motion(x, crop) for x, crop in zip(shifted, crops, strict=True)]
        backward = [self.encoder.embed_motion(*reverse_time(x, crop)) for x, crop in zip(shifted, crops, strict=True)]
        forward_wins = torch.zeros(len(features), dtype=torch.long, device=features.device)
        motion_loss, fused_loss = zero, zero
        for a, b in ((0, 1), (1, 0)):
            keys = torch.stack([motion[b], backward[b]], dim=1)  # (n, 2, D): forward, reversed
            logits = self.scale * torch.einsum("nd,nkd->nk", motion[a], keys)  # (n, 2)
            motion_loss = motion_loss + 0.5 * F.cross_entropy(logits, forward_wins)
            # The fused embedding sees crop a in place of the whole clip: it must keep the direction too.
            video = torch.stack([self.encoder.embed_frames(shifted[a], crops[a]), motion[a]], dim=1)  # (n, 2, D)
            view = torch.cat([video, stacked[:, 2:]], dim=1)  # (n, M, D): MODALITIES lists video first
            fused = self.encoder.fuse(view, mask)  # (n, D)
            logits = self.scale * torch.einsum("nd,nkd->nk", fused, keys)  # (n, 2)
            fused_loss = fused_loss + 0.5 * F.cross_entropy(logits, forward_wins)
        return motion_loss, fused_loss

    def _leave_one_out(self, stacked: Tensor, mask: Tensor, zero: Tensor) -> Tensor:
        terms = []
        sources = list(dict.fromkeys(SOURCES))
        for source in sources:
            others = torch.tensor([s != source for s in SOURCES], device=mask.device)  # (M,)
            context = mask & others  # (B, M)
            fused = self.encoder.fuse(stacked, context)  # (B, D)
            for m, s in enumerate(SOURCES):
                rows = mask[:, m] & context.any(1)  # (B,)
                if s == source and rows.sum() >= 2:
                    terms.append(info_nce(fused[rows], stacked[rows, m], self.scale))
        return torch.stack(terms).mean() if terms else zero

    def _distill(self, fused: Tensor, item_idx: Tensor, zero: Tensor) -> Tensor:
        assert self.distill_head is not None
        rows = self.collab_valid[item_idx]  # (B,) items with a collaborative embedding (seen in training)
        if rows.sum() < 2:
            return zero
        predicted = F.normalize(self.distill_head(fused[rows]), dim=-1)  # (n, Dc)
        return info_nce(predicted, self.collab[item_idx[rows]], self.scale)

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        """Weighted sum of the loss terms."""
        hp = self.hparams
        loss = (terms["cross"] + hp.motion_weight * terms["motion"] + hp.fusion_weight * terms["fusion"]
                + hp.fused_motion_weight * terms["fused_motion"])
        if "distill" in terms:
            loss = loss + hp.distill_weight * terms["distill"]
        return loss

    # ---------------------------------------------------------------------------------------
    # Lightning hooks

    def augment(self, batch: ContentInputs) -> ContentInputs:
        """A training view of a batch: a random stretch of each clip and of each sound, title dimensions dropped.

        With a few hundred videos the encoders would otherwise learn each training pair by heart
        (this title goes with that exact colour) instead of what the pairs share.
        """
        long_clips = batch.frame_mask.sum(1, keepdim=True) >= 4  # (B, 1): shorter clips stay whole
        frame_mask = torch.where(long_clips, random_crop(batch.frame_mask, 0.6, 1.0), batch.frame_mask)
        mel_mask = random_crop(batch.mel_mask, 0.6, 1.0, min_steps=STEM_STRIDE * 4)
        title = F.dropout(batch.title, p=0.2, training=True)
        return dataclasses.replace(batch, frame_mask=frame_mask, mel_mask=mel_mask, title=title)

    def training_step(self, batch: ContentInputs, batch_idx: int) -> Tensor:
        if self.hparams.augment:
            batch = self.augment(batch)
        terms, _ = self.losses(batch)
        loss = self.total(terms)
        n = batch.item_idx.shape[0]
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        for name, value in terms.items():
            self.log(f"train_{name}_loss", value, on_step=False, on_epoch=True, batch_size=n)
        self.log("temperature", 1.0 / self.scale.detach(), on_step=False, on_epoch=True, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_generator = torch.Generator(device=self.device).manual_seed(0)

    def validation_step(self, batch: ContentInputs, batch_idx: int) -> None:
        terms, out = self.losses(batch, generator=self._val_generator)
        n = batch.item_idx.shape[0]
        self.log("val_loss", self.total(terms), on_epoch=True, prog_bar=True, batch_size=n)
        for name, value in terms.items():
            self.log(f"val_{name}_loss", value, on_epoch=True, batch_size=n)
        self._val_outputs.append((out.stacked.detach(), out.mask.detach(), out.fused.detach()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        stacked = torch.cat([s for s, _, _ in self._val_outputs])  # (n, M, D)
        mask = torch.cat([m for _, m, _ in self._val_outputs])  # (n, M)
        self._val_outputs.clear()
        for name, value in cross_modal_retrieval(stacked, mask).items():
            self.log(name, value, prog_bar=name == "val_r1")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, hp.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def cross_modal_retrieval(stacked: Tensor, mask: Tensor) -> dict[str, float]:
    """Top-1 and top-5 retrieval accuracy between modality pairs of different sources over a set of items.

    `val_r1_<a>_<b>`: an item's `a` embedding finds its own `b` embedding first among all
    items that have `b` (averaged over both directions); `val_r1`, `val_r5`: means over pairs.
    """
    metrics: dict[str, float] = {}
    r1, r5 = [], []
    for i, j in CROSS_PAIRS:
        rows = mask[:, i] & mask[:, j]  # (n,)
        if rows.sum() < 2:
            continue
        a, b = stacked[rows, i], stacked[rows, j]  # (k, D)
        top1 = 0.5 * (retrieval_top_k(a, b, 1) + retrieval_top_k(b, a, 1))
        top5 = 0.5 * (retrieval_top_k(a, b, 5) + retrieval_top_k(b, a, 5))
        metrics[f"val_r1_{MODALITIES[i]}_{MODALITIES[j]}"] = top1
        r1.append(top1)
        r5.append(top5)
    if r1:
        metrics["val_r1"] = sum(r1) / len(r1)
        metrics["val_r5"] = sum(r5) / len(r5)
    return metrics
