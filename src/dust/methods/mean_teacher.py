"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) as SSL4MIS runs it on 2D ACDC.

The student sees labelled + unlabelled slices in one forward; L = (Dice + CE) / 2 on the labelled ones plus
w(t) * mean (softmax(student(x_u)) - softmax(teacher(x_u + noise)))^2, with noise = clamp(N(0, 0.1^2), +-0.2)
and w(t) = consistency_weight * sigmoid ramp-up over ``rampup_fraction`` of the run. The teacher is an EMA of
the student's parameters (``ema_decay``), updated after every optimiser step; like SSL4MIS's, it runs in train
mode (dropout on, BatchNorm on batch statistics). Inference uses the student.

Defaults: consistency_weight 0.1, rampup_fraction 1.0 (SSL4MIS's 200 x 150 = 30000 of 30000 iterations),
ema_decay 0.99. Not copied: SSL4MIS zeroes the consistency term for its first 1000 of 30000 iterations, where the
ramp weight is below 1% anyway.
"""

from __future__ import annotations

import torch

from dust.losses import supervised_loss
from dust.methods.base import Method
from dust.methods.consistency import RAMPED_CONSISTENCY_DEFAULTS, ema_teacher, ema_update, input_noise, ramp
from dust.methods.registry import register
from dust.models import make_model


@register("mean_teacher")
class MeanTeacher(Method):
    defaults = {**RAMPED_CONSISTENCY_DEFAULTS, "ema_decay": 0.99}
    uses_unlabeled = True

    def build(self) -> None:
        self.networks["model"] = make_model(self.cfg)
        self.networks["teacher"] = ema_teacher(self.networks["model"])

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.networks["model"].parameters())  # the teacher is an average, never optimised

    def student_and_teacher(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Student logits on labelled + unlabelled slices, teacher logits on the noisy unlabelled slices."""
        logits = self.networks["model"](torch.cat([batch["labeled_image"], batch["unlabeled_image"]]))
        with torch.no_grad():
            teacher_u = self.networks["teacher"](input_noise(batch["unlabeled_image"]))
        return logits, teacher_u

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        n = len(batch["labeled_image"])
        logits, teacher_u = self.student_and_teacher(batch)
        diff = torch.softmax(logits[n:].float(), 1) - torch.softmax(teacher_u.float(), 1)
        weight = self.cfg["consistency_weight"] * ramp(self.cfg, iteration)
        return {"sup": supervised_loss(logits[:n], batch["label"]), "cons": weight * diff.pow(2).mean()}

    def after_step(self, iteration: int) -> None:
        ema_update(self.networks["teacher"], self.networks["model"], self.cfg["ema_decay"], iteration)
