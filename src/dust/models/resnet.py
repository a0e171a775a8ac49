"""MCF's second subnet: a VNet decoder on a residual (ResNet-34 layout) encoder, in 2D or 3D.

MCF (Wang et al., CVPR 2023) co-trains two *different* networks so that their errors differ: Yu et al.'s VNet and a
"3D ResNet" segmenter. The encoder here keeps the VNet's five levels and widths (``channels``, 16-32-64-128-256),
so the VNet decoder reads it unchanged: level 0 is one 3x3(x3) convolution + BatchNorm + ReLU, levels 1-4 are
ResNet-34's stages of 3, 4, 6 and 3 basic blocks (two 3x3(x3) convolutions + BatchNorm, identity shortcut; the
first block of a stage strides by 2 and projects its shortcut with a 1x1(x1) convolution + BatchNorm). Channel
dropout at ``dropout[-1]`` on the bottleneck output and before the head, as the VNet places it.

Not a copy of the reference code's ``networks/ResNet34.py`` (which is not in the public snapshot dust could read):
this is ResNet-34's block layout at the VNet's widths and depth, the shape the paper describes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from dust.models.base import EncoderDecoder
from dust.models.layers import batchnorm, channel_dropout, conv
from dust.models.vnet import VNetDecoder, conv_stage

RESNET34_STAGES = (3, 4, 6, 3)  # basic blocks per down-sampling stage


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dims: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(dims)(cin, cout, 3, stride=stride, padding=1, bias=False), batchnorm(dims)(cout),
            nn.ReLU(inplace=True),
            conv(dims)(cout, cout, 3, padding=1, bias=False), batchnorm(dims)(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            conv(dims)(cin, cout, 1, stride=stride, bias=False), batchnorm(dims)(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """Five feature maps (shallowest first) at full, 1/2, 1/4, 1/8 and 1/16 resolution, like ``VNetEncoder``."""

    def __init__(self, in_channels: int, channels: Sequence[int], dropout: Sequence[float], dims: int) -> None:
        super().__init__()
        ch = list(channels)
        if len(ch) != len(RESNET34_STAGES) + 1:
            raise ValueError(f"the ResNet encoder has {len(RESNET34_STAGES) + 1} levels; got channels {ch}")
        self.stem = conv_stage(1, in_channels, ch[0], dims)  # the VNet's level 0
        self.stages = nn.ModuleList(
            nn.Sequential(*(BasicBlock(ch[i] if b == 0 else ch[i + 1], ch[i + 1], 2 if b == 0 else 1, dims)
                            for b in range(n)))
            for i, n in enumerate(RESNET34_STAGES))
        self.dropout = channel_dropout(dims)(dropout[-1]) if dropout[-1] > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        feats[-1] = self.dropout(feats[-1])
        return feats


class ResNetVNet(EncoderDecoder):
    """The residual encoder + Yu et al.'s VNet decoder: class logits (B, num_classes, *spatial)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0, 0.5),
        upsample: str = "deconv",
        spatial_dims: int = 3,
    ) -> None:
        super().__init__(ResNetEncoder(in_channels, channels, dropout, spatial_dims),
                         VNetDecoder(channels, num_classes, upsample, dropout[-1], spatial_dims), spatial_dims)
