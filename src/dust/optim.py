"""The optimiser and the learning-rate schedule a run trains with, from its config (``optimizer``, ``lr_schedule``).

A method may supply its own optimiser (:meth:`dust.methods.Method.configure_optimizer`, e.g. a lower rate for one
network); the engine multiplies each parameter group's starting rate by :func:`lr_factor` before every step, so a
schedule applies to every group alike. ``sgd`` + ``poly`` is what SSL4MIS, UA-MT and the DUST paper train with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("poly", "constant", "cosine")


def make_optimizer(parameters: Iterable[torch.nn.Parameter], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """``cfg["optimizer"]`` over ``parameters``: SGD with Nesterov-free momentum, or Adam / AdamW (their betas are
    PyTorch's), each with the config's ``lr`` and ``weight_decay``."""
    name, params = cfg["optimizer"], list(parameters)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise ValueError(f"optimizer {name!r}: choose one of {list(OPTIMIZERS)}")


def lr_factor(done: float, cfg: dict[str, Any]) -> float:
    """The learning rate's share of its starting value after ``done`` (0..1) of a schedule: ``poly``
    (1 - done) ** lr_power, ``constant`` 1, ``cosine`` (1 + cos(pi * done)) / 2."""
    schedule = cfg["lr_schedule"]
    if schedule == "poly":
        return (1.0 - done) ** cfg["lr_power"]
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return (1.0 + math.cos(math.pi * done)) / 2.0
    raise ValueError(f"lr_schedule {schedule!r}: choose one of {list(LR_SCHEDULES)}")
