"""The contract every dust network keeps, so no caller needs to know which class it holds."""

from __future__ import annotations

import torch
import torch.nn as nn


class SegmentationNetwork(nn.Module):
    """A network returning class logits (B, K, *spatial).

    - ``forward(x)``: what training uses: the logits, or a tuple of heads for multi-head networks;
    - ``forward_main(x)``: the one output inference uses;
    - ``paired_decoders``: True when ``forward`` returns ``(main, aux)`` logits of two decoders on one encoder,
      whose disagreement (KL, DUST Eq. 2) is the pixel uncertainty; otherwise callers use the entropy.
    """

    spatial_dims: int = 2
    paired_decoders: bool = False

    def forward_main(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)
