"""Segmentation networks and the factory keyed by the config's ``model`` value.

Names are dimension-free: ``unet``, ``dual_unet``, ``unet_ds``, ``vnet``, ``dual_vnet``, ``vnet_ds``, ``resnet_vnet``
(MCF's second subnet); the network is
2D or 3D as the config's ``patch_size`` has 2 or 3 numbers. The names of the 2D-only days (``unet2d``,
``dual_unet2d``, ``unet2d_ds``) are aliases, so every stored config, checkpoint and results record still loads.
A method that needs a variant of the configured family (DUST: two decoders; URPC: deep supervision) asks for it
with ``make_model(cfg, variant="dual")`` (or ``"ds"``, or ``"sdf"``: DTC's extra level-set head), so the same
method file builds a U-Net in 2D and a VNet in 3D.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from dust.config import ConfigError
from dust.models.base import SegmentationNetwork
from dust.models.deep_supervision import DeepSupervisionUNet, DeepSupervisionUNet2D, DeepSupervisionVNet
from dust.models.level_set import LevelSetNetwork
from dust.models.resnet import ResNetVNet
from dust.models.unet import DualDecoderUNet, DualDecoderUNet2D, UNet, UNet2D
from dust.models.vnet import DualDecoderVNet, VNet

__all__ = ["SegmentationNetwork", "UNet", "DualDecoderUNet", "DeepSupervisionUNet", "VNet", "DualDecoderVNet",
           "DeepSupervisionVNet", "ResNetVNet", "LevelSetNetwork",
           "UNet2D", "DualDecoderUNet2D", "DeepSupervisionUNet2D", "make_model",
           "model_family", "MODELS", "PAIR_INITS", "make_network_pair", "init_conv_weights"]

# name -> (family, variant)
MODELS = {
    "unet": ("unet", "plain"), "dual_unet": ("unet", "dual"), "unet_ds": ("unet", "ds"),
    "vnet": ("vnet", "plain"), "dual_vnet": ("vnet", "dual"), "vnet_ds": ("vnet", "ds"),
    "resnet_vnet": ("resnet_vnet", "plain"),
}
VARIANTS = ("plain", "dual", "ds", "sdf")
ALIASES_2D = {"unet2d": "unet", "dual_unet2d": "dual_unet", "unet2d_ds": "unet_ds"}
_CLASSES = {
    ("unet", "plain"): UNet, ("unet", "dual"): DualDecoderUNet, ("unet", "ds"): DeepSupervisionUNet,
    ("vnet", "plain"): VNet, ("vnet", "dual"): DualDecoderVNet, ("vnet", "ds"): DeepSupervisionVNet,
    ("resnet_vnet", "plain"): ResNetVNet,
}


def model_family(name: str, spatial_dims: int | None = None) -> tuple[str, str]:
    """(family, variant) of a model name or alias; a 2D alias with a 3D patch is refused."""
    if name in ALIASES_2D:
        if spatial_dims not in (None, 2):
            raise ConfigError(f"model {name!r} is the 2D name of {ALIASES_2D[name]!r}, but patch_size has "
                              f"{spatial_dims} numbers; write model: {ALIASES_2D[name]}")
        name = ALIASES_2D[name]
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def make_model(cfg: dict[str, Any], model: str | None = None, upsample: str | None = None,
               variant: str | None = None) -> SegmentationNetwork:
    """Build the network named by ``model`` (default: ``cfg["model"]``) with the config's sizes, in
    ``len(cfg["patch_size"])`` dimensions; ``variant`` (plain | dual | ds | sdf) swaps in that variant of its family."""
    dims = len(cfg["patch_size"])
    family, named_variant = model_family(model or cfg["model"], dims)
    variant = variant or named_variant
    if variant == "sdf":
        return LevelSetNetwork(make_model(cfg, model, upsample, "plain"), cfg["num_classes"])
    if (family, variant) not in _CLASSES:
        raise ConfigError(f"model {model or cfg['model']!r} has no {variant!r} variant (variants: {VARIANTS}; "
                          f"{sorted(v for f, v in _CLASSES if f == family)} exist for it)")
    cls = _CLASSES[(family, variant)]
    kwargs = dict(in_channels=cfg["in_channels"], num_classes=cfg["num_classes"], channels=cfg["channels"],
                  dropout=cfg["dropout"], spatial_dims=dims)
    if variant != "dual":
        kwargs["upsample"] = upsample or cfg["upsample"]
    return cls(**kwargs)


# How the two networks of a co-training pair (CPS, fixdyn) start: ``default`` PyTorch's initialisation for both (they
# differ by their random draws), as SSL4MIS's 2D CPS script runs since its fix 9a74d15, which removed the calls;
# ``kaiming_xavier`` every convolution weight kaiming-normal in the first network and xavier-normal in the second
# (SSL4MIS's 3D CPS script; dust before 2026-12). With BatchNorm after every convolution the effective learning
# rate scales as lr / ||w||^2, and on dust's networks these inits give several times PyTorch's squared weight norm.
PAIR_INITS = {"default": (None, None), "kaiming_xavier": (nn.init.kaiming_normal_, nn.init.xavier_normal_)}


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


def make_network_pair(cfg: dict[str, Any]) -> tuple[SegmentationNetwork, SegmentationNetwork]:
    """Two networks of the configured shape, initialised per ``cfg["init"]`` (:data:`PAIR_INITS`)."""
    if cfg["init"] not in PAIR_INITS:
        raise ConfigError(f"init {cfg['init']!r}: choose one of {list(PAIR_INITS)}")
    nets = []
    for init in PAIR_INITS[cfg["init"]]:
        net = make_model(cfg)
        nets.append(net if init is None else init_conv_weights(net, init))
    return nets[0], nets[1]
