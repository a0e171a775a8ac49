"""Deep co-training for segmentation, DCT-Seg (Peng et al., Pattern Recognition 2020), with two networks.

Two U-Nets (independently initialised) are each supervised on the labelled slices ((Dice + CE) / 2, the loss
every dust method uses; DCT-Seg uses CE) and exchange information through two unsupervised terms:

- co-training: the Jensen-Shannon divergence H(mean(p_a, p_b)) - (H(p_a) + H(p_b)) / 2 of their predictions on
  the unlabelled slices, so both agree on them;
- view difference: each network's adversarial examples must not fool the other, KL(p_a(x) || p_b(x_adv_a)) and
  the same with a and b swapped (averaged). As in the authors' code, each direction draws (p = 0.5) either the
  labelled or the unlabelled batch; x_adv is FGSM, x + eps * sign(grad_x CE(source(x), y)), computed with the
  source network in eval mode, where y is the ground truth or, for unlabelled slices, the source's own argmax
  (Qiao et al.'s DCT, which DCT-Seg builds on). The authors' code uses VAT for unlabelled slices; with its
  xi = 1e-6 the perturbation is below float32 resolution and the direction is noise, so it is not copied.
  Images are not clipped to [0, 1] afterwards (dust does not assume an intensity range).

Both terms ramp up with the sigmoid ramp over ``rampup_fraction`` of the run. Defaults are the authors' ACDC
configuration (config/ACDC_config_cotrain.yaml in jizongFox/Deep-Co-Training-for-Semi-Supervised-Image-
Segmentation): cot_weight 1, adversarial_weight 0.005, adversarial_eps 0.05, ramp over 100 of 120 epochs
(rampup_fraction 0.83). The three terms are summed into one step (the authors step after each term). Inference
averages the two networks' probabilities: DCT-Seg is presented as an ensemble of the co-trained models.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dust.losses import supervised_loss
from dust.methods.base import Method
from dust.methods.consistency import ramp
from dust.methods.registry import register
from dust.models import make_model
from dust.uncertainty import predictive_entropy


def jensen_shannon(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of H((p_a + p_b) / 2) - (H(p_a) + H(p_b)) / 2."""
    mean = (torch.softmax(logits_a.float(), 1) + torch.softmax(logits_b.float(), 1)) / 2
    mixed = predictive_entropy(mean.clamp_min(1e-12).log())
    return (mixed - (predictive_entropy(logits_a) + predictive_entropy(logits_b)) / 2).mean()


def fgsm(net: nn.Module, x: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """x + eps * sign(grad_x CE(net(x), target)), with ``net`` in eval mode (as the authors); no parameter grads."""
    was_training = net.training
    net.eval()
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(x).float(), target), x)
    net.train(was_training)
    return (x + eps * grad.sign()).detach()


@register("dct")
class DeepCoTraining(Method):
    defaults = {"cot_weight": 1.0, "adversarial_weight": 0.005, "adversarial_eps": 0.05, "rampup_fraction": 0.83}
    uses_unlabeled = True

    def build(self) -> None:
        self.networks["model"] = make_model(self.cfg)
        self.networks["model2"] = make_model(self.cfg)

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        n, nets = len(batch["labeled_image"]), (self.networks["model"], self.networks["model2"])
        logits = [net(torch.cat([batch["labeled_image"], batch["unlabeled_image"]])).float() for net in nets]
        sup = sum(supervised_loss(z[:n], batch["label"]) for z in logits)
        cot = jensen_shannon(logits[0][n:], logits[1][n:])
        view = sum(self.view_difference(nets[s], nets[1 - s], logits[s], batch) for s in (0, 1)) / 2
        r = ramp(self.cfg, iteration)
        return {"sup": sup, "cot": self.cfg["cot_weight"] * r * cot, "adv": self.cfg["adversarial_weight"] * r * view}

    def view_difference(
        self, source: nn.Module, other: nn.Module, source_logits: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """KL(source(x) || other(x_adv)) per pixel, mean; x_adv: FGSM against ``source``, labelled or not (p = 0.5)."""
        n = len(batch["labeled_image"])
        if torch.rand(()) < 0.5:
            x, target, reference = batch["labeled_image"], batch["label"].long(), source_logits[:n]
        else:
            x, reference = batch["unlabeled_image"], source_logits[n:]
            target = reference.detach().argmax(1)
        x_adv = fgsm(source, x, target, float(self.cfg["adversarial_eps"]))
        log_ref, log_adv = F.log_softmax(reference, 1), F.log_softmax(other(x_adv).float(), 1)
        return (log_ref.exp() * (log_ref - log_adv)).sum(1).mean()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        probs = sum(torch.softmax(net(x).float(), 1) for net in self.networks.values()) / 2
        return probs.clamp_min(1e-12).log()  # log of the ensemble's probabilities: its softmax is the average
