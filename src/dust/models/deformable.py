"""Deformable convolution (Dai et al., ICCV 2017) in 2D or 3D, and MultiCURE's three-branch module built on it.

torchvision has only ``deform_conv2d``; :class:`DeformableConv` works in both dimensions the same way: a plain
convolution predicts, for every output voxel, one offset vector per kernel tap (zero-initialised, so training starts
from the regular grid); the input is sampled at tap position + offset with ``grid_sample`` (bi-/trilinear, zeros
outside); the kernel weights then combine the sampled taps. With zero offsets it equals the regular convolution
with the same weights; with an integer offset it is the convolution of the shifted input.

:class:`MultiCURE` (Karimijafarbigloo et al., Section 2.1, Figure 2): three branches on a feature map z of d
channels (3^n conv-BN-ReLU, 5^n conv-BN-ReLU, 3^n deformable conv whose output is summed with the uncertainty
attention map), concatenation, global average pooling, a shared linear layer 3d -> 3d/r (+ ReLU, as the selective-
kernel block this design follows), one linear layer per branch back to d, softmax over the three branches per
channel, and z' = sum_i u_i * K_i.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from dust.models.base import SegmentationNetwork
from dust.models.layers import batchnorm, conv


class DeformableConv(nn.Module):
    """A k^n deformable convolution, stride 1, 'same' padding (n = ``spatial_dims``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, spatial_dims: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"deformable convolution needs an odd kernel size, got {kernel_size}")
        self.dims, self.k = spatial_dims, kernel_size
        taps = kernel_size**spatial_dims
        self.weight = nn.Parameter(torch.empty(cout, cin, *(kernel_size,) * spatial_dims))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv's default initialisation
        self.offset = conv(spatial_dims)(cin, spatial_dims * taps, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        r = kernel_size // 2  # tap positions relative to the centre, in the weight's (axis 0, 1, ...) order
        self.register_buffer("taps", torch.tensor(list(itertools.product(range(-r, r + 1), repeat=spatial_dims)),
                                                  dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """``offsets`` (B, n * taps, *spatial), voxels per axis in the input's axis order; default: predicted."""
        b, c, *size = x.shape
        n, taps = self.dims, len(self.taps)
        if offsets is None:
            offsets = self.offset(x)
        offsets = offsets.float().view(b, taps, n, *size)
        axes = torch.meshgrid(*(torch.arange(s, device=x.device, dtype=torch.float32) for s in size), indexing="ij")
        base = torch.stack(axes)  # (n, *spatial): each voxel's own coordinates
        shape = (1, taps, n) + (1,) * n
        where = base[None, None] + self.taps.view(shape) + offsets  # (B, taps, n, *spatial) sample positions
        # grid_sample's normalised coordinates with align_corners=False: voxel i spans [2i/s - 1, 2(i+1)/s - 1], so
        # its centre is (i + 0.5) * 2 / s - 1 (also right on an axis of size 1); last axis first (x, y, z)
        scale = torch.tensor([2.0 / s for s in size], device=x.device).view(1, 1, n, *(1,) * n)
        grid = ((where + 0.5) * scale - 1.0).flip(2)
        grid = grid.movedim(2, -1).reshape(b, taps * size[0], *size[1:], n)  # taps stacked along the first axis
        sampled = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # (B, C, taps * S, H, W) is (B, C * taps, voxels) in memory: the kernel is one matrix product, no copy
        out = self.weight.flatten(1).float() @ sampled.reshape(b, c * taps, -1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1)
        return out.view(b, -1, *size).to(x.dtype)


class MultiCURE(nn.Module):
    """Multi-branch contextual uncertainty reduction on a d-channel feature map; ``forward(z, uncertainty)`` with
    the binary uncertainty map (B, 1, *spatial) on z's grid (1 = uncertain) returns z' of z's shape."""

    def __init__(self, channels: int, spatial_dims: int = 3, reduction: int = 4) -> None:
        super().__init__()
        d, dims = channels, spatial_dims

        def branch(kernel: int) -> nn.Sequential:
            return nn.Sequential(conv(dims)(d, d, kernel, padding=kernel // 2, bias=False), batchnorm(dims)(d),
                                 nn.ReLU(inplace=True))

        self.branch3, self.branch5 = branch(3), branch(5)
        self.deformable = DeformableConv(d, d, 3, dims)
        self.squeeze = nn.Sequential(nn.Linear(3 * d, max(1, 3 * d // reduction)), nn.ReLU(inplace=True))
        self.excite = nn.ModuleList(nn.Linear(max(1, 3 * d // reduction), d) for _ in range(3))
        self.last_attention: torch.Tensor | None = None  # (B, 3, d), kept for inspection and tests

    def forward(self, z: torch.Tensor, uncertainty: torch.Tensor | None = None) -> torch.Tensor:
        u3 = self.deformable(z)
        if uncertainty is not None:
            u3 = u3 + uncertainty.to(u3.dtype)  # the uncertainty attention map, broadcast over channels
        branches = [self.branch3(z), self.branch5(z), u3]
        pooled = torch.cat(branches, 1).flatten(2).mean(2)  # GAP of q = [u1 || u2 || u3]: (B, 3d)
        k = self.squeeze(pooled)
        attention = torch.softmax(torch.stack([fc(k) for fc in self.excite], 1), dim=1)  # (B, 3, d), over branches
        self.last_attention = attention.detach()
        view = attention.view(*attention.shape, *(1,) * (z.dim() - 2))
        return sum(u * view[:, i] for i, u in enumerate(branches))


class UncertaintyRefinedNetwork(SegmentationNetwork):
    """A VNet-decoder network (e.g. MCF's ResNet-VNet) with MultiCURE after decoder level ``refine_level`` (0 =
    the deepest of its four levels, 3 = the full-resolution one).

    ``refined(x, uncertainty, feature_levels)`` takes the binary uncertainty map (B, 1, *spatial) at the input's
    resolution (max-pooled onto the refined level's grid, so a cell holding one uncertain voxel counts as uncertain)
    and also returns the features of the decoder levels asked for. ``forward(x)`` runs MultiCURE without a map;
    training always passes one, so a caller with the predictive network's map uses ``refined``, as MultiCURE's
    ``predict`` does."""

    def __init__(self, network: nn.Module, refine_level: int = 1, reduction: int = 4) -> None:
        super().__init__()
        self.network = network
        decoder = network.decoder
        self.refine_level = refine_level
        channels = decoder.blocks[refine_level][0].out_channels
        self.multicure = MultiCURE(channels, network.spatial_dims, reduction)
        self.spatial_dims = network.spatial_dims

    def refined(self, x: torch.Tensor, uncertainty: torch.Tensor | None,
                feature_levels: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        def refine(level: int, z: torch.Tensor) -> torch.Tensor:
            if level != self.refine_level or self.multicure is None:  # None: the module is ablated
                return z
            if uncertainty is None:
                return self.multicure(z)
            pool = (F.adaptive_max_pool2d, F.adaptive_max_pool3d)[self.spatial_dims - 2]
            return self.multicure(z, pool(uncertainty.float(), z.shape[2:]))

        stages = self.network.decoder.stages(self.network.encoder(x), refine)
        return self.network.decoder.output(stages[-1]), [stages[i] for i in feature_levels]

    def forward_main(self, x: torch.Tensor) -> torch.Tensor:
        return self.refined(x, None)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_main(x)
