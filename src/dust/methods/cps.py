"""Cross pseudo supervision, CPS (Chen et al., CVPR 2021), as SSL4MIS trains it on ACDC and LA-like volumes.

Two networks of the same shape, both optimised. Each is supervised on the labelled crops with (Dice + CE) / 2 and,
on the unlabelled crops, by the other's hard pseudo-label (argmax of the same training forward, dropout on, no
gradient) with CE, weighted by consistency_weight * sigmoid ramp-up over ``rampup_fraction`` of the run: SSL4MIS's
``train_cross_pseudo_supervision_2D.py`` / ``_3D.py`` (0.1, ramped over its whole run: rampup_fraction 1.0; the
paper's lambda = 1.5 without ramp was tuned for natural images). Inference uses ``model``, the branch SSL4MIS
evaluates; ``model2`` is checkpointed and restored with it.

Options that reach what dust did before 2026-12 (records made so name them):
- ``init``: ``default`` (PyTorch's, both networks; SSL4MIS's 2D script since its fix 9a74d15 removed the init
  calls) or ``kaiming_xavier`` (:data:`dust.models.PAIR_INITS`; SSL4MIS's 3D script);
- ``cross_labeled``: false (SSL4MIS: the cross term on the unlabelled crops only) or true (the paper's
  L_cps = L_cps^l + L_cps^u, each a pixel mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dust.losses import supervised_loss
from dust.methods.base import Method
from dust.methods.consistency import RAMPED_CONSISTENCY_DEFAULTS, ramp
from dust.methods.registry import register
from dust.models import make_network_pair


@register("cps")
class CrossPseudoSupervision(Method):
    defaults = {**RAMPED_CONSISTENCY_DEFAULTS, "init": "default", "cross_labeled": False}
    uses_unlabeled = True

    def build(self) -> None:
        self.networks["model"], self.networks["model2"] = make_network_pair(self.cfg)

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        n, x = len(batch["labeled_image"]), torch.cat([batch["labeled_image"], batch["unlabeled_image"]])
        out1, out2 = self.networks["model"](x).float(), self.networks["model2"](x).float()
        pseudo1, pseudo2 = out1.detach().argmax(1), out2.detach().argmax(1)
        sup = supervised_loss(out1[:n], batch["label"]) + supervised_loss(out2[:n], batch["label"])
        parts = (slice(0, n), slice(n, None)) if self.cfg["cross_labeled"] else (slice(n, None),)
        cps = sum(  # each part averaged over its own pixels
            F.cross_entropy(out1[part], pseudo2[part]) + F.cross_entropy(out2[part], pseudo1[part]) for part in parts
        )
        return {"sup": sup, "cps": self.cfg["consistency_weight"] * ramp(self.cfg, iteration) * cps}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.networks["model"](x)  # model2 only teaches model during training
