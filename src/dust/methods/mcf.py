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
  the teacher; its sharpened softmax (temperature 0.1, no gradient) on the unlabelled crops supervises the other.
- w(t) = consistency_weight (0.1) * sigmoid ramp-up over ``rampup_fraction`` of the run (the code: 40 x 150 =
  its whole 6000 iterations, so 1.0). Inference averages the two subnets' softmax, as the reference test does.

Where dust departs from the reference code (WYC-321/MCF, ``train_MCF.py``): the supervised loss is dust's shared
(Dice + CE) / 2 (the code adds CE and the foreground Dice unhalved) and picks the teacher by it (the code by the
Dice alone); CDR is the paper's masked squared error of the probabilities (the code passes probabilities through a
second softmax over a spatial axis); the learning rate follows the engine's poly schedule (the code divides it by 10
every 2500 iterations); one optimiser holds both subnets, which gives each the gradients of its own loss, as the
code's two optimisers do (no term of one subnet's loss depends on the other's parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dust.losses import supervised_loss
from dust.methods import register
from dust.methods.base import Method
from dust.methods.consistency import ramp, sharpen
from dust.models import make_model


def difference_review(logits_a: torch.Tensor, logits_b: torch.Tensor,
                      target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MCF's CDR on labelled crops: ``(loss_a, loss_b, disagreement mask)``; each loss is the squared error between
    that subnet's softmax and the one-hot target, averaged over the classes and over the voxels where the two
    subnets' argmax labels differ (0 where they agree everywhere)."""
    disagree = (logits_a.argmax(1) != logits_b.argmax(1)).float()
    onehot = F.one_hot(target.long(), logits_a.shape[1]).movedim(-1, 1).float()

    def masked(logits: torch.Tensor) -> torch.Tensor:
        error = (torch.softmax(logits.float(), 1) - onehot).pow(2).mean(1)
        return (disagree * error).sum() / (disagree.sum() + 1e-16)

    return masked(logits_a), masked(logits_b), disagree


def weaker_subnet(sup_losses: tuple[torch.Tensor, torch.Tensor]) -> int:
    """DCPLG's choice: the index (0 or 1) of the subnet with the *higher* supervised loss, the one to be taught."""
    return int(sup_losses[1] >= sup_losses[0])


@register("mcf")
class MutualCorrection(Method):
    defaults = {"consistency_weight": 0.1, "rampup_fraction": 1.0, "cdr_weight": 0.5, "temperature": 0.1,
                "second_model": "resnet_vnet"}
    uses_unlabeled = True

    def build(self) -> None:
        self.networks["model"] = make_model(self.cfg)
        self.networks["model2"] = make_model(self.cfg, model=self.cfg["second_model"])

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        n, x = len(batch["x_l"]), torch.cat([batch["x_l"], batch["x_u"]])
        outs = (self.networks["model"](x).float(), self.networks["model2"](x).float())
        sups = tuple(supervised_loss(out[:n], batch["y_l"]) for out in outs)
        cdr = difference_review(outs[0][:n], outs[1][:n], batch["y_l"])[:2]
        student = weaker_subnet(sups)
        pseudo = sharpen(torch.softmax(outs[1 - student][n:].detach(), 1), self.cfg["temperature"])
        correction = (torch.softmax(outs[student][n:], 1) - pseudo).pow(2).mean()
        if self.run is not None and (iteration + 1) % self.cfg["log_every"] == 0:
            self.run.log_scalars({"mcf/teacher_is_model2": float(student == 0)}, step=iteration + 1)
        weight = self.cfg["consistency_weight"] * ramp(self.cfg, iteration)
        return {"sup": sups[0] + sups[1], "cdr": self.cfg["cdr_weight"] * (cdr[0] + cdr[1]),
                "cons": weight * correction}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the two subnets' mean softmax (argmax and softmax of it are those of the average)."""
        probs = (torch.softmax(self.networks["model"](x).float(), 1)
                 + torch.softmax(self.networks["model2"](x).float(), 1)) / 2
        return probs.clamp_min(1e-12).log()
