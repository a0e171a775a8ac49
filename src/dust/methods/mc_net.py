"""Mutual consistency, MC-Net (Wu et al., MICCAI 2021), weighted as its LA code (ycwu1997/MC-Net, train_mcnet_3d.py).

One encoder, two decoders that differ in up-sampling (transposed convolution and trilinear interpolation in 3D,
bilinear in 2D: ``make_model(cfg, variant="dual")``, the dual-decoder VNet / U-Net). Both decoders are supervised
on the labelled crops; on every crop (labelled and unlabelled) each decoder's softmax is pulled towards the other's
sharpened softmax (temperature 0.1, no gradient through the target):

    L = sup_weight * sum_d L_sup,d + w(t) * [MSE(p_1, sharpen(p_2)) + MSE(p_2, sharpen(p_1))]

sup_weight = MC-Net's lambda 0.5; w(t) = consistency_weight (1.0) * sigmoid ramp-up over ``rampup_fraction`` of the
run (the reference code ramps over 40 x 150 = 6000 of its 15000 LA iterations: 0.4). ``sup_loss``:
- ``dice`` (default): the code's L_sup,d, the soft Dice of the foreground classes with plain sums in the denominator
  (``Binary_dice_loss`` on the foreground channel); the code computes a cross-entropy too but leaves it out of the
  loss. Each decoder thus gets the foreground gradient of the code, where dust's (Dice + CE) / 2, whose Dice also
  averages the background, gives it about a quarter at sup_weight 0.5.
- ``dice_ce``: dust's shared (Dice + CE) / 2 (dust before 2026-12).
Inference uses the first (transposed-convolution) decoder; the two decoders' KL is the pixel uncertainty
``dust predict`` writes.

Where dust departs from the reference code: the sharpened target is detached, as a pseudo-label is (the code lets
the gradient flow into it as well); the 2D code (lambda 1, a Dice over all classes without the factor 2) is not
followed on 2D data: the LA code's weighting serves both. MC-Net+ (three decoders) is not built.
"""
from __future__ import annotations

import torch

from dust.config import ConfigError
from dust.losses import dice_loss, supervised_loss
from dust.methods.base import Method
from dust.methods.consistency import ramp, sharpen
from dust.methods.registry import register
from dust.models import make_model


def foreground_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MC-Net's ``Binary_dice_loss`` on the foreground classes: plain sums in the denominator."""
    return dice_loss(logits, target, include_background=False, squared=False)


SUPERVISED_LOSSES = {"dice": foreground_dice, "dice_ce": supervised_loss}


@register("mc_net")
class MutualConsistency(Method):
    defaults = {"consistency_weight": 1.0, "rampup_fraction": 0.4, "sup_weight": 0.5, "temperature": 0.1,
                "sup_loss": "dice"}
    uses_unlabeled = True

    def build(self) -> None:
        if self.cfg["sup_loss"] not in SUPERVISED_LOSSES:
            raise ConfigError(f"sup_loss {self.cfg['sup_loss']!r}: choose one of {list(SUPERVISED_LOSSES)}")
        self.networks["model"] = make_model(self.cfg, variant="dual")

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        n = len(batch["labeled_image"])
        x = torch.cat([batch["labeled_image"], batch["unlabeled_image"]])
        outputs = [out.float() for out in self.networks["model"](x)]
        probs = [torch.softmax(out, 1) for out in outputs]
        targets = [sharpen(p.detach(), self.cfg["temperature"]) for p in probs]
        mutual = (probs[0] - targets[1]).pow(2).mean() + (probs[1] - targets[0]).pow(2).mean()
        sup = sum(SUPERVISED_LOSSES[self.cfg["sup_loss"]](out[:n], batch["label"]) for out in outputs)
        weight = self.cfg["consistency_weight"] * ramp(self.cfg, iteration)
        return {"sup": self.cfg["sup_weight"] * sup, "cons": weight * mutual}
