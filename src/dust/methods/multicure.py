"""MultiCURE: uncertainty-aware contrastive learning on MCF's two networks (Karimijafarbigloo et al., Sections 2-3).

- ``model``, the **predictive** network (the configured VNet), and ``model2``, the **auxiliary** network (MCF's VNet
  decoder on a ResNet encoder, :mod:`dust.models.resnet`) with the MultiCURE module in its decoder
  (:mod:`dust.models.deformable`).
- **Binary uncertainty map**: the predictive network's softmax confidence below ``confidence_threshold`` -> 1
  (uncertain). It is added to the output of MultiCURE's deformable branch (the uncertainty attention map).
- **Framework** (``framework``), what trains the two networks besides the contrastive term:
  - ``mcf`` (default): MCF's, which the paper builds on and compares with (MCF 88.71 -> MultiCURE 89.21 on LA), as
    dust's ``mcf`` trains it (:func:`dust.methods.consistency.mutual_correction`): (Dice + CE) / 2 per network, the
    difference review against the ground truth on the labelled crops, and the network with the higher supervised
    loss taught by the other's sharpened softmax on the unlabelled crops (0.1 x sigmoid ramp-up). The authors'
    precursor code (xmindflow/SSL-contrastive, ``src/train_LA.py``, "based on MCF") keeps this machinery too (its
    unlabelled and contrastive terms are computed from detached tensors and train nothing; dust's do train).
  - ``as_printed``: Eq. 1-2 read literally (dust before 2026-12): both networks supervised with CE + Dice; the
    predictive network's hard pseudo-label supervises the auxiliary network with CE + Dice on the confident voxels
    (confidence > 0.7), weight ``unlabeled_weight`` 1 without ramp, plus ``reg_weight`` (0.5) * L_reg, the L1
    distance between the two networks' softmax on the confident voxels where their labels disagree.
- **Deep contrastive loss** (Eq. 4-5): per decoder level in ``contrastive_levels``, class prototypes are the mean
  auxiliary features of the confident voxels of each class (ground truth on labelled crops, the pseudo-label on
  unlabelled ones: the teacher's argmax under ``mcf``, the predictive network's under ``as_printed``); uncertain
  voxels are pulled to their class prototype (cosine / ``temperature``), and the prototypes are pushed apart
  (:func:`dust.losses.prototype_contrastive_loss`, whose docstring says where it departs from Eq. 5).
- lambda_c(t) (``contrastive_schedule``): ``rampup`` (default) 0.1 e^{-5 (1 - t/t_max)^2}, the 0.1 x sigmoid
  ramp-up of the precursor code; ``paper`` the formula as printed in Eq. 3, 0.1 e^{4 (1 - t/t_max)^2}, which
  *decreases* from 5.46 to 0.1 (dust before 2026-12: today's ``as_printed`` records add ``contrastive_schedule:
  paper``).

Unstated in the paper, chosen here:
- MultiCURE sits after the decoder's second level (``refine_level`` 1: a quarter of the resolution, 64 channels of
  the LA VNet), where one voxel sees a wide context and the deformable offsets can reach across the atrium wall. The
  cost decides it on a CPU: the 27-tap trilinear sampling of the deformable branch (``grid_sample`` and its backward)
  is about 4x dearer one level up (``refine_level`` 2, half resolution), which a GPU affords
  (docs/results/speed/la_step_speed.json has the branch's share of a step). ``contrastive_levels`` are the refined
  level and the full-resolution one (deep and shallow, each on its own grid with nearest-neighbour masks; their
  losses are averaged).
- ``temperature`` 0.5 (the contrastive one; MCF's sharpening is ``sharpen_temperature``); ``reduction`` r = 4.
- Inference averages the two networks' softmax, as MCF's does.
Ablation rows from this file: the base is ``multicure_module: false`` + ``contrastive: false`` (under ``mcf``, the
two networks of dust's ``mcf``); ``multicure_module: false`` (the auxiliary network without the module) and
``contrastive: false`` switch one off.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dust.config import ConfigError
from dust.data.transforms import resize_label
from dust.losses import class_prototypes, dice_loss, masked_supervised_loss, prototype_contrastive_loss
from dust.methods.base import Method
from dust.methods.consistency import MUTUAL_CORRECTION_DEFAULTS, mutual_correction
from dust.methods.registry import register
from dust.models import make_model
from dust.models.deformable import UncertaintyRefinedNetwork

CONTRASTIVE_SCHEDULES = ("paper", "rampup")
FRAMEWORKS = ("mcf", "as_printed")


def contrastive_weight(schedule: str, iteration: int, iterations: int, base: float = 0.1) -> float:
    """lambda_c(t): ``paper`` 0.1 e^{4 (1 - t)^2} (as printed, decreasing), ``rampup`` 0.1 e^{-5 (1 - t)^2}."""
    t = min(max(iteration / max(iterations, 1), 0.0), 1.0)
    if schedule == "paper":
        return base * math.exp(4.0 * (1.0 - t) ** 2)
    if schedule == "rampup":
        return base * math.exp(-5.0 * (1.0 - t) ** 2)
    raise ConfigError(f"contrastive_schedule {schedule!r}: choose one of {CONTRASTIVE_SCHEDULES}")


def uncertainty_map(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """The binary uncertainty map (B, 1, *spatial): 1 where the top softmax probability is below ``threshold``."""
    return (probs.max(1, keepdim=True).values < threshold).float()


@register("multicure")
class MultiCURENetworks(Method):
    defaults = {"framework": "mcf", **MUTUAL_CORRECTION_DEFAULTS, "sharpen_temperature": 0.1,  # mcf's keys
                "unlabeled_weight": 1.0, "reg_weight": 0.5,  # the as_printed framework's keys
                "confidence_threshold": 0.7, "multicure_module": True, "contrastive": True,
                "contrastive_schedule": "rampup", "temperature": 0.5, "refine_level": 1, "contrastive_levels": [1, 3],
                "reduction": 4, "second_model": "resnet_vnet"}
    uses_unlabeled = True

    def build(self) -> None:
        contrastive_weight(self.cfg["contrastive_schedule"], 0, 1)  # an unknown schedule fails before training
        if self.cfg["framework"] not in FRAMEWORKS:
            raise ConfigError(f"framework {self.cfg['framework']!r}: choose one of {FRAMEWORKS}")
        self.networks["model"] = make_model(self.cfg)
        auxiliary = make_model(self.cfg, model=self.cfg["second_model"])
        if self.cfg["multicure_module"] or self.cfg["contrastive"]:  # the wrapper also hands out decoder features
            auxiliary = UncertaintyRefinedNetwork(auxiliary, int(self.cfg["refine_level"]), int(self.cfg["reduction"]))
            if not self.cfg["multicure_module"]:
                auxiliary.multicure = None  # the features are read, nothing refines them
        self.networks["model2"] = auxiliary

    def _auxiliary(self, x: torch.Tensor, uncertain: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net = self.networks["model2"]
        if not isinstance(net, UncertaintyRefinedNetwork):
            return net(x), []
        levels = tuple(self.cfg["contrastive_levels"]) if self.cfg["contrastive"] else ()
        return net.refined(x, uncertain, levels)

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        n, y_l = len(batch["labeled_image"]), batch["label"]
        x = torch.cat([batch["labeled_image"], batch["unlabeled_image"]])
        logits_p = self.networks["model"](x).float()
        probs_p = torch.softmax(logits_p, 1)
        threshold = float(self.cfg["confidence_threshold"])
        uncertain = uncertainty_map(probs_p.detach(), threshold)  # (B, 1, *spatial)
        logits_a, features = self._auxiliary(x, uncertain)
        logits_a = logits_a.float()
        if self.cfg["framework"] == "mcf":
            losses, student = mutual_correction((logits_p, logits_a), y_l, self.cfg, iteration,
                                                float(self.cfg["sharpen_temperature"]))
            pseudo = (logits_p, logits_a)[1 - student][n:].detach().argmax(1)  # the teacher's label
        else:
            losses, pseudo = self._as_printed(logits_p, probs_p, logits_a, uncertain, y_l)

        if self.cfg["contrastive"]:
            classes = torch.cat([y_l.long(), pseudo])  # ground truth where there is one, else the pseudo-label
            terms = []
            for feats in features:
                grid = feats.shape[2:]
                cls, unc = resize_label(classes, grid), resize_label(uncertain[:, 0], grid) > 0
                prototypes, present = class_prototypes(feats, cls, ~unc, logits_p.shape[1])
                pull, separation = prototype_contrastive_loss(feats, cls, unc, prototypes, present,
                                                              float(self.cfg["temperature"]))
                terms.append(pull + separation)
            weight = contrastive_weight(self.cfg["contrastive_schedule"], iteration, int(self.cfg["iterations"]))
            losses["contrast"] = weight * torch.stack(terms).mean()
        self.log({"multicure/uncertain_share": uncertain.mean()})
        return losses

    def _as_printed(self, logits_p: torch.Tensor, probs_p: torch.Tensor, logits_a: torch.Tensor,
                    uncertain: torch.Tensor, y_l: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Eq. 1-2 read literally: ``({"sup", "unsup"}, the predictive network's pseudo-label)``."""
        n = len(y_l)
        probs_a = torch.softmax(logits_a, 1)
        sup = sum(F.cross_entropy(out[:n], y_l.long()) + dice_loss(out[:n], y_l) for out in (logits_p, logits_a))
        pseudo = probs_p[n:].detach().argmax(1)
        confident = uncertain[n:, 0] == 0
        # L_reg on the XOR region, and like all of L_u only where the predictive network is confident (Section 2)
        disagree = ((probs_p[n:].argmax(1) != probs_a[n:].argmax(1)) & confident)[:, None].float()
        reg = ((probs_p[n:] - probs_a[n:]).abs() * disagree).sum() / (disagree.sum() * probs_p.shape[1]).clamp_min(1)
        return {"sup": sup, "unsup": float(self.cfg["unlabeled_weight"]) * (
            masked_supervised_loss(logits_a[n:], pseudo, confident) + float(self.cfg["reg_weight"]) * reg)}, pseudo

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        probs_p = torch.softmax(self.networks["model"](x).float(), 1)
        logits_a, _ = self._auxiliary(x, uncertainty_map(probs_p, float(self.cfg["confidence_threshold"])))
        return torch.log((probs_p + torch.softmax(logits_a.float(), 1)) / 2)  # the mean of the two networks
