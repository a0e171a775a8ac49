"""Pieces the consistency-based methods share: the sigmoid ramp-up, the EMA teacher, input noise, sharpening, MCF's
mutual correction (dust's ``mcf``, and the framework MultiCURE builds on), and extra pseudo-label forwards that leave
BatchNorm's running statistics alone.

Every schedule length is a fraction of the run's budget (``cfg["iterations"]``), never a fixed iteration
count: SSL4MIS ramps its consistency weight over ``consistency_rampup=200`` "epochs" of 150 iterations, i.e.
over 30000 iterations = its whole ``max_iterations``, so the same shape at any budget is ``rampup_fraction: 1.0``.
A fixed 30000-iteration ramp inside a 4000-iteration run would leave the weight below 2.5% of its maximum.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from dust.losses import difference_review, supervised_loss

# Config keys of the methods that weight an unsupervised term with a ramped-up weight (SSL4MIS's ACDC values).
RAMPED_CONSISTENCY_DEFAULTS = {"consistency_weight": 0.1, "rampup_fraction": 1.0}


def sigmoid_rampup(iteration: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = iteration / length clipped to [0, 1] (Laine & Aila 2017); 1 when length <= 0."""
    if length <= 0:
        return 1.0
    t = min(max(iteration / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def ramp(cfg: dict[str, Any], iteration: int) -> float:
    """The ramp-up factor in [0, 1] at ``iteration``: the ramp lasts ``rampup_fraction`` of ``iterations``."""
    return sigmoid_rampup(iteration, float(cfg["rampup_fraction"]) * int(cfg["iterations"]))


def ema_teacher(student: nn.Module) -> nn.Module:
    """A copy of the student that is never optimised (its parameters need no gradient)."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, iteration: int) -> None:
    """teacher <- a * teacher + (1 - a) * student over the parameters, a = min(1 - 1 / (iteration + 1), decay).

    ``iteration`` is 0-based (the step just taken): a = 0 at the first step copies the student, then the true
    running average is used until it is older than ``decay`` allows (Tarvainen & Valpola 2017, as in SSL4MIS).
    Buffers (BatchNorm statistics) are not averaged: the teacher's own forward passes update them.
    """
    alpha = min(1.0 - 1.0 / (iteration + 1), decay)
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)


def input_noise(x: torch.Tensor, std: float = 0.1, clip: float = 0.2) -> torch.Tensor:
    """x + clamp(N(0, std^2), -clip, clip): the teacher's input perturbation of MT and UA-MT (SSL4MIS)."""
    return x + torch.clamp(torch.randn_like(x) * std, -clip, clip)


def sharpen(probs: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Soft pseudo-label p_k^(1/T) / sum_j p_j^(1/T) over the class axis (dim 1): MC-Net's and MCF's sharpening
    (T = 0.1). For two classes it is MC-Net's p^(1/T) / (p^(1/T) + (1 - p)^(1/T)). Computed in log space, so a
    small T does not underflow."""
    return torch.softmax(torch.log(probs.float().clamp_min(1e-12)) / temperature, dim=1)


# MCF's weights (WYC-321/MCF, train_MCF.py): the correction 0.1 ramped over the whole run, CDR 0.5 (its sharpening
# temperature 0.1 is the method's own key: ``temperature`` in mcf, ``sharpen_temperature`` in multicure)
MUTUAL_CORRECTION_DEFAULTS = {"consistency_weight": 0.1, "rampup_fraction": 1.0, "cdr_weight": 0.5}


def weaker_subnet(sup_losses: tuple[torch.Tensor, torch.Tensor]) -> int:
    """MCF's DCPLG choice: the index (0 or 1) of the subnet with the *higher* supervised loss, the one to be taught
    (ties: the first subnet is taught, as MCF's code gives the ResNet subnet the teacher's role on a tie)."""
    return int(sup_losses[1] >= sup_losses[0])


def mutual_correction(logits: tuple[torch.Tensor, torch.Tensor], y_l: torch.Tensor, cfg: dict[str, Any],
                      iteration: int, temperature: float) -> tuple[dict[str, torch.Tensor], int]:
    """MCF's loss terms for two subnets' float logits on the batch [labelled; unlabelled] (``len(y_l)`` labelled):
    ``({"sup", "cdr", "cons"}, index of the taught subnet)``; keys of :data:`MUTUAL_CORRECTION_DEFAULTS` in ``cfg``,
    ``temperature`` the sharpening's.

    - sup: each subnet's (Dice + CE) / 2 on the labelled crops;
    - cdr: ``cdr_weight`` * both subnets' difference review against the ground truth (:func:`difference_review`);
    - cons: the weaker subnet's softmax on the unlabelled crops pulled (MSE) to the other's sharpened softmax (no
      gradient), weighted by ``consistency_weight`` * sigmoid ramp-up over ``rampup_fraction`` of the run.
    """
    n = len(y_l)
    sups = (supervised_loss(logits[0][:n], y_l), supervised_loss(logits[1][:n], y_l))
    cdr_a, cdr_b, _ = difference_review(logits[0][:n], logits[1][:n], y_l)
    student = weaker_subnet(sups)
    target = sharpen(torch.softmax(logits[1 - student][n:].detach(), 1), temperature)
    correction = (torch.softmax(logits[student][n:], 1) - target).pow(2).mean()
    weight = float(cfg["consistency_weight"]) * ramp(cfg, iteration)
    return {"sup": sups[0] + sups[1], "cdr": float(cfg["cdr_weight"]) * (cdr_a + cdr_b),
            "cons": weight * correction}, student


@contextmanager
def pseudo_label_forwards(*networks: nn.Module) -> Iterator[None]:
    """For extra forwards that only make pseudo-labels during training: BatchNorm still normalises with the batch's
    own statistics (as the training forward does) but leaves its running statistics alone, and dropout is off, so
    the extra forwards neither skew the statistics validation uses nor add dropout noise to the labels."""
    saved: list[tuple[nn.Module, float | None, bool]] = []
    for net in networks:
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                saved.append((module, module.momentum, module.training))
                module.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
            elif isinstance(module, nn.modules.dropout._DropoutNd):
                saved.append((module, None, module.training))
                module.eval()
    try:
        yield
    finally:
        for module, momentum, training in saved:
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = momentum
            module.train(training)
