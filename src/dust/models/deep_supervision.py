"""U-Net with deep-supervision heads at every decoder scale, and the feature perturbations URPC puts on them.

``DeepSupervisionUNet2D`` is ``UNet2D`` (same encoder, decoder and main head) plus a 3x3 convolution head after
each of the first three decoder blocks (scales 1/8, 1/4, 1/2), upsampled to the input size (nearest, as SSL4MIS's
UNet_URPC). In training mode each auxiliary head sees a differently perturbed feature map, deepest first:
dropout (p = 0.5), feature dropout (zero where the channel-mean activation exceeds 0.7-0.9 of its maximum) and
multiplicative uniform feature noise (+-0.3), the perturbations of cross-consistency training (Ouali et al.
2020) that URPC uses; in eval mode the heads see the clean features. Random draws use torch's global generator,
so a resumed run reproduces them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dust.models.unet2d import UNet2D


def feature_dropout(x: torch.Tensor) -> torch.Tensor:
    """Zero the positions whose channel-mean activation is at least 0.7-0.9 (random per call) of its maximum."""
    attention = x.mean(1, keepdim=True)
    peak = attention.flatten(1).max(1).values.view(-1, 1, 1, 1)
    threshold = peak * (0.7 + 0.2 * torch.rand((), device=x.device))
    return x * (attention < threshold).to(x.dtype)


def feature_noise(x: torch.Tensor, strength: float = 0.3) -> torch.Tensor:
    """x + x * n, one uniform noise map n in [-strength, strength] of shape (C, H, W) shared by the batch."""
    noise = (torch.rand(x.shape[1:], device=x.device) * 2 - 1) * strength
    return x + x * noise.to(x.dtype)


AUX_PERTURBATIONS = (lambda x: F.dropout(x, 0.5, training=True), feature_dropout, feature_noise)


class DeepSupervisionUNet2D(UNet2D):
    """``forward`` returns (main, aux 1/2, aux 1/4, aux 1/8) logits, all (B, num_classes, H, W)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
        upsample: str = "bilinear",
    ) -> None:
        if len(channels) != len(AUX_PERTURBATIONS) + 2:
            raise ValueError(f"the deep-supervision U-Net has 5 levels (3 auxiliary heads); got channels {channels}")
        super().__init__(in_channels, num_classes, channels, dropout, upsample)
        # after decoder block j the features have channels[-2 - j] channels
        self.aux_heads = nn.ModuleList(
            nn.Conv2d(channels[-2 - j], num_classes, kernel_size=3, padding=1) for j in range(len(AUX_PERTURBATIONS))
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.encoder(x)
        h, aux = feats[-1], []
        for j, (up, skip) in enumerate(zip(self.decoder.ups, reversed(feats[:-1]), strict=True)):
            h = up(h, skip)
            if j < len(self.aux_heads):
                features = AUX_PERTURBATIONS[j](h) if self.training else h
                aux.append(F.interpolate(self.aux_heads[j](features), size=x.shape[-2:], mode="nearest"))
        return (self.decoder.head(h), *reversed(aux))

    def forward_main(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution head only (inference): the plain U-Net's forward."""
        return super().forward(x)
