"""Uncertainty-rectified pyramid consistency, URPC (Luo et al., MICCAI 2021), as in the authors' SSL4MIS code.

One deep-supervision network (``DeepSupervisionUNet`` / ``DeepSupervisionVNet``: main head + heads at 1/2, 1/4, 1/8 with
dropout / feature-dropout / feature-noise perturbations, upsampled to full size) sees labelled + unlabelled
slices in one forward. Supervised: the mean over the 4 heads of (Dice + CE) / 2. On unlabelled slices, with p_s
the softmax of head s and p the mean of the 4: u_s = KL(p || p_s) per pixel (the scale's uncertainty) and

    L_s = mean((p - p_s)^2 * exp(-u_s)) / mean(exp(-u_s)) + mean(u_s),   L_urpc = mean over s of L_s,

weighted by consistency_weight * sigmoid ramp-up over ``rampup_fraction`` of the run (0.1, 1.0: SSL4MIS's 200 x
150 = 30000 of 30000 iterations). As in that code, the gradient also flows through p and the weights.
Inference uses the main (full-resolution) head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dust.losses import supervised_loss
from dust.methods.base import Method
from dust.methods.consistency import RAMPED_CONSISTENCY_DEFAULTS, ramp
from dust.methods.registry import register
from dust.models import make_model


def rectified_pyramid_consistency(logits_per_scale: list[torch.Tensor]) -> torch.Tensor:
    """L_urpc over S heads' logits (B, C, *spatial), each at full size."""
    log_probs = [F.log_softmax(z.float(), 1) for z in logits_per_scale]
    mean = torch.stack([lp.exp() for lp in log_probs]).mean(0)
    terms = []
    for lp in log_probs:
        kl = (torch.xlogy(mean, mean) - mean * lp).sum(1, keepdim=True)  # KL(mean || p_s), (B, 1, *spatial)
        weight = torch.exp(-kl)
        rectified = ((mean - lp.exp()).pow(2) * weight).mean() / (weight.mean() + 1e-8)
        terms.append(rectified + kl.mean())
    return torch.stack(terms).mean()


@register("urpc")
class URPC(Method):
    defaults = dict(RAMPED_CONSISTENCY_DEFAULTS)
    uses_unlabeled = True

    def build(self) -> None:
        self.networks["model"] = make_model(self.cfg, variant="ds")  # the configured family's deep-supervision net

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        n = len(batch["labeled_image"])
        heads = self.networks["model"](torch.cat([batch["labeled_image"], batch["unlabeled_image"]]))
        sup = torch.stack([supervised_loss(z[:n], batch["label"]) for z in heads]).mean()
        weight = self.cfg["consistency_weight"] * ramp(self.cfg, iteration)
        return {"sup": sup, "cons": weight * rectified_pyramid_consistency([z[n:] for z in heads])}
