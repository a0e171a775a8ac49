"""Seconds per U-Net training step on this machine: fp32 vs bf16 autocast, channels-first vs channels_last.

The CPU budget protocol's step (128x128, batch 8, U-Net 16-256, (Dice + CE) / 2, SGD). Writes
docs/results/speed/step_speed.json with the machine's core count. Run on an otherwise idle machine:

    python benchmarks/step_speed.py --threads 2 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from dust.losses import supervised_loss
from dust.models import DualDecoderUNet2D, UNet2D


def time_step(model_cls: type, bf16: bool, channels_last: bool, batch: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = model_cls()
    x = torch.rand(batch, 1, 128, 128)
    y = torch.randint(0, 4, (batch, 128, 128))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    times = []
    for i in range(warmup + steps):
        tic = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            outs = out if isinstance(out, tuple) else (out,)
            loss = sum(supervised_loss(o, y) for o in outs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    times.sort()
    return times[len(times) // 2]  # median: robust to a background hiccup


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="docs/results/speed/step_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, cls, batch in [("unet2d", UNet2D, 8), ("dual_unet2d", DualDecoderUNet2D, 16)]:
        for bf16, cl in [(False, False), (False, True), (True, False), (True, True)]:
            sec = time_step(cls, bf16, cl, batch, args.steps, args.warmup)
            rows.append({"model": name, "batch": batch, "bf16": bf16, "channels_last": cl, "seconds_per_step": sec})
            print(f"{name:12s} batch {batch:2d} bf16={bf16!s:5} channels_last={cl!s:5} {sec:.3f} s/step")
    result = {
        "command": f"python benchmarks/step_speed.py --threads {args.threads} --steps {args.steps} "
                   f"--warmup {args.warmup} --out {args.out}",
        "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
        # bf16 autocast is only fast where the CPU has native bf16 (AVX512-BF16 / AMX); elsewhere it is emulated
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
