"""SAT's U-Net backbone: a plain 6-stage convolutional encoder-decoder without output heads.

Layout from github.com/zhaoziheng/SAT ``model/`` (SAT vendors MIC-DKFZ dynamic-network-architectures,
Apache-2.0, ``PlainConvUNet`` with the segmentation heads removed): 3x3x3 convolutions with
bias and padding 1, ``InstanceNorm3d(eps=1e-5, affine=True)``, ``LeakyReLU(0.01)``; the first
convolution of stages 1-5 has stride 2; the decoder upsamples with ``ConvTranspose3d(k=2, s=2)``
to the skip's width and concatenates ``[upsampled, skip]``.

Module names follow the released state dict. Every conv block also lists its convolution and
norm under ``all_modules`` (0 = conv, 1 = norm) as the upstream building block does, so the
checkpoint's alias keys (``convs.i.conv.weight`` = ``convs.i.all_modules.0.weight``) load
strictly; they are the same tensors.

Tensors are [B, C, H, W, D] (H, W, D = x, y, z of a RAS volume).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class ConvBlock(nn.Module):
    """conv 3x3x3 -> InstanceNorm -> LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True)
        self.norm = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True)
        # The same conv and norm again, under the names the released checkpoints also carry.
        self.all_modules = nn.Sequential(self.conv, self.norm, nn.LeakyReLU(0.01, inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.all_modules(x)


class ConvStack(nn.Module):
    """``n_conv`` conv blocks; only the first may downsample."""

    def __init__(self, n_conv: int, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        blocks = [ConvBlock(in_channels, out_channels, stride)]
        blocks += [ConvBlock(out_channels, out_channels) for _ in range(n_conv - 1)]
        self.convs = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


class Encoder(nn.Module):
    """Six stages; returns every stage's output (full resolution first)."""

    def __init__(self, in_channels: int, features: Sequence[int], n_conv: int) -> None:
        super().__init__()
        stages = []
        previous = in_channels
        for i, width in enumerate(features):
            # a one-element Sequential per stage: the checkpoint's "stages.<i>.0.convs" names
            stages.append(nn.Sequential(ConvStack(n_conv, previous, width, stride=1 if i == 0 else 2)))
            previous = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """Five stages from the bottom: upsample, concatenate the skip, convolve."""

    def __init__(self, features: Sequence[int], n_conv: int) -> None:
        super().__init__()
        ups, stages = [], []
        for s in range(len(features) - 1):
            below, skip = features[-(s + 1)], features[-(s + 2)]
            ups.append(nn.ConvTranspose3d(below, skip, 2, stride=2, bias=True))
            stages.append(ConvStack(n_conv, 2 * skip, skip))
        self.stages = nn.ModuleList(stages)  # registered first: the checkpoint's key order
        self.transpconvs = nn.ModuleList(ups)

    def forward(self, skips: Sequence[Tensor]) -> Tensor:
        """The full-resolution output [B, features[0], H, W, D] (SAT's per-pixel embedding)."""
        x = skips[-1]
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), dim=1))
        return x


class UNetBackbone(nn.Module):
    """Encoder + decoder; ``forward`` returns (encoder stage outputs, per-pixel embedding)."""

    def __init__(self, in_channels: int, features: Sequence[int], n_conv: int) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, features, n_conv)
        self.decoder = Decoder(features, n_conv)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        skips = self.encoder(x)
        return skips, self.decoder(skips)
