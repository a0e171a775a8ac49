"""Layer types picked by the number of spatial dimensions (2: Conv2d, BatchNorm2d, bilinear; 3: Conv3d, ...).

The dimension of every network comes from the config's patch size (``len(patch_size)``, as nnU-Net plans do), so
one class serves 2D slices and 3D volumes and there is no 2D/3D flag to keep in sync.
"""

from __future__ import annotations

import functools

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
    return (nn.Conv2d, Conv3d)[_check(dims) - 2]


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that trains in fp32 wherever this CPU's bf16 kernel computes a wrong weight gradient.

    On some CPUs (an AMD EPYC with AVX512-BF16, torch 2.13.0's oneDNN) a bf16 Conv3d's weight gradient is garbage,
    often inf, when the input is shallow in depth relative to the kernel (depth 2 under a 3x3x3 kernel: a VNet's
    bottleneck on a 32-deep crop); forward and input gradient stay right. Each distinct shape is probed once
    (:func:`bf16_weight_gradient_is_sound`, cached) and, where the probe fails, only that layer leaves autocast. See
    docs/results/analysis.md, "bf16 Conv3d weight gradients on AVX512-BF16 CPUs".
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and not bf16_weight_gradient_is_sound(tuple(x.shape), tuple(self.weight.shape), self.stride,
                                                      self.padding, self.dilation, self.groups,
                                                      x.is_contiguous(memory_format=torch.channels_last_3d))):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


@functools.cache
def bf16_weight_gradient_is_sound(input_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride: tuple,
                                  padding: tuple | str, dilation: tuple, groups: int, channels_last: bool) -> bool:
    """Whether a bf16 CPU ``conv3d`` of this shape gets its weight gradient right (within 5% of fp32's).

    Measured by :func:`bf16_weight_gradient_error`: a wrong kernel was off by 100% or more, bf16 rounding by well
    under 1% (benchmarks/bf16_conv3d_check.py).
    """
    return bf16_weight_gradient_error(input_shape, weight_shape, stride, padding, dilation, groups,
                                      channels_last) < 0.05


def bf16_weight_gradient_error(input_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride: tuple = 1,
                               padding: tuple | int | str = 0, dilation: tuple = 1, groups: int = 1,
                               channels_last: bool = False) -> float:
    """Largest error of a bf16 CPU ``conv3d``'s weight gradient relative to the largest fp32 one (inf if not finite).

    Random operands from a generator of its own (the training RNG is untouched), rounded to bf16 so that the fp32
    reference sees the same numbers.
    """
    generator = torch.Generator().manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(input_shape, generator=generator).bfloat16().contiguous(memory_format=fmt)
    weight = torch.randn(weight_shape, generator=generator).bfloat16().contiguous(memory_format=fmt)
    conv_args = (None, stride, padding, dilation, groups)
    with torch.enable_grad(), torch.autocast("cpu", enabled=False):
        weight.requires_grad_()
        out = F.conv3d(x, weight, *conv_args)
        upstream = torch.randn(out.shape, generator=generator).bfloat16()
        (bf16,) = torch.autograd.grad(out, weight, upstream)
        weight32 = weight.detach().float().requires_grad_()
        (reference,) = torch.autograd.grad(F.conv3d(x.float(), weight32, *conv_args), weight32, upstream.float())
    if not torch.isfinite(bf16).all():
        return float("inf")
    return float((bf16.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


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
