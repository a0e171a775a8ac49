"""The optimiser and schedule: from the config, or supplied by a method; the schedule scales every group."""

from __future__ import annotations

import pytest
import torch

from dust.engine.trainer import Trainer
from dust.methods.supervised import Supervised


class TwoRates(Supervised):
    """A method with its own optimiser: the decoder at a tenth of the encoder's rate."""

    def configure_optimizer(self) -> torch.optim.Optimizer:
        net = self.networks["model"]
        first = [p for n, p in net.named_parameters() if n.startswith("encoder")]
        rest = [p for n, p in net.named_parameters() if not n.startswith("encoder")]
        return torch.optim.Adam([{"params": first, "lr": self.cfg["lr"]},
                                 {"params": rest, "lr": self.cfg["lr"] / 10}])


def test_the_config_names_the_optimizer_and_the_schedule(tiny_cfg):
    trainer = Trainer(tiny_cfg(optimizer="adamw", lr_schedule="cosine", lr=0.004, iterations=10, val_every=10))
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    trainer.iteration = 5  # halfway: cosine gives half the starting rate
    assert trainer._set_lr(trainer.spans[0]) == pytest.approx(0.002)


def test_a_methods_own_optimizer_keeps_its_groups_rates_under_the_schedule(tiny_cfg, monkeypatch):
    trainer = Trainer(tiny_cfg(lr=0.01, iterations=10, val_every=10))
    monkeypatch.setattr(trainer.method, "configure_optimizer", TwoRates.configure_optimizer.__get__(trainer.method))
    trainer.optimizer = trainer._new_optimizer()
    assert len(trainer.optimizer.param_groups) == 2 and isinstance(trainer.optimizer, torch.optim.Adam)
    trainer.iteration = 5
    trainer._set_lr(trainer.spans[0])
    factor = 0.5 ** 0.9  # poly, lr_power 0.9, halfway
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.01 * factor, 0.001 * factor])


def test_an_unknown_optimizer_is_refused_naming_the_key(tiny_cfg):
    with pytest.raises(ValueError, match="optimizer"):
        tiny_cfg(optimizer="lbfgs")
