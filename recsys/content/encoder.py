"""The content encoder: frames, motion, sound and title of a video → per-modality and fused embeddings.

A plain `nn.Module` composing the frame CNN, the temporal encoder, the audio encoder, the
title projection and the fusion. Training objectives live in `content_module.ContentModule`;
extraction for the feature store reuses this module alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys.content.audio_encoder import AudioEncoder
from recsys.content.frame_cnn import Backbone, FrameCNN
from recsys.content.fusion import FusionKind, ModalityFusion
from recsys.content.temporal import TemporalEncoder, TemporalKind, masked_mean
from recsys.content.title_encoder import SENTENCE_DIM, TitleEncoder

MODALITIES: tuple[str, ...] = ("frames", "motion", "audio", "title")
"""Order of the modality axis in every stacked tensor; `embedding_<name>.npy` in the feature store."""

SOURCES: tuple[str, ...] = ("video", "video", "audio", "title")
"""The signal each modality is computed from: frames and motion share the video, so contrasting
them with each other would let the model match a clip to itself by its pixels rather than by
what it is about; cross-modal losses only pair modalities of different sources."""


@dataclass
class ContentInputs:
    """A batch of feature-store rows, as tensors (B items)."""

    frames: Tensor
    """uint8 (B, T, S, S, 3) RGB frames"""
    frame_mask: Tensor
    """bool (B, T): frame was decoded (false = padding)"""
    mel: Tensor
    """float16/float32 (B, n_mels, L) log-mel spectrogram"""
    mel_mask: Tensor
    """bool (B, L): time step holds sound (all false = no audio track)"""
    title: Tensor
    """float32 (B, 384) cached MiniLM embedding (zeros when there is no title)"""
    title_mask: Tensor
    """bool (B,): the video has a title"""
    item_idx: Tensor
    """int64 (B,) row of each item in the feature store"""


@dataclass
class ContentEmbeddings:
    """Encoder output: unit-length modality embeddings, their presence, and the fused embedding."""

    stacked: Tensor
    """(B, M, D) in `MODALITIES` order; zero rows where a modality is missing"""
    mask: Tensor
    """bool (B, M): modality present"""
    fused: Tensor
    """(B, D) unit-length fused embedding (zero only when no modality is present)"""

    def modality(self, name: str) -> Tensor:
        """The (B, D) embedding of one modality."""
        return self.stacked[:, MODALITIES.index(name)]


@dataclass
class EncoderSpec:
    """Architecture of a `ContentEncoder`; saved with checkpoints so the encoder can be rebuilt."""

    backbone: Backbone = "small"
    backbone_weights: str | None = None
    freeze_backbone: bool = False
    temporal: TemporalKind = "gru"
    bidirectional: bool = False
    fusion: FusionKind = "gated"
    embedding_dim: int = 64
    hidden_dim: int = 128
    modality_dropout: float = 0.2
    n_mels: int = 64
    """Mel bands of the feature store's spectrograms"""


class ContentEncoder(nn.Module):
    """Encodes `ContentInputs` into `ContentEmbeddings` (per modality and fused)."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        d, h = spec.embedding_dim, spec.hidden_dim
        weights = None if spec.backbone_weights in (None, "", "none") else spec.backbone_weights
        self.frame_cnn = FrameCNN(spec.backbone, weights, freeze=spec.freeze_backbone)
        f = self.frame_cnn.out_dim
        self.frames_head = nn.Sequential(nn.Linear(f, h), nn.ReLU(), nn.Linear(h, d))
        self.temporal = TemporalEncoder(f, d, h, kind=spec.temporal, bidirectional=spec.bidirectional)
        self.audio = AudioEncoder(spec.n_mels, d, hidden_dim=h)
        self.title = TitleEncoder(d, in_dim=SENTENCE_DIM, hidden_dim=h)
        self.fusion = ModalityFusion(d, len(MODALITIES), spec.fusion, modality_dropout=spec.modality_dropout)

    def frame_features(self, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """Backbone features of every valid frame (B, T, F); padded frames are skipped and left zero."""
        b, t = frame_mask.shape
        rows = frame_mask.reshape(b * t).nonzero().squeeze(1)  # (V,) indices of the valid frames
        images = self.frame_cnn.prepare(frames.reshape(b * t, *frames.shape[2:]).index_select(0, rows))  # (V, 3, S, S)
        valid = self.frame_cnn(images)  # (V, F)
        features = valid.new_zeros(b * t, valid.shape[1]).index_put((rows,), valid)  # (B*T, F)
        return features.view(b, t, -1)  # (B, T, F)

    def modality_mask(self, inputs: ContentInputs) -> Tensor:
        """bool (B, M): which modalities each item has (motion needs at least two frames)."""
        n_frames = inputs.frame_mask.sum(1)  # (B,)
        return torch.stack(
            [n_frames > 0, n_frames > 1, inputs.mel_mask.any(1), inputs.title_mask.bool()], dim=1
        )  # (B, M)

    def embed_frames(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        """Unit-length appearance embedding (B, D): the frames' mean features under a frame mask (B, T)."""
        return F.normalize(self.frames_head(masked_mean(features, frame_mask)), dim=-1)  # (B, D)

    def embed_motion(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        """Unit-length motion embedding (B, D) of frame features (B, T, F) under a frame mask (B, T)."""
        return F.normalize(self.temporal(features, frame_mask), dim=-1)  # (B, D)

    def encode_modalities(self, inputs: ContentInputs, features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Unit-length modality embeddings (B, M, D), zero where missing, and the mask (B, M).

        `features`: the batch's frame features when the caller has them already (B, T, F).
        """
        mask = self.modality_mask(inputs)  # (B, M)
        if features is None:
            features = self.frame_features(inputs.frames, inputs.frame_mask)  # (B, T, F)
        frames = self.frames_head(masked_mean(features, inputs.frame_mask))  # (B, D)
        motion = self.temporal(features, inputs.frame_mask)  # (B, D)
        audio = self.audio(inputs.mel, inputs.mel_mask)  # (B, D)
        title = self.title(inputs.title.float())  # (B, D)
        stacked = F.normalize(torch.stack([frames, motion, audio, title], dim=1), dim=-1)  # (B, M, D)
        return stacked * mask.unsqueeze(-1).to(stacked.dtype), mask

    def fuse(self, stacked: Tensor, mask: Tensor) -> Tensor:
        """Unit-length fused embedding (B, D) of the modalities marked in `mask`."""
        return F.normalize(self.fusion(stacked, mask), dim=-1)  # (B, D)

    def forward(self, inputs: ContentInputs) -> ContentEmbeddings:
        stacked, mask = self.encode_modalities(inputs)
        return ContentEmbeddings(stacked=stacked, mask=mask, fused=self.fuse(stacked, mask))

