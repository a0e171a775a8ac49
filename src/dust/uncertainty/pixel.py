"""Pixel-level uncertainty maps from logits (DUST Eq. 2, and the usual predictive entropy for comparison)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decoder_kl(main_logits: torch.Tensor, aux_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 2: D_kl = sum_c p_main log(p_main / p_aux) per pixel, (B, C, H, W) x 2 -> (B, H, W).

    Computed in float32 from log-softmax (never log of a softmax), so saturated bf16 logits give a finite,
    non-negative value instead of 0 * log 0 = NaN.
    """
    log_main = F.log_softmax(main_logits.float(), dim=1)
    log_aux = F.log_softmax(aux_logits.float(), dim=1)
    return (log_main.exp() * (log_main - log_aux)).sum(1)


def predictive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """-sum_c p log p per pixel, (B, C, H, W) -> (B, H, W), in float32."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1)
