"""U-Net as used across semi-supervised medical segmentation (channels 16-32-64-128-256, SSL4MIS-sized), 2D or 3D.

The decoder's upsampling is selectable and really used:
- ``deconv``: transposed convolution (kernel 2, stride 2), the original U-Net decoder;
- ``bilinear`` (``trilinear``): 1x1 convolution, then linear interpolation (align_corners, as SSL4MIS).
``DualDecoderUNet`` shares one encoder between a deconv and an interpolating decoder: DUST reads the KL divergence
between their outputs as a pixel-level uncertainty. ``spatial_dims`` (2 or 3) picks Conv2d/Conv3d, BatchNorm2d/3d
and bilinear/trilinear; the module tree is the same in both, so 2D checkpoints of the 2D-only U-Net still load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from dust.models.base import DualDecoderNetwork, EncoderDecoder
from dust.models.layers import batchnorm, check_upsample, conv, conv_transpose, linear_mode, max_pool


class ConvBlock(nn.Sequential):
    """conv-BN-LeakyReLU, dropout, conv-BN-LeakyReLU."""

    def __init__(self, cin: int, cout: int, dropout: float, dims: int = 2) -> None:
        Conv, Norm = conv(dims), batchnorm(dims)
        super().__init__(
            Conv(cin, cout, 3, padding=1),
            Norm(cout),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            Conv(cout, cout, 3, padding=1),
            Norm(cout),
            nn.LeakyReLU(),
        )


class Encoder(nn.Module):
    def __init__(self, in_channels: int, channels: Sequence[int], dropout: Sequence[float], dims: int = 2) -> None:
        super().__init__()
        if len(channels) != len(dropout):
            raise ValueError(f"channels {list(channels)} and dropout {list(dropout)} must have the same length")
        self.pool = max_pool(dims)
        self.blocks = nn.ModuleList()
        cin = in_channels
        for cout, p in zip(channels, dropout, strict=True):
            self.blocks.append(ConvBlock(cin, cout, p, dims))
            cin = cout

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.pool(x, 2))
            feats.append(x)
        return feats


class UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, mode: str, dims: int = 2) -> None:
        super().__init__()
        if check_upsample(mode) == "deconv":
            self.up = conv_transpose(dims)(cin, cskip, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                conv(dims)(cin, cskip, kernel_size=1),
                nn.Upsample(scale_factor=2, mode=linear_mode(dims), align_corners=True),
            )
        self.conv = ConvBlock(2 * cskip, cout, 0.0, dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class Decoder(nn.Module):
    def __init__(self, channels: Sequence[int], num_classes: int, mode: str, dims: int = 2) -> None:
        super().__init__()
        ch = list(channels)
        self.mode = mode
        self.ups = nn.ModuleList(UpBlock(ch[i], ch[i - 1], ch[i - 1], mode, dims) for i in range(len(ch) - 1, 0, -1))
        self.head = conv(dims)(ch[0], num_classes, kernel_size=3, padding=1)

    def stages(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The features after each up block, deepest first (the last one feeds ``head``)."""
        x, out = feats[-1], []
        for up, skip in zip(self.ups, reversed(feats[:-1]), strict=True):
            x = up(x, skip)
            out.append(x)
        return out

    def output(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from the last level's features."""
        return self.head(features)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.output(self.stages(feats)[-1])


class UNet(EncoderDecoder):
    """A U-Net returning class logits (B, num_classes, *spatial)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
        upsample: str = "bilinear",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(Encoder(in_channels, channels, dropout, spatial_dims),
                         Decoder(channels, num_classes, upsample, spatial_dims), spatial_dims)


class DualDecoderUNet(DualDecoderNetwork):
    """One encoder, a transposed-conv (main) decoder and a linear-interpolation (auxiliary) decoder.

    ``forward`` returns ``(main_logits, aux_logits)``; inference uses the main (deconv) decoder.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(Encoder(in_channels, channels, dropout, spatial_dims),
                         Decoder(channels, num_classes, "deconv", spatial_dims),
                         Decoder(channels, num_classes, linear_mode(spatial_dims), spatial_dims), spatial_dims)


UNet2D = UNet  # the names of the 2D-only U-Net, kept for code that imports them
DualDecoderUNet2D = DualDecoderUNet
