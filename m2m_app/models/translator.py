"""2D image-to-image translators (a U-Net generator) and their two conditional discriminators.

All networks work on batches of 2D slices ``(N, C, H, W)``; ``H`` and ``W`` need not be
multiples of anything (the translator pads internally). Normalisation is GroupNorm,
activations LeakyReLU(0.2): both behave identically in training and inference and for
any batch size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: Slope of every LeakyReLU.
LEAK = 0.2


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with groups of (at most) 8 channels."""
    return nn.GroupNorm(max(1, channels // 8), channels)


class ConvBlock(nn.Sequential):
    """Two 3×3 convolutions, each followed by GroupNorm and LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(out_channels),
            nn.LeakyReLU(LEAK, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(out_channels),
            nn.LeakyReLU(LEAK, inplace=True),
        )


def level_channels(base: int, depth: int, max_factor: int = 8) -> list[int]:
    """Channels at each of the ``depth + 1`` resolution levels: ``base · 2^level`` capped at ``base · max_factor``."""
    return [base * min(2**level, max_factor) for level in range(depth + 1)]


class Encoder(nn.Module):
    """Conv blocks with 2× max-pool downsampling between them.

    ``forward`` returns the feature maps of every level, finest first:
    ``[(N, c0, H, W), (N, c1, H/2, W/2), ..., (N, c_depth, H/2^depth, W/2^depth)]``.
    """

    def __init__(self, in_channels: int, base: int = 24, depth: int = 4) -> None:
        super().__init__()
        channels = level_channels(base, depth)
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out) for c_in, c_out in zip([in_channels] + channels[:-1], channels)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for level, block in enumerate(self.blocks):
            x = block(F.max_pool2d(x, 2) if level else x)
            features.append(x)
        return features


class Generator(nn.Module):
    """U-Net decoder: bilinear 2× upsampling, concatenation with the encoder's skip, conv block.

    Maps the encoder's features to ``(N, out_channels, H, W)`` raw outputs (no activation).
    """

    def __init__(self, out_channels: int, base: int = 24, depth: int = 4) -> None:
        super().__init__()
        channels = level_channels(base, depth)
        self.blocks = nn.ModuleList(
            ConvBlock(channels[level + 1] + channels[level], channels[level]) for level in reversed(range(depth))
        )
        self.head = nn.Conv2d(channels[0], out_channels, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


class Translator(nn.Module):
    """Encoder + Generator: ``(N, in_channels, H, W)`` → raw ``(N, out_channels, H, W)``.

    Inputs are zero-padded to multiples of ``2^depth`` and the output cropped back.
    """

    def __init__(self, in_channels: int, out_channels: int, base: int = 24, depth: int = 4) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "base": base, "depth": depth}
        self.encoder = Encoder(in_channels, base, depth)
        self.generator = Generator(out_channels, base, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2 ** self.config["depth"]
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.generator(self.encoder(x))[..., :height, :width]


def _down(in_channels: int, out_channels: int, stride: int = 2, norm: bool = True) -> nn.Sequential:
    """4×4 convolution (PatchGAN style), optional GroupNorm, LeakyReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 4, stride=stride, padding=1, bias=not norm)]
    if norm:
        layers.append(_norm(out_channels))
    layers.append(nn.LeakyReLU(LEAK, inplace=True))
    return nn.Sequential(*layers)


class PatchDiscriminator(nn.Module):
    """PatchGAN (70×70 receptive field): a grid of real/fake logits ``(N, 1, ~H/8, ~W/8)``.

    Conditional: takes the network input and an output map concatenated on channels,
    ``in_channels`` = input channels + output channels.
    """

    def __init__(self, in_channels: int, base: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            _down(in_channels, base, norm=False),
            _down(base, base * 2),
            _down(base * 2, base * 4),
            _down(base * 4, base * 8, stride=1),
            nn.Conv2d(base * 8, 1, 4, padding=1),
        )

    def forward(self, condition: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([condition, output], dim=1))


class GlobalDiscriminator(nn.Module):
    """Image-level conditional discriminator: one real/fake logit per slice, ``(N, 1)``.

    Strided convolutions down to 1/32 resolution, global average pooling, linear head.
    """

    def __init__(self, in_channels: int, base: int = 32, depth: int = 5) -> None:
        super().__init__()
        channels = [base * min(2**level, 8) for level in range(depth)]
        self.features = nn.Sequential(
            *(
                _down(c_in, c_out, norm=level > 0)
                for level, (c_in, c_out) in enumerate(zip([in_channels] + channels[:-1], channels))
            )
        )
        self.head = nn.Linear(channels[-1], 1)

    def forward(self, condition: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        features = self.features(torch.cat([condition, output], dim=1))
        return self.head(features.mean(dim=(2, 3)))


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (weights and biases), frozen ones included: an averaged copy has no gradients."""
    return sum(p.numel() for p in module.parameters())
