"""A segmentation network with a second, level-set head (DTC, Luo et al., AAAI 2021).

DTC's VNet ends in two 1x1(x1) convolutions on the same last decoder features: the class logits and, through a
tanh, a signed distance map per foreground class (negative inside, positive outside, zero on the boundary; see
``dust.losses.signed_distance_map``). Any family's plain network (U-Net, VNet) gets the head, so the same method
runs in 2D and 3D.
"""

from __future__ import annotations

import torch

from dust.models.base import EncoderDecoder
from dust.models.layers import conv


class LevelSetNetwork(EncoderDecoder):
    """``forward`` returns ``(logits (B, K, *spatial), signed distance in (-1, 1) (B, K - 1, *spatial))``;
    ``forward_main`` (inference) the logits only."""

    def __init__(self, base: EncoderDecoder, num_classes: int) -> None:
        super().__init__(base.encoder, base.decoder, base.spatial_dims)
        features = base.decoder.head.in_channels
        self.level_set_head = conv(base.spatial_dims)(features, num_classes - 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.decoder.stages(self.encoder(x))[-1]
        return self.decoder.output(features), torch.tanh(self.level_set_head(features))
