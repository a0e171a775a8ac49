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

import torch
import torch.nn as nn
import torch.nn.functional as F

from dust.data.strong_augment import IGNORE_INDEX, strong_augment
from dust.losses import supervised_loss
from dust.methods.base import RunContext, Stage
from dust.methods.registry import register
from dust.methods.staged import SCHEDULE_DEFAULTS, SORTING_DEFAULTS, StagedSelfTraining

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
        net, n = self.networks["model"], len(batch["labeled_image"])
        if "unlabeled_image" not in batch:  # the labelled-only pre-training stage
            return {"sup": supervised_loss(net(batch["labeled_image"]), batch["label"])}
        x_u, y_u = strong_augment(batch["unlabeled_image"], batch["pseudo_label"])
        logits = net(torch.cat([batch["labeled_image"], self.run.to_device(x_u)]))
        unsup = F.cross_entropy(logits[n:].float(), y_u, ignore_index=IGNORE_INDEX)
        return {"sup": supervised_loss(logits[:n], batch["label"]), "unsup": unsup}

    def on_stage_start(self, stage: Stage, run: RunContext) -> None:
        if stage.name == "pretrain":
            return
        if stage.name == "stage1":
            self._rank_pool(run)
            self._pseudo_label(self.reliable, run)  # by the teacher
            run.use_unlabeled(self.reliable)
        else:
            self._pseudo_label(self.order[len(self.reliable) :], run)  # by the stage-1 student
            run.use_unlabeled(self.order)
        if self.cfg["reinitialize_student"]:
            reinitialize(self.networks["model"])

    def _rank_pool(self, run: RunContext) -> None:
        snapshots, pool = self.load_snapshots(), run.data.unlabeled

        def instability(outs: list[torch.Tensor]) -> torch.Tensor:  # ascending instability = descending stability
            predictions = torch.stack([z.argmax(1) for z in outs])
            return 1 - checkpoint_stability(predictions, int(self.cfg["num_classes"]))

        self.rank_pool(snapshots, lambda x: tuple(net(x) for net in snapshots), instability, run)
        log.info("checkpoint stability (mean IoU with the final snapshot, K=%d): %d unlabelled slices, reliable %d "
                 "(IoU >= %.3g)", len(snapshots), len(pool), len(self.reliable),
                 1 - self.uncertainty[self.reliable[-1]])

    def _pseudo_label(self, indices: torch.Tensor, run: RunContext) -> None:
        """Argmax of the current network for ``indices``; the other slices keep the labels they have."""
        net = self.networks["model"]
        self.pseudo_label(net, lambda x: (net(x),), lambda outs: outs[0], indices, run)
        log.info("%d unlabelled items pseudo-labelled", len(indices))
