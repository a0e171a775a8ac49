"""Segmentation networks and a small factory keyed by the config's ``model`` value."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from dust.models.deep_supervision import DeepSupervisionUNet2D
from dust.models.unet2d import DualDecoderUNet2D, UNet2D

__all__ = ["UNet2D", "DualDecoderUNet2D", "DeepSupervisionUNet2D", "make_model"]


def make_model(cfg: dict[str, Any], model: str | None = None, upsample: str | None = None) -> nn.Module:
    """Build the network named by ``model`` (default: ``cfg["model"]``) with the config's sizes."""
    name = model or cfg["model"]
    common = dict(
        in_channels=cfg["in_channels"], num_classes=cfg["num_classes"],
        channels=cfg["channels"], dropout=cfg["dropout"],
    )
    if name == "unet2d":
        return UNet2D(**common, upsample=upsample or cfg["upsample"])
    if name == "dual_unet2d":
        return DualDecoderUNet2D(**common)
    if name == "unet2d_ds":
        return DeepSupervisionUNet2D(**common, upsample=upsample or cfg["upsample"])
    raise ValueError(f"unknown model {name!r}; choose unet2d, dual_unet2d or unet2d_ds")
