"""Audio encoder: a 1-D CNN along time over the log-mel spectrogram (mel bands as channels), with a mask.

A stride-4 stem (40 ms steps at a 10 ms hop) is followed by dilated residual convolutions
whose receptive field spans over a second, long enough to see the rhythm of a sound and not
just its timbre. Clips shorter than the stored length are padded; padded steps are set to
zero after every layer, which is what the convolutions' own zero padding would see at the
end of an unpadded clip, so in eval mode the embedding does not depend on the padding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys.content.temporal import masked_mean

STEM_STRIDE = 4


def standardise(mel: Tensor, mask: Tensor) -> Tensor:
    """Per-clip standardisation over the valid time steps (keeps the spectral shape, drops loudness)."""
    weights = mask.to(mel.dtype).unsqueeze(1)  # (B, 1, L)
    count = (weights.sum(dim=(1, 2)) * mel.shape[1]).clamp_min(1.0)  # (B,)
    mean = (mel * weights).sum(dim=(1, 2)) / count  # (B,)
    var = (((mel - mean.view(-1, 1, 1)) * weights) ** 2).sum(dim=(1, 2)) / count  # (B,)
    x = (mel - mean.view(-1, 1, 1)) / (var.view(-1, 1, 1) + 1e-5).sqrt()  # (B, M, L)
    return x * weights


class _DilatedBlock(nn.Module):
    """Residual dilated conv along time; zeroes padded steps so they never leak into valid ones."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return (x + torch.relu(self.norm(self.conv(x)))) * weights  # (B, C, L')


class AudioEncoder(nn.Module):
    """Log-mel (B, n_mels, L) and time mask (B, L) → embedding (B, out_dim); zeros when no step is valid."""

    def __init__(self, n_mels: int, out_dim: int, channels: int = 32, hidden_dim: int = 128,
                 dilations: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        # Non-overlapping stem windows: output step j is valid exactly when its 4 input steps are.
        self.stem = nn.Sequential(nn.Conv1d(n_mels, channels, STEM_STRIDE, stride=STEM_STRIDE, bias=False),
                                  nn.BatchNorm1d(channels), nn.ReLU())
        self.blocks = nn.ModuleList(_DilatedBlock(channels, d) for d in dilations)
        self.head = nn.Sequential(nn.Linear(2 * channels, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, mel: Tensor, mask: Tensor) -> Tensor:
        x = standardise(mel.float(), mask)  # (B, M, L)
        x = self.stem(x)  # (B, C, L/4)
        mask = mask[:, STEM_STRIDE - 1 :: STEM_STRIDE][:, : x.shape[2]]  # (B, L/4): last step of each window
        weights = mask.to(x.dtype).unsqueeze(1)  # (B, 1, L/4)
        x = x * weights
        for block in self.blocks:
            x = block(x, weights)  # (B, C, L/4)
        mean = masked_mean(x.transpose(1, 2), mask)  # (B, C)
        peak = x.amax(dim=2)  # (B, C); values are >= 0 and padding is 0, so padding never wins
        return self.head(torch.cat([mean, peak], dim=1))  # (B, D)
