"""Dual-task consistency, DTC (Luo et al., AAAI 2021).

One network, two heads on the same last decoder features (``make_model(cfg, variant="sdf")``): class logits and,
through a tanh, a level-set map per foreground class (signed distance: negative inside, positive outside, zero on
the boundary, normalised to [-1, 1]). With p = softmax(logits) and q = sigmoid(-k * level set) (k = 1500, the
transform that turns a level set into a soft mask):

    L = (Dice + CE) / 2 on the labelled crops                      (segmentation head)
      + sdf_weight * MSE(level set, SDF of the labelled crops)      (level-set head, sdf_weight = beta = 0.3)
      + w(t) * mean (q - p_foreground)^2 over labelled + unlabelled (the dual-task consistency)

w(t) = consistency_weight (1.0) * sigmoid ramp-up over ``rampup_fraction`` of the run (DTC's code: 40 "epochs" of
150 iterations = its whole 6000-iteration LA run, so 1.0). Inference uses the segmentation head.

Where dust departs from the reference code (HiLab-git/DTC, ``train_la_dtc.py``): the segmentation loss is dust's
shared (Dice + CE) / 2 on the softmax of K >= 2 classes, the paper's L_seg, where the code uses the Dice of one
sigmoid channel only; so the level-set head has K - 1 channels and the consistency compares it with the softmax's
foreground channels. As in the code, the SDF is computed on each labelled crop (after augmentation), with the
normalisation of that crop, not once per volume: the crops change every draw, and so do their distances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dust.losses import level_set_to_probability, signed_distance_map, supervised_loss
from dust.methods.base import Method
from dust.methods.consistency import ramp
from dust.methods.registry import register
from dust.models import make_model


@register("dtc")
class DualTaskConsistency(Method):
    defaults = {"consistency_weight": 1.0, "rampup_fraction": 1.0, "sdf_weight": 0.3, "level_set_k": 1500.0}
    uses_unlabeled = True

    def build(self) -> None:
        self.networks["model"] = make_model(self.cfg, variant="sdf")

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        n = len(batch["labeled_image"])
        logits, level_set = self.networks["model"](torch.cat([batch["labeled_image"], batch["unlabeled_image"]]))
        level_set = level_set.float()
        target_sdf = signed_distance_map(batch["label"], int(self.cfg["num_classes"]))
        foreground = torch.softmax(logits.float(), 1)[:, 1:]
        dual_task = (level_set_to_probability(level_set, self.cfg["level_set_k"]) - foreground).pow(2).mean()
        weight = self.cfg["consistency_weight"] * ramp(self.cfg, iteration)
        return {"sup": supervised_loss(logits[:n], batch["label"]),
                "sdf": self.cfg["sdf_weight"] * F.mse_loss(level_set[:n], target_sdf),
                "cons": weight * dual_task}
