"""ST++ (Yang et al., CVPR 2022): self-training with selective re-training on checkpoint-stable images.

ST++'s six steps in the three-stage schedule DUST uses (``dust.methods.staged``: same budget split, snapshots
and offline pseudo-labels, so the two self-training methods differ only in what ST++ does differently):

- ``pretrain``: a plain U-Net trains on labelled slices ((Dice + CE) / 2) and writes K snapshots at
  ``checkpoint_points`` (ST++: at 1/3, 2/3 and the end of supervised training).
- ``stage1``: every unlabelled slice is scored by its stability, the mean over k < K of the mIoU between the
  argmax of snapshot k and of the final one (classes absent from both skipped, as ST++'s meanIOU); the most
  stable ``reliable_fraction`` (top 50%) is pseudo-labelled by the teacher (the network at the end of
  pre-training) and the student re-trains on labelled + reliable slices.
- ``stage2``: the student labels the remaining (unreliable) slices, the reliable ones keep the teacher's labels,
  and a new student re-trains on labelled + all unlabelled slices.

On re-training the unlabelled slices get ST++'s strong augmentation (``dust.data.strong_augment``: brightness /
contrast jitter, blur, cutout whose pixels are ignored) and plain CE on the pseudo-labels. As in the paper, each
re-training starts from a freshly initialised network (``reinitialize_student``; ST++ re-initialises from an
ImageNet backbone, here from scratch as every dust network starts). Differences: the teacher is the network at
the end of pre-training, not the checkpoint best on the validation set (that set is where results are reported);
pseudo-labels use a single forward, not ST++'s multi-scale + flip test-time augmentation; the three trainings share
``iterations`` as DUST's stages do (ST++ gives each its full epoch budget). Inference uses the final student.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from dust.data.strong_augment import IGNORE_INDEX, strong_augment
from dust.losses import supervised_loss
from dust.methods import register
from dust.methods.base import Stage
from dust.methods.staged import SCHEDULE_DEFAULTS, SORTING_DEFAULTS, StagedSelfTraining
from dust.uncertainty import split_by_uncertainty

if TYPE_CHECKING:
    from dust.engine.trainer import Trainer

log = logging.getLogger("dust")


def checkpoint_stability(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, N, *spatial) argmax maps of K checkpoints -> (N,) mean over k < K of mIoU(prediction k, prediction K)."""
    reference, per_checkpoint = predictions[-1], []
    for pred in predictions[:-1]:
        ious = []
        for c in range(num_classes):
            a, b = pred == c, reference == c
            inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
            ious.append(torch.where(union > 0, inter / union.clamp_min(1), torch.nan))
        per_checkpoint.append(torch.nanmean(torch.stack(ious, 1), 1))
    return torch.stack(per_checkpoint).mean(0)


def reinitialize(net: nn.Module) -> None:
    """Fresh weights (and BatchNorm statistics) in place, so the optimiser's parameter references stay valid."""
    for module in net.modules():
        if module is not net and hasattr(module, "reset_parameters"):
            module.reset_parameters()


@register("st_plus_plus")
class STPlusPlus(StagedSelfTraining):
    defaults = {**SCHEDULE_DEFAULTS, **SORTING_DEFAULTS, "reinitialize_student": True}

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        net, n = self.networks["model"], len(batch["x_l"])
        if not self.uses_unlabeled:
            return {"sup": supervised_loss(net(batch["x_l"]), batch["y_l"])}
        x_u, y_u = strong_augment(batch["x_u"], batch["y_u"])
        logits = net(torch.cat([batch["x_l"], self.trainer.to_device(x_u)]))
        unsup = F.cross_entropy(logits[n:].float(), y_u, ignore_index=IGNORE_INDEX)
        return {"sup": supervised_loss(logits[:n], batch["y_l"]), "unsup": unsup}

    def on_stage_start(self, stage: Stage, trainer: Trainer) -> None:
        if stage.name == "pretrain":
            return
        if stage.name == "stage1":
            self._rank_pool(trainer)
            self._pseudo_label(self.reliable, trainer)  # by the teacher
            trainer.sampler.set_unlabeled_indices(self.reliable)
        else:
            self._pseudo_label(self.order[len(self.reliable) :], trainer)  # by the stage-1 student
            trainer.sampler.set_unlabeled_indices(self.order)
        if self.cfg["reinitialize_student"]:
            reinitialize(self.networks["model"])
        self.uses_unlabeled = True

    def _rank_pool(self, trainer: Trainer) -> None:
        snapshots, pool = self.load_snapshots(), trainer.data.unlabeled
        for net in snapshots:
            net.eval()
        stability = []
        heads = lambda x: tuple(net(x) for net in snapshots)  # noqa: E731
        for _, _, outs in self.pool_outputs(heads, list(range(len(pool))), trainer):
            predictions = torch.stack([z.argmax(1) for z in outs])
            stability.append(checkpoint_stability(predictions, int(self.cfg["num_classes"])).cpu())
        self.uncertainty = 1 - torch.cat(stability)  # ascending uncertainty = descending stability
        self.order, self.reliable, _ = split_by_uncertainty(self.uncertainty, self.cfg["reliable_fraction"])
        log.info("checkpoint stability (mean IoU with the final snapshot, K=%d): %d unlabelled slices, reliable %d "
                 "(IoU >= %.3g)", len(snapshots), len(pool), len(self.reliable),
                 1 - self.uncertainty[self.reliable[-1]])

    def _pseudo_label(self, indices: torch.Tensor, trainer: Trainer) -> None:
        """Argmax of the current network for ``indices``; the other slices keep the labels they have."""
        pool, net = trainer.data.unlabeled, self.networks["model"]
        if pool.pseudo_labels is None:
            pool.pseudo_labels = [torch.empty(0, dtype=torch.uint8)] * len(pool)
        net.eval()  # the engine puts it back in train mode before the next step
        for idx, _, [logits] in self.pool_outputs(lambda x: (net(x),), indices.tolist(), trainer):
            labels = logits.argmax(1).cpu()
            for j, i in enumerate(idx):
                pool.pseudo_labels[i] = self.label_on_item_grid(labels[j], pool.images[i])
        log.info("%d unlabelled items pseudo-labelled", len(indices))
