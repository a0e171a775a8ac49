"""Layer types picked by the number of spatial dimensions (2: Conv2d, BatchNorm2d, bilinear; 3: Conv3d, ...).

The dimension of every network comes from the config's patch size (``len(patch_size)``, as nnU-Net plans do), so
one class serves 2D slices and 3D volumes and there is no 2D/3D flag to keep in sync.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SPATIAL_DIMS = (2, 3)
# ``upsample`` values: a transposed convolution, or linear interpolation (bi- in 2D, tri- in 3D; either name works)
UPSAMPLE_MODES = ("deconv", "bilinear", "trilinear")


def _check(dims: int) -> int:
    if dims not in SPATIAL_DIMS:
        raise ValueError(f"networks are 2D or 3D (a patch size of 2 or 3 numbers); got {dims} spatial dimensions")
    return dims


def conv(dims: int) -> type[nn.Module]:
    return (nn.Conv2d, nn.Conv3d)[_check(dims) - 2]


def conv_transpose(dims: int) -> type[nn.Module]:
    return (nn.ConvTranspose2d, nn.ConvTranspose3d)[_check(dims) - 2]


def batchnorm(dims: int) -> type[nn.Module]:
    return (nn.BatchNorm2d, nn.BatchNorm3d)[_check(dims) - 2]


def channel_dropout(dims: int) -> type[nn.Module]:
    """Dropout of whole feature maps (Dropout2d / Dropout3d)."""
    return (nn.Dropout2d, nn.Dropout3d)[_check(dims) - 2]


def max_pool(dims: int):
    return (F.max_pool2d, F.max_pool3d)[_check(dims) - 2]


def linear_mode(dims: int) -> str:
    """The interpolation mode ``F.interpolate`` calls linear in ``dims`` dimensions."""
    return ("bilinear", "trilinear")[_check(dims) - 2]


def check_upsample(mode: str) -> str:
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsample mode {mode!r}; choose one of {UPSAMPLE_MODES}")
    return mode


def memory_format(tensor_dims: int):
    """The channels-last memory format of a (B, C, *spatial) tensor or a network's weights of that rank."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor_dims, torch.contiguous_format)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) or (B, C, S, H, W) in the channels-last layout; other tensors unchanged."""
    fmt = memory_format(x.dim())
    return x.contiguous(memory_format=fmt) if fmt is not torch.contiguous_format and x.is_floating_point() else x
