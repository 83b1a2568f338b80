"""Per-frame image features: a configurable CNN backbone applied to each sampled video frame.

Three backbones: `small` (a four-layer CNN that trains in seconds on a CPU, the default),
`mobilenet_v3_small` and `resnet18` from torchvision. Weights are random by default, read
from a local file (a state dict saved with `torch.save` or as safetensors), or taken from
torchvision's weights enum by name (`DEFAULT`, `IMAGENET1K_V1`), which downloads them and so
needs a network connection.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from recsys.config import ConfigError
from recsys.errors import DataFormatError, MissingInputError

Backbone = Literal["small", "mobilenet_v3_small", "resnet18"]
BACKBONES: tuple[str, ...] = ("small", "mobilenet_v3_small", "resnet18")

# torchvision's pretrained weights expect ImageNet-normalised input; random weights do not
# mind, so one normalisation serves every backbone.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Names of the classification head that each torchvision backbone drops; a checkpoint of the
# full classifier may carry these keys, which are then ignored.
_HEAD_PREFIXES = {"mobilenet_v3_small": "classifier.", "resnet18": "fc."}
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class SmallCNN(nn.Module):
    """A patchify stem and two strided conv blocks: a backbone cheap enough for CPU training.

    The stride-4 stem keeps the activations small (a 64x64 frame becomes 16x16 at once),
    which is what makes CPU training fast; shapes and colours in the synthetic corpus and in
    thumbnails are much larger than 4 pixels.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=4, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
        )
        self.out_channels = 2 * width

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)  # (N, C, S/16, S/16)


def build_backbone(name: Backbone, weights: str | Path | None = None) -> tuple[nn.Module, int]:
    """The convolutional part of a backbone (images → feature map) and its number of channels.

    `weights`: None (random), a local file, or a torchvision weights name such as `DEFAULT`.
    A local file may hold the full torchvision classifier; its head's keys are ignored.
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    enum_weights = None
    local_file: Path | None = None
    if weights is not None:
        local_file = _local_weights_file(weights)
        if local_file is None:
            enum_weights = _torchvision_weights(name, str(weights))

    if name == "small":
        net: nn.Module = SmallCNN()
        channels = net.out_channels
    elif name == "mobilenet_v3_small":
        net = torchvision.models.mobilenet_v3_small(weights=enum_weights)
        channels = net.classifier[0].in_features
        net.avgpool, net.classifier = nn.Identity(), nn.Identity()
    else:
        net = torchvision.models.resnet18(weights=enum_weights)
        channels = net.fc.in_features
        net.avgpool, net.fc = nn.Identity(), nn.Identity()

    if local_file is not None:
        load_backbone_weights(net, local_file, head_prefix=_HEAD_PREFIXES.get(name))
    return _FeatureMap(net, name), channels


class _FeatureMap(nn.Module):
    """Runs a backbone up to its last feature map (N, C, h, w), whatever its own forward flattens."""

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net = net
        self.name = name

    def forward(self, images: Tensor) -> Tensor:
        if self.name == "mobilenet_v3_small":
            return self.net.features(images)  # (N, 576, S/32, S/32)
        if self.name == "resnet18":
            n = self.net
            x = n.maxpool(n.relu(n.bn1(n.conv1(images))))
            return n.layer4(n.layer3(n.layer2(n.layer1(x))))  # (N, 512, S/32, S/32)
        return self.net(images)  # (N, C, S/16, S/16)


def _local_weights_file(weights: str | Path) -> Path | None:
    """The file `weights` names, None when it is a torchvision weights name instead."""
    path = Path(weights)
    if path.is_file():
        return path
    if path.suffix in _WEIGHT_SUFFIXES or len(path.parts) > 1:
        raise MissingInputError(f"backbone weights file {path} does not exist")
    return None


def _torchvision_weights(name: str, weights: str) -> torchvision.models.WeightsEnum:
    if name == "small":
        raise ConfigError(
            f"backbone 'small' has no torchvision weights ({weights!r}); give a local weights file or none"
        )
    enum = torchvision.models.get_model_weights(name)
    member = weights.rsplit(".", 1)[-1]  # accept both "DEFAULT" and "MobileNet_V3_Small_Weights.DEFAULT"
    try:
        return enum[member]
    except KeyError:
        choices = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ConfigError(
            f"backbone weights {weights!r} is neither a file nor a torchvision weights name for {name} "
            f"({choices})"
        ) from None


def load_backbone_weights(net: nn.Module, path: Path, head_prefix: str | None = None) -> None:
    """Load a state dict from `path` into `net`; keys of a dropped classification head are ignored."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many kinds for a corrupt file
        raise DataFormatError(f"{path}: cannot read backbone weights ({err})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataFormatError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    state = {k.removeprefix("net."): v for k, v in state.items()}  # also accept a saved `_FeatureMap`
    if head_prefix is not None:
        state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DataFormatError(
            f"{path}: weights do not fit the backbone (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); save the state dict of the same backbone"
        )


def spatial_soft_argmax(maps: Tensor, log_temperature: Tensor) -> Tensor:
    """Expected (x, y) in [-1, 1] of each channel's activation (softmax over positions): (N, C, h, w) → (N, C, 2)."""
    n, c, h, w = maps.shape
    logits = maps.flatten(2) / log_temperature.exp().view(1, c, 1)  # (N, C, h*w)
    weights = logits.softmax(-1).view(n, c, h, w)
    xs = torch.linspace(-1.0, 1.0, w, device=maps.device, dtype=maps.dtype)
    ys = torch.linspace(-1.0, 1.0, h, device=maps.device, dtype=maps.dtype)
    x = (weights.sum(2) * xs).sum(-1)  # (N, C)
    y = (weights.sum(3) * ys).sum(-1)  # (N, C)
    return torch.stack([x, y], dim=-1)  # (N, C, 2)


class FrameCNN(nn.Module):
    """Applies a CNN backbone to each frame: standardised images (N, 3, S, S) → features (N, 3C).

    Per frame, the last feature map (C channels) gives two things: *what* is there (its global
    average, C values) and *where* (each channel's spatial soft-argmax, an (x, y) pair in
    [-1, 1], 2C values). Pooling alone would make the features blind to position, and then no
    temporal model could see which way an object moves; explicit coordinates make motion a
    difference of positions, which a GRU learns quickly.
    Layout of the output: [appearance (C) | x (C) | y (C)].
    """

    def __init__(self, backbone: Backbone = "small", weights: str | Path | None = None, freeze: bool = False
                 ) -> None:
        super().__init__()
        self.backbone, self.channels = build_backbone(backbone, weights)
        self.out_dim = 3 * self.channels
        # A sharp softmax from the start (T = 0.2): a flat one puts every channel at the centre,
        # and then the coordinates carry no motion for the temporal encoder to learn from.
        self.log_temperature = nn.Parameter(torch.full((self.channels,), math.log(0.2)))
        self.frozen = freeze
        if freeze:
            self.backbone.requires_grad_(False)
        std = torch.tensor(IMAGENET_STD)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)  # uint8 → [0, 1] → standardised
        self.register_buffer("shift", -torch.tensor(IMAGENET_MEAN) / std, persistent=False)

    def train(self, mode: bool = True) -> FrameCNN:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen BatchNorm statistics must not drift with the new data
        return self

    def prepare(self, frames: Tensor) -> Tensor:
        """uint8 RGB frames (N, S, S, 3) from the feature store → standardised float images (N, 3, S, S).

        The result keeps the store's channels-last memory layout (a permuted view, no copy),
        which the CPU convolutions read about twice as fast as NCHW; the scaling runs in place.
        On CPU the uint8 → float32 cast goes through numpy: torch's measured 3-5x slower
        (torch 2.14, one thread), the largest cost of extraction after the backbone itself.
        """
        if frames.device.type == "cpu":
            x = torch.from_numpy(frames.numpy().astype(np.float32))  # (N, S, S, 3)
        else:
            x = frames.float()
        x = x.permute(0, 3, 1, 2)  # (N, 3, S, S) view, channels-last in memory
        return x.mul_(self.scale.view(1, 3, 1, 1)).add_(self.shift.view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        """Images prepared by `prepare` (N, 3, S, S) → per-frame features (N, 3C)."""
        # A frozen backbone needs no graph: nothing before it learns, so skip the activation memory.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            maps = self.backbone(images)  # (N, C, h, w)
        appearance = maps.mean(dim=(2, 3))  # (N, C)
        where = spatial_soft_argmax(maps, self.log_temperature)  # (N, C, 2)
        return torch.cat([appearance, where[..., 0], where[..., 1]], dim=1)  # (N, 3C)

    def translate(self, features: Tensor, offsets: Tensor) -> Tensor:
        """Features (..., 3C) of frames whose content moved by `offsets` (..., 2) in [-1, 1] units."""
        c = self.channels
        x = features[..., c:2 * c] + offsets[..., :1]
        y = features[..., 2 * c:] + offsets[..., 1:]
        return torch.cat([features[..., :c], x, y], dim=-1)
