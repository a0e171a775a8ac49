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


class EncoderDecoder(SegmentationNetwork):
    """An encoder whose list of features (shallowest first) a decoder turns into logits; the U-Net and VNet families
    and their variants differ only in the modules they pass in (attribute names give the state_dict keys)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.encoder, self.decoder = encoder, decoder

    def forward_main(self, x: torch.Tensor) -> torch.Tensor:
        """The main decoder's logits only (inference and pseudo-labelling need no other head)."""
        return self.decoder(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_main(x)


class DualDecoderNetwork(EncoderDecoder):
    """One encoder, a main and an auxiliary decoder: ``forward`` returns ``(main_logits, aux_logits)``."""

    paired_decoders = True

    def __init__(self, encoder: nn.Module, decoder: nn.Module, aux_decoder: nn.Module, spatial_dims: int) -> None:
        super().__init__(encoder, decoder, spatial_dims)
        self.aux_decoder = aux_decoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(x)
        return self.decoder(feats), self.aux_decoder(feats)
