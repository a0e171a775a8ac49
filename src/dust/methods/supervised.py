"""Supervised baseline: the labelled items only, loss (Dice + CE) / 2; a dual-decoder network has both supervised."""

from __future__ import annotations

import torch

from dust.losses import supervised_loss
from dust.methods.base import Method
from dust.methods.registry import register
from dust.models import make_model


@register("supervised")
class Supervised(Method):
    def build(self) -> None:
        self.networks["model"] = make_model(self.cfg)

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        logits = self.networks["model"](batch["labeled_image"])
        if isinstance(logits, tuple):  # a dual-decoder model: supervise both decoders
            return {"sup": sum(supervised_loss(out, batch["label"]) for out in logits)}
        return {"sup": supervised_loss(logits, batch["label"])}
