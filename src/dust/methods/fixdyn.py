"""Fixed + dynamic pseudo-label co-training (Kumari & Singh, arXiv 2405.07256; CoTwin in its CVPRW 2025 version).

Two subnets SN1 (``model``) and SN2 (``model2``) of the same shape, initialised as dust's CPS (``init``: PyTorch's
default for both, or ``kaiming_xavier`` as dust before 2026-12), both trained on the labelled crops with
alpha * CE + (1 - alpha) * Dice. Per unlabelled crop:

- the **fixed crop** x_f is the sampler's random crop (placed as any crop is; the sampler pads the volume by the
  shift margin, so shifted crops at its edge read zeros); each subnet's prediction on it is its **fixed pseudo-label**;
- four **shifted crops** lie around x_f, moved by d_1..d_4 voxels (+/- along each of the two in-plane axes; each d
  redrawn every iteration in [1, max_shift]); the subnet's predictions on them, mapped back onto x_f's voxels and
  averaged where all four overlap x_f, are its **temporary pseudo-label**;
- **COM**: the **dynamic pseudo-label** takes the temporary one where the shifted crops overlap x_f and the fixed
  one elsewhere (the border band the shifts leave uncovered).

SN1 learns from SN2 on x_f: L_fix(SN1(x_f), SN2's fixed label) + L_dyn(SN1(x_f), SN2's dynamic label). SN2 learns
from SN1 on a **CutMix** image: CUT swaps a box between the two unlabelled crops of the batch, and SN1's labels are
mixed with the same box. Loss = L_sup(SN1) + L_sup(SN2) + w(t) * (fixed_weight * L_fix + dynamic_weight * L_dyn),
w(t) the sigmoid ramp-up over ``rampup_fraction`` of the run. With ``use_fixed: false`` / ``use_dynamic: false`` /
``cutmix: false`` the paper's ablation rows run from the same file (without CutMix SN2 sees x_f too).

The shifted crops are cut out of one augmented crop that the sampler makes larger by ``max_shift`` on each side of
the shifted axes (``unlabeled_crop_margin``), so image and shifts share one rotation / flip. The pseudo-labels come
from one forward per subnet without gradients on the fixed and shifted crops together, with dropout off and
BatchNorm's running statistics left alone (``pseudo_label_forwards``). The shifts and the CutMix box are drawn from
torch's global generator, which the checkpoint saves, so a resumed run draws the same ones.

What the paper's abstract and figure captions leave unstated (its code is not public) is a config key here:
- ``max_shift_fraction`` 0.125: shifts up to 1/8 of the in-plane patch (8 voxels of a 64-voxel LA crop, 10 mm at the
  CPU protocol's 1.25 mm), so the overlap keeps at least (1 - 2/8)^2 = 56% of the crop; the slice axis is not
  shifted (in 2D both axes are in-plane);
- ``cutmix_fraction`` 2/3 of each axis: the box BCP (Bai et al., CVPR 2023) uses for LA;
- ``fixed_weight`` = ``dynamic_weight`` = 0.1 with the ramp over the whole run: dust's CPS weighting, so that
  "fixed only, no CutMix" is close to CPS's cross term on unlabelled crops (dust's CPS takes its labels from the
  training forward, dropout on) and the rows differ only in what is switched on;
- ``hard_pseudo_labels`` true (argmax + CE, as CPS); false uses the softmax as a soft CE target;
- ``confidence_threshold`` 0 (none): voxels whose pseudo-label confidence is below it are left out of L_fix / L_dyn;
- ``alpha`` 0.5: CE and Dice weighted equally (the paper's Figure 5 varies it);
- inference uses SN1, the subnet trained on unmixed images like those it is tested on (SN2 is checkpointed too);
  on LA SN1 alone scores above SN2 (docs/results/la.md, "Fixed + dynamic pseudo-labels").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dust.config import ConfigError
from dust.data.transforms import cut_mix, cutmix_box, shifted_window, to_centre_frame
from dust.losses import dice_loss
from dust.methods.base import Method
from dust.methods.consistency import pseudo_label_forwards, ramp
from dust.methods.registry import register
from dust.models import make_network_pair


def draw_shifts(max_shift: tuple[int, ...], generator: torch.Generator | None = None) -> list[tuple[int, ...]]:
    """The offsets of the four shifted crops: +d_1 and -d_2 along the first shifted axis, +d_3 and -d_4 along the
    second (the axes with ``max_shift > 0``, the last two), each d uniform in [1, max_shift]."""
    axes = [a for a, m in enumerate(max_shift) if m > 0]
    if len(axes) != 2:
        raise ValueError(f"four shifted crops need two shifted axes, got max_shift {max_shift}")
    offsets = []
    for axis in axes:
        for sign in (1, -1):
            offset = [0] * len(max_shift)
            offset[axis] = sign * int(torch.randint(1, max_shift[axis] + 1, (), generator=generator))
            offsets.append(tuple(offset))
    return offsets


def temporary_pseudo_label(shifted_probs: list[torch.Tensor],
                           offsets: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The shifted crops' probabilities mapped onto the fixed crop and averaged: ``(probs, overlap)``, overlap the
    mask of fixed-crop voxels that every shifted crop covers (where ``probs`` is defined)."""
    mapped = [to_centre_frame(p, o) for p, o in zip(shifted_probs, offsets, strict=True)]
    overlap = torch.stack([covered for _, covered in mapped]).all(0)
    return torch.stack([values for values, _ in mapped]).mean(0), overlap


def combine(fixed: torch.Tensor, temporary: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """COM: the dynamic pseudo-label, ``temporary`` on the overlap and ``fixed`` on the rest."""
    return torch.where(overlap, temporary, fixed)


@register("fixdyn")
class FixedDynamicCoTraining(Method):
    defaults = {"rampup_fraction": 1.0, "fixed_weight": 0.1, "dynamic_weight": 0.1, "use_fixed": True,
                "use_dynamic": True, "cutmix": True, "cutmix_fraction": 2 / 3, "max_shift_fraction": 0.125,
                "hard_pseudo_labels": True, "confidence_threshold": 0.0, "alpha": 0.5, "init": "default"}
    uses_unlabeled = True

    def build(self) -> None:
        if not (self.cfg["use_fixed"] or self.cfg["use_dynamic"]):
            raise ConfigError("fixdyn: use_fixed and use_dynamic are both false; nothing would learn from the "
                              "unlabelled data (that is method: supervised)")
        if self.cfg["spatial_policy"] != "crop":
            raise ConfigError("fixdyn cuts shifted crops: it needs spatial_policy: crop")
        if self.cfg["cutmix"] and int(self.cfg["unlabeled_batch_size"]) < 2:
            raise ConfigError("fixdyn: cutmix swaps a box between two unlabelled crops; it needs "
                              "unlabeled_batch_size >= 2 (or cutmix: false)")
        self.networks["model"], self.networks["model2"] = make_network_pair(self.cfg)

    def max_shift(self) -> tuple[int, ...]:
        """Per spatial axis: 0 on the slice axis of a 3D patch, ``max_shift_fraction`` of the in-plane sizes."""
        patch = [int(p) for p in self.cfg["patch_size"]]
        shift = [max(1, round(float(self.cfg["max_shift_fraction"]) * p)) for p in patch[-2:]]
        return (0,) * (len(patch) - 2) + tuple(shift)

    def unlabeled_crop_margin(self) -> tuple[int, ...]:
        return self.max_shift() if self.cfg["use_dynamic"] else (0,) * len(self.cfg["patch_size"])

    def supervised(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        alpha = float(self.cfg["alpha"])
        return alpha * F.cross_entropy(logits.float(), target.long()) + (1 - alpha) * dice_loss(logits, target)

    def pseudo_label_loss(self, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """CE against the pseudo-label (hard: argmax; soft: the probabilities), over the confident voxels."""
        confidence, hard = probs.max(1)
        target = hard if self.cfg["hard_pseudo_labels"] else probs
        per_voxel = F.cross_entropy(logits.float(), target, reduction="none")
        keep = (confidence >= float(self.cfg["confidence_threshold"])).float()
        return (per_voxel * keep).sum() / keep.sum().clamp_min(1.0)

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        sn1, sn2 = self.networks["model"], self.networks["model2"]
        # never pseudo_label: the sampler holds no labels of unlabelled crops for this method
        x_l, y_l, context = batch["labeled_image"], batch["label"], batch["unlabeled_image"]
        patch, margin = tuple(x_l.shape[2:]), self.unlabeled_crop_margin()
        x_f = shifted_window(context, margin, (0,) * len(patch), patch)
        box = cutmix_box(patch, self.cfg["cutmix_fraction"], device=x_f.device) if self.cfg["cutmix"] else None
        x_sn2 = cut_mix(x_f, box) if box is not None else x_f
        n, m = len(x_l), len(x_f)

        out1 = sn1(torch.cat([x_l, x_f])).float()
        out2 = sn2(torch.cat([x_l, x_sn2])).float()
        # Pseudo-labels of both subnets from one batched forward each, without gradients, on the fixed crop and the
        # four shifted crops; fixed and temporary labels thus come from the same forward (same batch statistics,
        # no dropout), and these forwards leave BatchNorm's running statistics alone.
        with torch.no_grad(), pseudo_label_forwards(sn1, sn2):
            offsets = draw_shifts(margin) if self.cfg["use_dynamic"] else []
            views = torch.cat([x_f, *(shifted_window(context, margin, o, patch) for o in offsets)])
            labels1, labels2 = {}, {}
            for net, labels in ((sn1, labels1), (sn2, labels2)):
                probs = torch.softmax(net(views).float(), 1)
                labels["fix"] = probs[:m]
                if offsets:
                    temporary, overlap = temporary_pseudo_label(list(probs[m:].split(m)), offsets)
                    labels["dyn"] = combine(labels["fix"], temporary, overlap)

        losses = {"sup": self.supervised(out1[:n], y_l) + self.supervised(out2[:n], y_l)}
        for term, (switch, weight) in {"fix": ("use_fixed", "fixed_weight"),
                                       "dyn": ("use_dynamic", "dynamic_weight")}.items():
            if self.cfg[switch]:
                teach1 = labels1[term] if box is None else cut_mix(labels1[term], box)  # SN1 -> SN2, mixed alike
                pair = self.pseudo_label_loss(out1[n:], labels2[term]) + self.pseudo_label_loss(out2[n:], teach1)
                losses[term] = ramp(self.cfg, iteration) * float(self.cfg[weight]) * pair
        return losses

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.networks["model"](x)  # SN1: trained on unmixed images, like the ones it is tested on
