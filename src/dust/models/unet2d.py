"""2D U-Net as used across semi-supervised medical segmentation (channels 16-32-64-128-256, SSL4MIS-sized).

The decoder's upsampling is selectable and really used:
- ``deconv``: transposed convolution (kernel 2, stride 2), the original U-Net decoder;
- ``bilinear``: 1x1 convolution, then bilinear interpolation.
``DualDecoderUNet2D`` shares one encoder between a deconv and a bilinear decoder: DUST reads the KL divergence
between their outputs as a pixel-level uncertainty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

UPSAMPLE_MODES = ("deconv", "bilinear")


class ConvBlock(nn.Sequential):
    """conv-BN-LeakyReLU, dropout, conv-BN-LeakyReLU."""

    def __init__(self, cin: int, cout: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(),
        )


class Encoder(nn.Module):
    def __init__(self, in_channels: int, channels: Sequence[int], dropout: Sequence[float]) -> None:
        super().__init__()
        if len(channels) != len(dropout):
            raise ValueError(f"channels {list(channels)} and dropout {list(dropout)} must have the same length")
        self.blocks = nn.ModuleList()
        cin = in_channels
        for cout, p in zip(channels, dropout, strict=True):
            self.blocks.append(ConvBlock(cin, cout, p))
            cin = cout

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats


class UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, mode: str) -> None:
        super().__init__()
        if mode == "deconv":
            self.up = nn.ConvTranspose2d(cin, cskip, kernel_size=2, stride=2)
        elif mode == "bilinear":
            self.up = nn.Sequential(
                nn.Conv2d(cin, cskip, kernel_size=1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            )
        else:
            raise ValueError(f"unknown upsample mode {mode!r}; choose one of {UPSAMPLE_MODES}")
        self.conv = ConvBlock(2 * cskip, cout, 0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class Decoder(nn.Module):
    def __init__(self, channels: Sequence[int], num_classes: int, mode: str) -> None:
        super().__init__()
        ch = list(channels)
        self.mode = mode
        self.ups = nn.ModuleList(UpBlock(ch[i], ch[i - 1], ch[i - 1], mode) for i in range(len(ch) - 1, 0, -1))
        self.head = nn.Conv2d(ch[0], num_classes, kernel_size=3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1]), strict=True):
            x = up(x, skip)
        return self.head(x)


class UNet2D(nn.Module):
    """A U-Net returning class logits (B, num_classes, H, W)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, channels, dropout)
        self.decoder = Decoder(channels, num_classes, upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DualDecoderUNet2D(nn.Module):
    """One encoder, a transposed-conv (main) decoder and a bilinear (auxiliary) decoder.

    ``forward`` returns ``(main_logits, aux_logits)``; inference uses the main (deconv) decoder.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    ) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, channels, dropout)
        self.decoder = Decoder(channels, num_classes, "deconv")
        self.aux_decoder = Decoder(channels, num_classes, "bilinear")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(x)
        return self.decoder(feats), self.aux_decoder(feats)

    def forward_main(self, x: torch.Tensor) -> torch.Tensor:
        """Main (deconv) decoder only: inference and pseudo-labelling do not need the auxiliary one."""
        return self.decoder(self.encoder(x))
