"""What a method is: the networks it owns, its training step, and optional hooks the engine calls.

The engine (``dust.engine.Trainer``) owns everything else: data streams, the optimiser's steps and the LR schedule
(the optimiser itself is the config's unless a method supplies one), autocast, checkpoints, logging, validation. A
method never writes a training loop, and never sees the trainer: what it may use of its run is the
:class:`RunContext` the engine hands it (so ``dust.methods`` does not depend on ``dust.engine``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dust.data import TrainingData
from dust.optim import make_optimizer


@dataclass(frozen=True)
class Stage:
    """One phase of training. Multi-stage methods (DUST, ST++) return several.

    ``iterations``: length of the stage; ``restart_schedule``: fresh optimiser state and poly LR from the
    base LR at the stage start (what self-training papers do when they re-train a student); ``uses_unlabeled``:
    whether the stage's batches hold unlabelled items (``unlabeled_image``, and ``pseudo_label`` once the method has
    handed the sampler pseudo-labels); a stage without them draws labelled items only (config ``supervised_batch``
    says how many).
    """

    name: str
    iterations: int
    restart_schedule: bool = False
    uses_unlabeled: bool = False


@dataclass(frozen=True)
class RunContext:
    """What a method may use of the run it trains in (``method.run``, and the argument of the run hooks).

    ``data``: the run's item sets (``data.unlabeled.images`` / ``.ids``, on the CPU).
    ``run_dir`` / ``checkpoint_dir``: where a method writes its own files, on the main process only
    (``is_main``; under torchrun the other ranks hold the same weights). ``to_device(x)`` puts a batch on the
    device in the configured layout; ``autocast()`` is the run's mixed-precision context.
    ``use_unlabeled(indices)`` restricts the sampler's unlabelled stream to those pool items (e.g. DUST's
    reliable half); ``set_pseudo_labels(labels)`` hands the sampler one pseudo-label per pool item (drawn as
    ``pseudo_label``). ``recalibration_batches()``: fresh training batches for BatchNorm recalibration, drawn from a
    sampler of their own, so training draws stay as they were.
    """

    data: TrainingData
    run_dir: Path
    checkpoint_dir: Path
    device: torch.device
    is_main: bool
    to_device: Callable[[torch.Tensor], torch.Tensor]
    autocast: Callable[[], AbstractContextManager]
    use_unlabeled: Callable[[Sequence[int] | torch.Tensor], None]
    set_pseudo_labels: Callable[[list[torch.Tensor] | None], None]
    recalibration_batches: Callable[[], list[torch.Tensor]]


class Method:
    """Base class. Subclasses set ``name`` (via ``@register``), ``defaults`` and implement ``build`` +
    ``train_step``; the other hooks are optional."""

    name: str = "method"
    defaults: dict[str, Any] = {}  # config keys this method reads, with defaults
    uses_unlabeled: bool = False  # does train_step want batch["unlabeled_image"]? (the default single stage's setting)

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.networks: dict[str, nn.Module] = {}  # everything here is moved, checkpointed and restored
        self.run: RunContext | None = None  # set by the engine when training
        self.logged: dict[str, float] = {}  # this step's diagnostics (:meth:`log`), collected by the engine

    # --- required -----------------------------------------------------------------------------
    def build(self) -> None:
        """Create ``self.networks``."""
        raise NotImplementedError

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        """Return named loss terms; the engine sums them, back-propagates and steps."""
        raise NotImplementedError

    def log(self, values: dict[str, float | torch.Tensor]) -> None:
        """Diagnostics of this step (not loss terms), e.g. ``{"mcf/teacher_is_model2": 1.0}``: the engine averages
        them over ``log_every`` iterations and writes them to TensorBoard with the loss terms."""
        self.logged.update({name: float(value) for name, value in values.items()})

    # --- optional -----------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (default: every network's)."""
        return [p for net in self.networks.values() for p in net.parameters()]

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser over :meth:`parameters` (default: the config's ``optimizer``, :mod:`dust.optim`). The engine
        calls it at the start and at each stage that restarts the schedule, and scales every group's starting
        rate by the config's ``lr_schedule``."""
        return make_optimizer(self.parameters(), self.cfg)

    def unlabeled_crop_margin(self) -> tuple[int, ...] | None:
        """Voxels added on both sides of each axis of the unlabelled crops (default: none), for a method that cuts
        shifted windows around the centre patch out of one augmented crop."""
        return None

    def stages(self) -> list[Stage]:
        """The training phases, in order (default: one stage of ``iterations``, unlabelled data per
        ``uses_unlabeled``)."""
        return [Stage("train", int(self.cfg["iterations"]), uses_unlabeled=self.uses_unlabeled)]

    def on_train_start(self, run: RunContext) -> None:
        """Called once before the first step (also on resume)."""

    def on_stage_start(self, stage: Stage, run: RunContext) -> None:
        """Called when a stage begins (not again when a run resumes inside it)."""

    def after_step(self, iteration: int) -> None:
        """Called after each optimiser step (EMA updates and the like)."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K, *spatial) used for validation and inference; the engine sets eval mode."""
        return self.networks["model"].forward_main(x)

    def inference_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The prediction's logits, then the logits whose disagreement is the pixel uncertainty: both decoders of
        a network with paired decoders (their KL, DUST Eq. 2), or none (callers then use the prediction's
        entropy). ``dust predict --uncertainty``, the report and the pool inference of self-training read this."""
        net = self.networks["model"]
        if getattr(net, "paired_decoders", False):
            return (self.predict(x), *net(x))
        return (self.predict(x),)

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond network weights that a resumed run needs (pseudo-labels, orderings)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass
