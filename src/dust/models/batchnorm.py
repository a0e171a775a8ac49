"""BatchNorm recalibration: running statistics re-estimated from training images with dropout off.

In training, BatchNorm normalises by the batch's statistics and keeps a momentum average of them for eval mode.
The U-Net's encoder has dropout before its second convolution of each block (p up to 0.5 at the bottleneck,
as SSL4MIS's), which scales the kept activations by 1/(1-p): the following BatchNorm sees another variance in
training than at test time, when dropout is off (Li et al., "Understanding the disharmony between dropout and
batch normalization", CVPR 2019). Some networks barely notice; others lose most of their Dice to it
(docs/results/analysis.md, "BatchNorm statistics"). Recalibration replaces the running statistics with a plain
average over batches of training images seen as at test time (eval mode, dropout off), the way PreciseBN
re-estimates them after training. It reads images only, never labels.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn as nn


def batchnorm_layers(networks: dict[str, nn.Module]) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for net in networks.values() for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(networks: dict[str, nn.Module], forward: Callable[[torch.Tensor], object],
                          batches: list[torch.Tensor], autocast: AbstractContextManager,
                          dropout: bool = False) -> None:
    """Re-estimate the running mean / variance of every BatchNorm layer in ``networks`` from ``batches``.

    Runs ``forward`` on each batch (for a method: ``method.predict``, the forward of validation and inference)
    with the networks in eval mode except BatchNorm; ``dropout=True`` keeps dropout active too (then the estimate
    reproduces the training-time statistics, for diagnosis). BatchNorm layers the forward does not reach keep
    their statistics. Leaves the networks in eval mode.
    """
    layers = batchnorm_layers(networks)
    momenta = [m.momentum for m in layers]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    for net in networks.values():
        net.eval()
        if dropout:
            for m in net.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.train()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative average over all the batches
        m.train()
    with autocast:
        for x in batches:
            forward(x)
    for m, momentum, (mean, var, count) in zip(layers, momenta, saved, strict=True):
        m.momentum = momentum
        if int(m.num_batches_tracked) == 0:  # a network predict does not use (e.g. CPS's second): left as it was
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
    for net in networks.values():
        net.eval()
