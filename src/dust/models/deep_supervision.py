"""Deep-supervision heads at every decoder scale, and the feature perturbations URPC puts on them, for a U-Net or a
VNet in 2D or 3D.

``DeepSupervisionNetwork`` is the family's plain network (same encoder, decoder and main head) plus a 3x3(x3)
convolution head after each of the first three decoder levels (scales 1/8, 1/4, 1/2), upsampled to the input size
(nearest, as SSL4MIS's UNet_URPC). In training mode each auxiliary head sees a differently perturbed feature map,
deepest first: dropout (p = 0.5), feature dropout (zero where the channel-mean activation exceeds 0.7-0.9 of its
maximum) and multiplicative uniform feature noise (+-0.3), the perturbations of cross-consistency training (Ouali
et al. 2020) that URPC uses; in eval mode the heads see the clean features. Random draws use torch's global
generator, so a resumed run reproduces them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dust.models.base import EncoderDecoder
from dust.models.layers import conv
from dust.models.unet import Decoder, Encoder
from dust.models.vnet import VNetDecoder, VNetEncoder


def feature_dropout(x: torch.Tensor) -> torch.Tensor:
    """Zero the positions whose channel-mean activation is at least 0.7-0.9 (random per call) of its maximum."""
    attention = x.mean(1, keepdim=True)
    peak = attention.flatten(1).max(1).values.view(-1, *[1] * (x.dim() - 1))
    threshold = peak * (0.7 + 0.2 * torch.rand((), device=x.device))
    return x * (attention < threshold).to(x.dtype)


def feature_noise(x: torch.Tensor, strength: float = 0.3) -> torch.Tensor:
    """x + x * n, one uniform noise map n in [-strength, strength] of shape (C, *spatial) shared by the batch."""
    noise = (torch.rand(x.shape[1:], device=x.device) * 2 - 1) * strength
    return x + x * noise.to(x.dtype)


AUX_PERTURBATIONS = (lambda x: F.dropout(x, 0.5, training=True), feature_dropout, feature_noise)


def _levels(channels: Sequence[int]) -> Sequence[int]:
    if len(channels) != len(AUX_PERTURBATIONS) + 2:
        raise ValueError(f"the deep-supervision network has 5 levels (3 auxiliary heads); got channels {channels}")
    return channels


class DeepSupervisionNetwork(EncoderDecoder):
    """``forward`` returns (main, aux 1/2, aux 1/4, aux 1/8) logits, all (B, num_classes, *spatial)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, channels: Sequence[int], num_classes: int,
                 spatial_dims: int) -> None:
        super().__init__(encoder, decoder, spatial_dims)
        # after decoder level j the features have channels[-2 - j] channels
        self.aux_heads = nn.ModuleList(conv(spatial_dims)(channels[-2 - j], num_classes, kernel_size=3, padding=1)
                                       for j in range(len(AUX_PERTURBATIONS)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stages = self.decoder.stages(self.encoder(x))
        aux = []
        for j, head in enumerate(self.aux_heads):
            features = AUX_PERTURBATIONS[j](stages[j]) if self.training else stages[j]
            aux.append(F.interpolate(head(features), size=x.shape[2:], mode="nearest"))
        return (self.decoder.output(stages[-1]), *reversed(aux))


class DeepSupervisionUNet(DeepSupervisionNetwork):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
        upsample: str = "bilinear",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(Encoder(in_channels, _levels(channels), dropout, spatial_dims),
                         Decoder(channels, num_classes, upsample, spatial_dims), channels, num_classes, spatial_dims)


class DeepSupervisionVNet(DeepSupervisionNetwork):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0, 0.5),
        upsample: str = "deconv",
        spatial_dims: int = 3,
    ) -> None:
        super().__init__(VNetEncoder(in_channels, _levels(channels), dropout, spatial_dims),
                         VNetDecoder(channels, num_classes, upsample, dropout[-1], spatial_dims), channels,
                         num_classes, spatial_dims)


DeepSupervisionUNet2D = DeepSupervisionUNet  # the 2D-only name, kept for code that imports it
