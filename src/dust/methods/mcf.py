"""Mutual correction framework, MCF (Wang et al., CVPR 2023).

Two *different* subnets see the same batch and are trained side by side: ``model`` is the configured network (the
VNet on LA) and ``model2`` a VNet decoder on a residual encoder (``resnet_vnet``, :mod:`dust.models.resnet`). Each
subnet s has

    L_s = (Dice + CE)_s / 2 on the labelled crops
        + cdr_weight * CDR_s                                   (contrastive difference review, cdr_weight 0.5)
        + [s is the weaker subnet] * w(t) * MSE(p_s(x_u), sharpen(p_other(x_u)))   (DCPLG)

- CDR: on the labelled voxels where the two subnets' predicted labels differ (for two classes the XOR of their
  foreground masks), the mean squared error between each subnet's softmax and the one-hot label.
- DCPLG (dynamic competitive pseudo-label generation): the subnet with the lower supervised loss on this batch is
  the teacher; its sharpened softmax (temperature 0.1, no gradient) on the unlabelled crops supervises
  the other.
- w(t) = consistency_weight (0.1) * sigmoid ramp-up over ``rampup_fraction`` of the run (the code: 40 x 150 =
  its whole 6000 iterations, so 1.0). Inference averages the two subnets' softmax, as the reference test does.

Where dust departs from the reference code (WYC-321/MCF, ``train_MCF.py``): the supervised loss is dust's shared
(Dice + CE) / 2 (the code adds CE and the foreground Dice unhalved) and picks the teacher by it (the code by the
Dice alone); CDR is the paper's masked squared error of the probabilities (the code passes probabilities through a
second softmax over a spatial axis); the learning rate follows the engine's poly schedule (the code divides it by 10
every 2500 iterations); one optimiser holds both subnets, which gives each the gradients of its own loss, as the
code's two optimisers do (no term of one subnet's loss depends on the other's parameters).

The loss terms are :func:`dust.methods.consistency.mutual_correction`, the framework MultiCURE builds on as well.
"""

from __future__ import annotations

import torch

from dust.methods.base import Method
from dust.methods.consistency import MUTUAL_CORRECTION_DEFAULTS, mutual_correction
from dust.methods.registry import register
from dust.models import make_model


@register("mcf")
class MutualCorrection(Method):
    defaults = {**MUTUAL_CORRECTION_DEFAULTS, "temperature": 0.1, "second_model": "resnet_vnet"}
    uses_unlabeled = True

    def build(self) -> None:
        self.networks["model"] = make_model(self.cfg)
        self.networks["model2"] = make_model(self.cfg, model=self.cfg["second_model"])

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        x = torch.cat([batch["labeled_image"], batch["unlabeled_image"]])
        logits = (self.networks["model"](x).float(), self.networks["model2"](x).float())
        losses, student = mutual_correction(logits, batch["label"], self.cfg, iteration,
                                            float(self.cfg["temperature"]))
        self.log({"mcf/teacher_is_model2": float(student == 0)})
        return losses

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the two subnets' mean softmax (argmax and softmax of it are those of the average)."""
        probs = (torch.softmax(self.networks["model"](x).float(), 1)
                 + torch.softmax(self.networks["model2"](x).float(), 1)) / 2
        return probs.clamp_min(1e-12).log()
