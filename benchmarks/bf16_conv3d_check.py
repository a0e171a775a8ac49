"""Does this CPU's bf16 Conv3d compute the right weight gradient? The shapes a VNet sees at the LA CPU protocol.

For every encoder/decoder level of the protocol's VNet (crops 32x64x64 resampled, 16-256 channels, 3x3x3 kernels),
MultiCURE's 5x5x5 branch and the test phantom's 16^3 crops: the relative error of the bf16 weight gradient against
fp32 on the same bf16-rounded operands, for plain ``torch.nn.Conv3d`` and for dust's ``layers.conv(3)`` (which leaves
autocast where its probe finds the kernel wrong). bf16 rounding alone stays well under 1%; a wrong kernel is off by
100% or more, often inf. Backs docs/results/analysis.md, "bf16 Conv3d weight gradients on AVX512-BF16 CPUs":

    python benchmarks/bf16_conv3d_check.py --out docs/results/diagnostics/bf16_conv3d_NAME.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn

from dust.models.layers import conv
from dust.results import cpu_model

# (batch, channels, depth, height, width, kernel): LA protocol VNet levels (a 32x64x64 crop halves four times),
# MultiCURE's 5x5x5 branch on the auxiliary decoder's 4x8x8 map, the 3D phantom's bottleneck decoder level
SHAPES = [
    (4, 16, 32, 64, 64, 3), (4, 32, 16, 32, 32, 3), (4, 64, 8, 16, 16, 3), (4, 128, 4, 8, 8, 3),
    (4, 256, 2, 4, 4, 3), (4, 64, 4, 8, 8, 5), (4, 32, 2, 2, 2, 3),
]


def weight_gradient_error(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> float:
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().backward(upstream)
    reference = torch.nn.grad.conv3d_weight(x, layer.weight.shape, upstream, padding=layer.padding)
    error = (layer.weight.grad - reference).abs().max() / reference.abs().max()
    return float(error) if torch.isfinite(layer.weight.grad).all() else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/diagnostics/bf16_conv3d.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for batch, channels, depth, height, width, kernel in SHAPES:
        plain = nn.Conv3d(channels, channels, kernel, padding=kernel // 2, bias=False)
        dust_conv = conv(3)(channels, channels, kernel, padding=kernel // 2, bias=False)
        with torch.no_grad():
            plain.weight.copy_(plain.weight.bfloat16().float())
            dust_conv.weight.copy_(plain.weight)
        x = torch.randn(batch, channels, depth, height, width).bfloat16().float()
        upstream = torch.randn(batch, channels, depth, height, width).bfloat16().float()
        row = {"input": [batch, channels, depth, height, width], "kernel": kernel,
               "torch_conv3d_error": round(weight_gradient_error(plain, x, upstream), 4),
               "dust_conv3d_error": round(weight_gradient_error(dust_conv, x, upstream), 4)}
        rows.append(row)
        print(row)
    out = {"command": f"python benchmarks/bf16_conv3d_check.py --out {args.out}", "cpu": cpu_model(),
           "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "torch": torch.__version__,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
