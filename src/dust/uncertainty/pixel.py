"""Pixel-level uncertainty maps from logits (DUST Eq. 2, and the usual predictive entropy for comparison)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def decoder_kl(main_logits: torch.Tensor, aux_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 2: D_kl = sum_c p_main log(p_main / p_aux) per pixel (voxel), (B, C, *spatial) x 2 -> (B, *spatial).

    Computed in float32 from log-softmax (never log of a softmax), so saturated bf16 logits give a finite,
    non-negative value instead of 0 * log 0 = NaN.
    """
    log_main = F.log_softmax(main_logits.float(), dim=1)
    log_aux = F.log_softmax(aux_logits.float(), dim=1)
    return (log_main.exp() * (log_main - log_aux)).sum(1)


def predictive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """-sum_c p log p per pixel (voxel), (B, C, *spatial) -> (B, *spatial), in float32."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1)


def uncertainty_map(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(*spatial) float32 from the inference heads' probabilities (K, *spatial) (see ``Method.inference_heads``):
    D_kl(main || aux) of the two decoders (DUST Eq. 2) when there are three heads (prediction, main, aux), else
    the prediction's entropy."""
    log_probs = [p.clamp_min(1e-12).log()[None] for p in probs]  # valid logits: log_softmax(log p) = log p
    return (decoder_kl(log_probs[1], log_probs[2]) if len(log_probs) == 3 else predictive_entropy(log_probs[0]))[0]


def uncertainty_name(heads: int) -> str:
    """What :func:`uncertainty_map` computes for this many heads."""
    return "decoder KL (Eq. 2)" if heads == 3 else "predictive entropy"
