"""The VNet of the left-atrium semi-supervised papers (Yu et al., UA-MT, MICCAI 2019; used by DTC, MC-Net, MCF).

Not Milletari et al.'s V-Net and not MONAI's ``VNet`` (5x5x5 convolutions, PReLU/ELU, residual stages, dropout on
every skip): the LA tables are measured on this smaller network, so dust rebuilds it from its description. Five
levels of ``channels`` (16-32-64-128-256 by default: Yu et al.'s 16 base filters), level i holding 1, 2, 3, 3, 3
convolutions 3x3(x3) + BatchNorm + ReLU; down-sampling by a stride-2 convolution of kernel 2 (+ BN + ReLU); the decoder
adds (not concatenates) each up-sampled map to its skip and mirrors the stages (3, 3, 2, 1); a 1x1(x1) convolution
gives the logits. Up-sampling is a transposed convolution of kernel 2 (``deconv``, Yu et al.) or trilinear
interpolation then a 3x3x3 convolution (``trilinear``, the second decoder of MC-Net), each + BN + ReLU.

Dropout as they place it: channel dropout (Dropout3d) on the bottleneck's output and before the output convolution,
at ``dropout[-1]`` (0.5 in their code); the other entries of ``dropout`` add channel dropout after that encoder level
(0 in the LA configs, as in the papers). ``spatial_dims=2`` gives the same network with 2D layers.
``DualDecoderVNet`` (MC-Net's model, and DUST's in 3D) shares the encoder between a deconv and a trilinear decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from dust.models.base import DualDecoderNetwork, EncoderDecoder
from dust.models.layers import batchnorm, channel_dropout, check_upsample, conv, conv_transpose, linear_mode

ENCODER_STAGES = (1, 2, 3, 3, 3)  # convolutions per level, shallowest first (Yu et al.)


def conv_stage(n: int, cin: int, cout: int, dims: int) -> nn.Sequential:
    """``n`` x (conv 3 + BatchNorm + ReLU)."""
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [conv(dims)(cin if i == 0 else cout, cout, 3, padding=1), batchnorm(dims)(cout),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def resample_stage(cin: int, cout: int, dims: int, mode: str) -> nn.Sequential:
    """Down-sampling (``mode="down"``) or up-sampling by 2, + BatchNorm + ReLU."""
    if mode == "down":
        layers: list[nn.Module] = [conv(dims)(cin, cout, 2, stride=2)]
    elif check_upsample(mode) == "deconv":
        layers = [conv_transpose(dims)(cin, cout, 2, stride=2)]
    else:
        layers = [nn.Upsample(scale_factor=2, mode=linear_mode(dims), align_corners=True),
                  conv(dims)(cin, cout, 3, padding=1)]
    return nn.Sequential(*layers, batchnorm(dims)(cout), nn.ReLU(inplace=True))


class VNetEncoder(nn.Module):
    def __init__(self, in_channels: int, channels: Sequence[int], dropout: Sequence[float], dims: int) -> None:
        super().__init__()
        if len(channels) != len(ENCODER_STAGES) or len(dropout) != len(channels):
            raise ValueError(f"the VNet has {len(ENCODER_STAGES)} levels: channels {list(channels)} and dropout "
                             f"{list(dropout)} need {len(ENCODER_STAGES)} entries each")
        ch = list(channels)
        inputs = [in_channels, *ch[1:]]  # level i > 0 sees the down-sampled map, already ch[i] channels
        self.blocks = nn.ModuleList(conv_stage(n, cin, cout, dims)
                                    for n, cin, cout in zip(ENCODER_STAGES, inputs, ch, strict=True))
        self.downs = nn.ModuleList(resample_stage(ch[i], ch[i + 1], dims, "down") for i in range(len(ch) - 1))
        self.dropouts = nn.ModuleList(channel_dropout(dims)(p) if p > 0 else nn.Identity() for p in dropout)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, (block, drop) in enumerate(zip(self.blocks, self.dropouts, strict=True)):
            x = drop(block(x if i == 0 else self.downs[i - 1](x)))
            feats.append(x)
        return feats


class VNetDecoder(nn.Module):
    def __init__(self, channels: Sequence[int], num_classes: int, mode: str, dropout: float, dims: int) -> None:
        super().__init__()
        ch = list(channels)
        levels = range(len(ch) - 1, 0, -1)  # 4 -> 3, 3 -> 2, 2 -> 1, 1 -> 0
        self.ups = nn.ModuleList(resample_stage(ch[i], ch[i - 1], dims, mode) for i in levels)
        self.blocks = nn.ModuleList(conv_stage(ENCODER_STAGES[i - 1], ch[i - 1], ch[i - 1], dims) for i in levels)
        self.dropout = channel_dropout(dims)(dropout) if dropout > 0 else nn.Identity()
        self.head = conv(dims)(ch[0], num_classes, 1)

    def stages(self, feats: list[torch.Tensor],
               after_level: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The features after each decoder level, deepest first (the last one feeds the head). ``after_level(i, x)``,
        if given, replaces level i's output before the next level reads it (e.g. MultiCURE's refinement)."""
        x, out = feats[-1], []
        for i, (up, block, skip) in enumerate(zip(self.ups, self.blocks, reversed(feats[:-1]), strict=True)):
            x = block(up(x) + skip)
            if after_level is not None:
                x = after_level(i, x)
            out.append(x)
        return out

    def output(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from the last level's features."""
        return self.head(self.dropout(features))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.output(self.stages(feats)[-1])


class VNet(EncoderDecoder):
    """Yu et al.'s VNet returning class logits (B, num_classes, *spatial); spatial sizes divisible by 16."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0, 0.5),
        upsample: str = "deconv",
        spatial_dims: int = 3,
    ) -> None:
        super().__init__(VNetEncoder(in_channels, channels, dropout, spatial_dims),
                         VNetDecoder(channels, num_classes, upsample, dropout[-1], spatial_dims), spatial_dims)


class DualDecoderVNet(DualDecoderNetwork):
    """MC-Net's VNet: one encoder, a transposed-conv (main) and a trilinear (auxiliary) decoder.

    ``forward`` returns ``(main_logits, aux_logits)``; inference uses the main (deconv) decoder.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0, 0.5),
        spatial_dims: int = 3,
    ) -> None:
        super().__init__(VNetEncoder(in_channels, channels, dropout, spatial_dims),
                         VNetDecoder(channels, num_classes, "deconv", dropout[-1], spatial_dims),
                         VNetDecoder(channels, num_classes, linear_mode(spatial_dims), dropout[-1], spatial_dims),
                         spatial_dims)
