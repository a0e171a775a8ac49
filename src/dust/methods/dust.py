"""DUST: self-training with dual uncertainty (Qiu et al., arXiv 2304.04441), and its Table 3 ablations.

Algorithm 1 as three engine stages sharing ``cfg["iterations"]``:

- ``pretrain``: the teacher T trains on labelled slices only, both decoders supervised with (Dice + CE) / 2
  (Eq. 5); K snapshots are written at ``checkpoint_points`` of this stage.
- ``stage1``: the sample-level uncertainty (Eq. 1) of every unlabelled slice is computed from the K
  snapshots and the pool is sorted; T pseudo-labels the most stable ``reliable_fraction``; the student S
  (T's network, continuing) trains on labelled + reliable slices with L_sup + L_unsup (Eq. 6).
- ``stage2``: S refreshes the pseudo-labels of the whole pool and re-trains on labelled + all unlabelled.

Pseudo-labels are fixed within a stage (offline, as in Algorithm 1) and the sampler augments them together
with their image. L_unsup is the UNRC loss (Eq. 4) on the decoders' KL divergence (Eq. 2). The schedule, the
snapshots, pool inference and resume state are shared with ST++ (``dust.methods.staged``).

The ablations share this code and the dual-decoder network (so rows differ only in the module switched off,
not in capacity): ``self_training`` (no sorting: both stages use the whole pool; plain CE on pseudo-labels),
``st_ss`` (sorting, plain CE) and ``dust`` (sorting + UNRC).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from dust.config import ConfigError
from dust.inference import Heads
from dust.losses import dice_loss, supervised_loss, uncertainty_rectified_loss
from dust.methods.base import RunContext, Stage
from dust.methods.registry import register
from dust.methods.staged import SCHEDULE_DEFAULTS, SORTING_DEFAULTS, StagedSelfTraining
from dust.uncertainty import decoder_kl, predictive_entropy, sample_uncertainty
from dust.uncertainty.report import save_uncertainty_figure, write_sample_uncertainty_csv
from dust.uncertainty.sample import SAMPLE_UNCERTAINTY_REGIONS

log = logging.getLogger("dust")

_UNRC = {
    # Eq. 4 as written lets the gradient flow through the weight exp(-D_kl): d/dD_kl = 1 - exp(-D_kl) * CE, so
    # wherever CE > exp(D_kl) the decoders are pushed apart to discount pixels that contradict their pseudo-label
    # (only the +D_kl term bounds this). True makes the weight a per-step constant, so D_kl is only ever pushed
    # down. False (default) follows the paper.
    "detach_uncertainty_weight": False,
}
_OUTPUT = {
    # Which decoder's prediction is the model's output: for validation and inference, for the snapshots of Eq. 1 and
    # for the pseudo-labels. "main" (default) is the paper's transposed-conv decoder. "mean" averages the softmax of
    # both decoders: on ACDC at this budget a bilinear U-Net scored ~5 val Dice above a transposed-conv one
    # (docs/results/analysis.md, "Supervised baseline vs the SSL4MIS anchor"), and the average lets the better
    # decoder count. A departure from the paper.
    "output_decoder": "main",
}
OUTPUT_DECODERS = ("main", "mean")
_PSEUDO_LABEL_OPTIONS = {
    # Add a soft Dice term between the main decoder and the pseudo-labels to L_unsup (not in the paper, whose
    # L_unsup is per-pixel CE). With CE alone, background pixels dominate the pseudo-label loss; a teacher that
    # under-segments (it predicts pure background on a share of cardiac slices at this budget) then teaches the
    # student to segment less, and stage 2's re-labelling compounds it. Dice weighs each class by its own size,
    # as the supervised loss (Eq. 5) already does for labelled slices.
    "pseudo_label_dice": False,
    # Leave out of a stage the unlabelled slices whose pseudo-label is background only (not in the paper). On
    # ACDC a short-trained teacher predicts nothing on far more slices than hold no structure; trained on, those
    # slices teach the student to miss whole hearts (docs/results/analysis.md, "DUST at 7 patients").
    "skip_empty_pseudo_labels": False,
}
_SAMPLE_SORTING = {
    **SORTING_DEFAULTS,
    # Where Eq. 1 averages the snapshots' disagreement. "image" (default) is the paper: all pixels. "foreground":
    # the pixels some snapshot labels foreground; a slice no snapshot labels foreground ranks last. Over the whole
    # image the agreeing background dilutes the score, so slices with small structures rank easiest; on ACDC at 7
    # patients that inverts the ranking, while the foreground mean puts it right (docs/results/analysis.md, "The
    # sample-uncertainty ranking is upside down on ACDC"). A departure.
    "sample_uncertainty_region": "image",
}
_FIGURE_EXAMPLES = 4


@register("dust")
class DUST(StagedSelfTraining):
    """Full DUST (Table 3 "ST+SS+UNRC"); the two switches below are what the ablation subclasses turn off."""

    model_variant = "dual"  # two decoders of the configured family: dual U-Net in 2D, dual VNet in 3D
    sample_sorting = True  # SS module: sort the pool by Eq. 1, reliable part first
    unrc = True  # UNRC module: Eq. 4 instead of plain CE on pseudo-labels
    defaults = {**SCHEDULE_DEFAULTS, **_SAMPLE_SORTING, **_UNRC, **_OUTPUT, **_PSEUDO_LABEL_OPTIONS}

    def build(self) -> None:
        if self.cfg["output_decoder"] not in OUTPUT_DECODERS:
            raise ConfigError(f"output_decoder {self.cfg['output_decoder']!r}: choose one of {OUTPUT_DECODERS}")
        region = self.cfg.get("sample_uncertainty_region", "image")  # absent where there is no sorting
        if region not in SAMPLE_UNCERTAINTY_REGIONS:
            raise ConfigError(f"sample_uncertainty_region {region!r}: choose one of {SAMPLE_UNCERTAINTY_REGIONS}")
        super().build()

    # ------------------------------------------------------------------ training
    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        net, y_l = self.networks["model"], batch["label"]
        if "unlabeled_image" not in batch:  # the labelled-only pre-training stage
            main, aux = net(batch["labeled_image"])
            return {"sup": supervised_loss(main, y_l) + supervised_loss(aux, y_l)}
        if "pseudo_label" not in batch:
            raise RuntimeError("self-training stage without pseudo-labels on the unlabelled pool")
        n = len(y_l)
        # one forward for both streams (as SSL4MIS does): BN statistics see both, and it is cheaper on a CPU
        main, aux = net(torch.cat([batch["labeled_image"], batch["unlabeled_image"]]))
        sup = supervised_loss(main[:n], y_l) + supervised_loss(aux[:n], y_l)
        main_u, aux_u, y_u = main[n:], aux[n:], batch["pseudo_label"]
        if self.unrc:
            unsup, dkl = uncertainty_rectified_loss(main_u, aux_u, y_u, self.cfg["detach_uncertainty_weight"])
        else:
            unsup, dkl = F.cross_entropy(main_u.float(), y_u.long()), None
        if self.cfg["pseudo_label_dice"]:
            unsup = unsup + dice_loss(main_u, y_u)
        if dkl is None:  # the ablations log the same diagnostic, it is just not in their loss
            dkl = decoder_kl(main_u.detach(), aux_u.detach())
        dkl = dkl.detach()
        self.log({"uncertainty/dkl_mean": dkl.mean(),
                  "uncertainty/low_weight_share": (torch.exp(-dkl) < 0.5).float().mean()})
        return {"sup": sup, "unsup": unsup}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        net = self.networks["model"]
        if self.cfg["output_decoder"] == "main":
            return net.forward_main(x)
        return self._output(*net(x))

    def inference_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        main, aux = self.networks["model"](x)  # one forward for the prediction and the decoders' KL
        return self._output(main, aux), main, aux

    def _output(self, main: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        """The output logits per ``output_decoder``; "mean" returns log of the averaged probabilities."""
        if self.cfg["output_decoder"] == "main":
            return main
        return torch.log((torch.softmax(main.float(), 1) + torch.softmax(aux.float(), 1)) / 2)

    # ------------------------------------------------------------------ stage boundaries
    def on_stage_start(self, stage: Stage, run: RunContext) -> None:
        if stage.name == "pretrain":
            return
        everything = torch.arange(len(run.data.unlabeled))
        if stage.name == "stage1" and self.sample_sorting:
            self._sort_pool(run)
            indices = self.reliable
        else:  # stage 2, or no sorting: the whole pool (easy to hard when sorted, for the figure)
            indices = self.order if self.order is not None else everything
        self._pseudo_label(indices, stage.name, run)
        if self.cfg["skip_empty_pseudo_labels"]:
            labels = self.pseudo_labels
            kept = indices[torch.tensor([bool(labels[i].any()) for i in indices.tolist()], dtype=torch.bool)]
            log.info("%s: %d of %d pseudo-labels are background only and are left out (skip_empty_pseudo_labels)",
                     stage.name, len(indices) - len(kept), len(indices))
            if len(kept) == 0:
                raise ValueError(f"{stage.name}: every pseudo-label is background only; nothing left to train on")
            indices = kept
        run.use_unlabeled(indices)

    def _heads(self, nets: list[nn.Module], aux: bool = True) -> Heads:
        """Each net's (main, aux) logits, or its main logits alone, all nets in one pass over the pool."""
        return lambda x: tuple(z for net in nets for z in (net(x) if aux else (net.forward_main(x),)))

    def _sort_pool(self, run: RunContext) -> None:
        """Eq. 1 from the K pre-training snapshots, then the ascending sort and the reliable split."""
        snapshots, pool = self.load_snapshots(), run.data.unlabeled
        aux = self.cfg["output_decoder"] != "main"

        def eq1(outs: list[torch.Tensor]) -> torch.Tensor:  # outs: per snapshot, its (main, aux) or main alone
            if aux:
                outputs = [self._output(outs[k], outs[k + 1]) for k in range(0, len(outs), 2)]
            else:
                outputs = [self._output(z, None) for z in outs]
            probabilities = [torch.softmax(z, 1) for z in outputs]
            return sample_uncertainty(probabilities, region=self.cfg["sample_uncertainty_region"])

        self.rank_pool(snapshots, self._heads(snapshots, aux), eq1, run)
        csv_path = run.run_dir / "sample_uncertainty.csv"
        write_sample_uncertainty_csv(csv_path, pool.ids, pool.patients, self.uncertainty, self.order, self.reliable)
        u = self.uncertainty[self.order]
        log.info(
            "sample uncertainty (Eq. 1, K=%d): %d unlabelled items, range %.3g..%.3g; reliable %d (<= %.3g), "
            "unreliable %d; ranked list: %s", len(snapshots), len(pool), u[0], u[-1], len(self.reliable),
            u[len(self.reliable) - 1], len(pool) - len(self.reliable), csv_path,
        )

    def _pseudo_label(self, indices: torch.Tensor, stage: str, run: RunContext) -> None:
        """Argmax of the output (``output_decoder``) on the model's grid, resized (nearest) to each item's grid."""
        net = self.networks["model"]
        self.pseudo_label(net, self._heads([net]), lambda outs: self._output(*outs), indices, run)
        log.info("%s: pseudo-labels for %d of %d unlabelled items", stage, len(indices), len(run.data.unlabeled))
        self._draw_pseudo_label_examples(indices, stage, run)

    def _draw_pseudo_label_examples(self, indices: torch.Tensor, stage: str, run: RunContext) -> None:
        """A figure of a few pseudo-labelled items, evenly spaced over ``indices``, with the decoders' KL and the
        entropy beside each (for a volume: its slice with the most pseudo-labelled foreground)."""
        pool, net = run.data.unlabeled, self.networks["model"]
        picks = indices[torch.linspace(0, len(indices) - 1, min(_FIGURE_EXAMPLES, len(indices))).long()].tolist()
        panels: dict[str, list] = {"titles": [], "images": [], "labels": [], "kl_maps": [], "entropy_maps": []}
        for idx, x, (main, aux) in self.pool_outputs([net], self._heads([net]), picks, run):
            labels = self._output(main, aux).argmax(1).cpu()
            for j, i in enumerate(idx):
                u = "" if self.uncertainty is None else f"\nsample uncertainty {float(self.uncertainty[i]):.3g}"
                kl = decoder_kl(main[j : j + 1], aux[j : j + 1])[0].cpu()
                entropy = predictive_entropy(main[j : j + 1])[0].cpu()
                image, label = x[j].float().cpu(), labels[j]
                if label.dim() == 3:  # a volume: show one slice of it
                    s = int((label > 0).flatten(1).sum(1).argmax())
                    image, label, kl, entropy, u = image[:, s], label[s], kl[s], entropy[s], f"{u}\nslice {s}"
                panels["titles"].append(f"{pool.ids[i]}{u}")
                panels["images"].append(image)
                panels["labels"].append(label)
                panels["kl_maps"].append(kl)
                panels["entropy_maps"].append(entropy)
        save_uncertainty_figure(
            run.run_dir / "figures" / f"{stage}_pseudo_labels.png", **panels, num_classes=self.cfg["num_classes"]
        )


@register("st_ss")
class SelfTrainingSampleSorting(DUST):
    """Table 3 "ST+SS": sample sorting, plain CE on pseudo-labels (dual decoder kept for a fair comparison)."""

    unrc = False
    defaults = {**SCHEDULE_DEFAULTS, **_SAMPLE_SORTING, **_OUTPUT, **_PSEUDO_LABEL_OPTIONS}


@register("self_training")
class SelfTraining(DUST):
    """Table 3 "Self-training": no sorting (both stages pseudo-label and use the whole pool), plain CE."""

    sample_sorting = False
    unrc = False
    defaults = {**SCHEDULE_DEFAULTS, **_OUTPUT, **_PSEUDO_LABEL_OPTIONS}
