"""Three-stage self-training shared by DUST and ST++ (one schedule, snapshots, offline pseudo-labels).

Both methods pre-train a teacher on labelled items while writing K snapshots, rank the unlabelled pool by how
much the snapshots disagree, re-train on labelled + the reliable part with fixed pseudo-labels (stage 1), then on
labelled + the whole pool (stage 2). This base class holds what they share: the stages as fractions of
``cfg["iterations"]``, the snapshot files, inference over the pool (the engine's one inference path: batches of
slices at patch size in 2D, a sliding window over each volume in 3D), pseudo-labels stored on each item's own grid
in ``self.pseudo_labels``, handed to the sampler (``run.set_pseudo_labels``: it augments or crops them with their
image), and the state a resumed run
needs. The network, the ranking score, which items get (re)labelled and the loss stay in the method.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dust.config import ConfigError
from dust.data.transforms import resize_label
from dust.inference import Heads, Predictor
from dust.methods.base import Method, RunContext, Stage
from dust.models import make_model
from dust.models.batchnorm import recalibrate_batchnorm
from dust.storage import atomic_save, load_checkpoint
from dust.uncertainty import split_by_uncertainty

SCHEDULE_DEFAULTS = {"pretrain_fraction": 0.4, "stage1_fraction": 0.3, "restart_lr_per_stage": True}
SORTING_DEFAULTS = {
    "checkpoint_points": [1 / 3, 2 / 3, 1.0],
    "reliable_fraction": 0.5,
    # Re-estimate each snapshot's BatchNorm statistics (dust.models.batchnorm, dropout off, over
    # batchnorm_recalibration_batches labelled batches, what pre-training draws) before it ranks the pool. A
    # snapshot is saved mid-training with the statistics of training, which dropout shifts, and that changes
    # which images it calls background-only and the ranking it gives (docs/results/analysis.md, "The
    # sample-uncertainty ranking is upside down on ACDC"). Not in the papers; needs batchnorm_recalibration_batches > 0.
    "snapshot_batchnorm_recalibration": False,
}


class StagedSelfTraining(Method):
    """pretrain -> stage1 -> stage2; subclasses set ``model_variant`` and implement the stage starts and the loss."""

    model_variant = "plain"  # which variant of the configured family the one network ("model") is: plain | dual
    sample_sorting = True  # write K pre-training snapshots to rank the pool with

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.uncertainty: torch.Tensor | None = None  # ranking score per unlabelled slice (pool order), low = reliable
        self.order: torch.Tensor | None = None  # pool indices, ascending uncertainty
        self.reliable: torch.Tensor | None = None  # the first reliable_fraction of order
        self.pseudo_labels: list[torch.Tensor] | None = None  # per pool item (empty: none yet), on its own grid

    def build(self) -> None:
        self.networks["model"] = make_model(self.cfg, variant=self.model_variant)
        # checked here so a bad checkpoint_points fails before training, not at the end of pre-training
        self.snapshot_at = self._snapshot_iterations() if self.sample_sorting else []
        if self.cfg.get("snapshot_batchnorm_recalibration") and not self.cfg["batchnorm_recalibration_batches"]:
            raise ConfigError("snapshot_batchnorm_recalibration: true needs batchnorm_recalibration_batches > 0 "
                              "(the number of batches to re-estimate the statistics over)")

    def stages(self) -> list[Stage]:
        total, restart = int(self.cfg["iterations"]), bool(self.cfg["restart_lr_per_stage"])
        pre = round(total * self.cfg["pretrain_fraction"])
        s1 = round(total * self.cfg["stage1_fraction"])
        # the teacher pre-trains on labelled data only; the students see the pseudo-labelled pool too
        return [Stage("pretrain", pre), Stage("stage1", s1, restart, uses_unlabeled=True),
                Stage("stage2", total - pre - s1, restart, uses_unlabeled=True)]

    def _snapshot_iterations(self) -> list[int]:
        """Iteration counts (1-based) at which pre-training snapshots k = 1..K are written."""
        points, pre = list(self.cfg["checkpoint_points"]), self.stages()[0].iterations
        its = [max(1, round(float(p) * pre)) for p in points]
        increasing = all(b > a for a, b in zip(its[:-1], its[1:], strict=True))
        if len(its) < 2 or not increasing or not all(0 < float(p) <= 1 for p in points):
            raise ConfigError(
                f"checkpoint_points {points}: ranking the pool needs K >= 2 increasing fractions in (0, 1] that "
                f"fall on distinct iterations of the {pre}-iteration pre-training (they give {its})"
            )
        return its

    def _snapshot_path(self, k: int) -> Path:
        return self.run.checkpoint_dir / f"pretrain_k{k}.pt"

    def on_train_start(self, run: RunContext) -> None:
        if len(run.data.unlabeled) == 0:
            raise ValueError(f"method {self.cfg['method']!r} needs unlabelled slices but the pool is empty")

    def after_step(self, iteration: int) -> None:
        # Snapshots are files (network state only): stage 1 reads them back, also when the run was resumed.
        if iteration + 1 in self.snapshot_at:
            k = self.snapshot_at.index(iteration + 1) + 1
            if self.run.is_main:  # ranks hold the same weights, and rank 0 alone runs the stage starts
                atomic_save(self.networks["model"].state_dict(), self._snapshot_path(k))

    # ------------------------------------------------------------------ helpers for the stage starts
    def load_snapshots(self) -> list[nn.Module]:
        """The K pre-training snapshots, oldest first, as copies of the network (same device and layout), their
        BatchNorm statistics re-estimated if ``snapshot_batchnorm_recalibration`` (the files stay as saved)."""
        snapshots = []
        for k in range(1, len(self.snapshot_at) + 1):
            net = copy.deepcopy(self.networks["model"])  # draws no random numbers
            net.load_state_dict(load_checkpoint(self._snapshot_path(k)))
            snapshots.append(net)
        if self.cfg.get("snapshot_batchnorm_recalibration"):
            batches = self.run.recalibration_batches()  # its own sampler: training's draws are untouched
            for net in snapshots:
                recalibrate_batchnorm({"model": net}, net, batches, self.run.autocast())
        return snapshots

    def pool_outputs(
        self, nets: list[nn.Module], heads: Heads, indices: list[int], run: RunContext
    ) -> Iterator[tuple[list[int], torch.Tensor, list[torch.Tensor]]]:
        """(pool indices, what the model saw, per head float32 logits on the model's grid) over the unlabelled
        items ``indices``, through the engine's inference path (:meth:`Predictor.items`), under autocast, with
        ``nets`` (what ``heads`` runs) in eval mode (the engine puts them back in train mode before the next step)."""
        for net in nets:
            net.eval()
        predictor = Predictor.from_config(self.cfg, run.device)
        yield from predictor.items(heads, run.data.unlabeled.images, indices)

    def rank_pool(self, nets: list[nn.Module], heads: Heads,
                  score: Callable[[list[torch.Tensor]], torch.Tensor], run: RunContext) -> None:
        """``score(head logits)`` (one value per item, low = reliable) over the whole pool -> ``self.uncertainty``,
        the ascending ``self.order`` and its first ``reliable_fraction``, ``self.reliable``."""
        pool = list(range(len(run.data.unlabeled)))
        self.uncertainty = torch.cat([score(outs).cpu() for _, _, outs in self.pool_outputs(nets, heads, pool, run)])
        self.order, self.reliable, _ = split_by_uncertainty(self.uncertainty, self.cfg["reliable_fraction"])

    def pseudo_label(
        self, net: nn.Module, heads: Heads, logits: Callable[[list[torch.Tensor]], torch.Tensor],
        indices: torch.Tensor, run: RunContext,
    ) -> None:
        """The argmax of ``logits(head logits)`` as the pseudo-label of each item in ``indices``, on its own grid;
        the other items keep theirs (empty before the first labelling)."""
        pool = run.data.unlabeled
        labels = list(self.pseudo_labels or [torch.empty(0, dtype=torch.uint8)] * len(pool))
        for idx, _, outs in self.pool_outputs([net], heads, indices.tolist(), run):
            patch_labels = logits(outs).argmax(1).cpu()
            for j, i in enumerate(idx):
                labels[i] = self.label_on_item_grid(patch_labels[j], pool.images[i])
        self.pseudo_labels = labels
        run.set_pseudo_labels(labels)

    @staticmethod
    def label_on_item_grid(label: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """A label predicted on the model's grid (the patch for ``resize``), resized (nearest) to its item's grid
        (*spatial of ``image`` (C, *spatial)), as uint8."""
        return resize_label(label[None], tuple(image.shape[1:]))[0].to(torch.uint8)

    # ------------------------------------------------------------------ resume
    def extra_state(self) -> dict[str, Any]:
        # The sampler's own state already holds the restricted unlabelled indices.
        return {
            "pseudo_labels": self.pseudo_labels,
            "uncertainty": self.uncertainty, "order": self.order, "reliable": self.reliable,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.pseudo_labels = state["pseudo_labels"]
        self.run.set_pseudo_labels(self.pseudo_labels)
        self.uncertainty, self.order, self.reliable = state["uncertainty"], state["order"], state["reliable"]
