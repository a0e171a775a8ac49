"""Uncertainty-aware Mean Teacher, UA-MT (Yu et al., MICCAI 2019), on top of ``mean_teacher``.

As Mean Teacher, but the consistency term only counts pixels where the teacher is certain. Uncertainty is the
entropy of the mean softmax of ``mc_passes`` (T = 8) teacher passes with input noise and dropout on (Monte Carlo
dropout; SSL4MIS runs them two copies of the batch per forward, as here). A pixel counts while its uncertainty
is below (0.75 + 0.25 * r(t)) * ln(C), r the sigmoid ramp-up; the consistency is the mean of the squared softmax
difference over counted pixels and the C classes.

Follows the paper where SSL4MIS's 2D port differs: the threshold's maximum is ln(C), the largest entropy of C
classes (the paper's U_max; SSL4MIS keeps ln 2 from the binary 3D left-atrium task even for ACDC's 4 classes),
and the masked sum is divided by C * count (the original divides by 2 * count, the class mean for its 2 classes;
SSL4MIS keeps the 2 at C = 4). Both the weight and the threshold ramp over ``rampup_fraction`` of the run
(SSL4MIS: both over its whole 30000 iterations). Inference uses the student.
"""

from __future__ import annotations

import math

import torch

from dust.losses import supervised_loss
from dust.methods.consistency import input_noise, ramp
from dust.methods.mean_teacher import MeanTeacher
from dust.methods.registry import register
from dust.uncertainty import predictive_entropy


@register("ua_mt")
class UncertaintyAwareMeanTeacher(MeanTeacher):
    defaults = {**MeanTeacher.defaults, "mc_passes": 8}

    @torch.no_grad()
    def teacher_uncertainty(self, x_u: torch.Tensor) -> torch.Tensor:
        """Entropy (B, *spatial) of the mean softmax over ``mc_passes`` noisy teacher passes (dropout on)."""
        passes = int(self.cfg["mc_passes"])
        noisy = input_noise(x_u.repeat(passes, *[1] * (x_u.dim() - 1)))
        logits = torch.cat([self.networks["teacher"](chunk) for chunk in noisy.split(2 * len(x_u))])
        mean_probs = torch.softmax(logits.float(), 1).unflatten(0, (passes, len(x_u))).mean(0)
        return predictive_entropy(mean_probs.clamp_min(1e-12).log())

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        n, num_classes = len(batch["labeled_image"]), int(self.cfg["num_classes"])
        logits, teacher_u = self.student_and_teacher(batch)
        uncertainty = self.teacher_uncertainty(batch["unlabeled_image"])
        threshold = (0.75 + 0.25 * ramp(self.cfg, iteration)) * math.log(num_classes)
        certain = (uncertainty < threshold).unsqueeze(1).float()
        sq = (torch.softmax(logits[n:].float(), 1) - torch.softmax(teacher_u.float(), 1)).pow(2)
        cons = (certain * sq).sum() / (num_classes * certain.sum() + 1e-16)
        self.log({"uncertainty/certain_share": certain.mean()})
        weight = self.cfg["consistency_weight"] * ramp(self.cfg, iteration)
        return {"sup": supervised_loss(logits[:n], batch["label"]), "cons": weight * cons}
