"""Cross pseudo supervision, CPS (Chen et al., CVPR 2021).

Two networks of the same shape, initialised differently (as SSL4MIS: every convolution weight kaiming-normal in
``model``, xavier-normal in ``model2``; BatchNorm weight 1, bias 0; the rest PyTorch's defaults), both optimised.
Each is supervised on the labelled slices with (Dice + CE) / 2 and by the other's hard pseudo-label (argmax,
no gradient) with CE, weighted by consistency_weight * sigmoid ramp-up over ``rampup_fraction`` of the run.

Follows the paper where SSL4MIS's 2D port differs: the cross term is applied to the labelled and the unlabelled
slices (L_cps = L_cps^l + L_cps^u, each a pixel mean; SSL4MIS: unlabelled only). The weight and its ramp are
SSL4MIS's ACDC values (0.1 over its whole run, rampup_fraction 1.0; the paper's lambda = 1.5 without ramp was
tuned for natural images). Inference uses ``model`` (the kaiming one), the branch SSL4MIS and the CPS code
evaluate; ``model2`` is checkpointed and restored with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dust.losses import supervised_loss
from dust.methods import register
from dust.methods.base import Method
from dust.methods.consistency import RAMPED_CONSISTENCY_DEFAULTS, ramp
from dust.models import make_model


def init_conv_weights(net: nn.Module, init: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """``init`` on every convolution weight (2D or 3D; not the transposed convolutions), BatchNorm to weight 1,
    bias 0."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):
            init(m.weight)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


@register("cps")
class CrossPseudoSupervision(Method):
    defaults = dict(RAMPED_CONSISTENCY_DEFAULTS)
    uses_unlabeled = True

    def build(self) -> None:
        self.networks["model"] = init_conv_weights(make_model(self.cfg), nn.init.kaiming_normal_)
        self.networks["model2"] = init_conv_weights(make_model(self.cfg), nn.init.xavier_normal_)

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        n, x = len(batch["x_l"]), torch.cat([batch["x_l"], batch["x_u"]])
        out1, out2 = self.networks["model"](x).float(), self.networks["model2"](x).float()
        pseudo1, pseudo2 = out1.detach().argmax(1), out2.detach().argmax(1)
        sup = supervised_loss(out1[:n], batch["y_l"]) + supervised_loss(out2[:n], batch["y_l"])
        cps = sum(  # labelled part and unlabelled part, each averaged over its own pixels
            F.cross_entropy(out1[part], pseudo2[part]) + F.cross_entropy(out2[part], pseudo1[part])
            for part in (slice(0, n), slice(n, None))
        )
        return {"sup": sup, "cps": self.cfg["consistency_weight"] * ramp(self.cfg, iteration) * cps}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.networks["model"](x)  # model2 only teaches model during training
