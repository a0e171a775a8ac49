"""Seconds per training step of LA methods at the LA CPU protocol's shapes, and MultiCURE's deformable share.

Each method's ``train_step`` + backward + SGD step on one LA-shaped batch (2 labelled + 2 unlabelled crops of
32x64x64 from configs/la/, random intensities: speed does not depend on the content), bf16 autocast as the protocol
runs (``--precision``), ``--threads`` threads (1: the protocol runs two single-thread runs side by side). The
median of ``--steps`` steps after ``--warmup``. Then the MultiCURE module and its deformable branch alone, forward +
backward on the feature map they see in a step, and ``multicure`` with ``multicure_module: false``: the module's
share of a step is the difference. Run with nothing else running:

    python benchmarks/la_step_speed.py --out docs/results/speed/la_step_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dust.config import load_config
from dust.methods import get_method
from dust.methods.loading import full_config
from dust.models.deformable import UncertaintyRefinedNetwork

REPO = Path(__file__).resolve().parents[1]


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def time_method(name: str, overrides: dict, args: argparse.Namespace) -> float:
    cfg = full_config({**load_config(REPO / "configs" / "la" / f"{name}.yaml"), **overrides})
    method = get_method(name)(cfg)
    method.build()
    params = method.parameters()
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    patch = tuple(cfg["patch_size"])
    margin = method.unlabeled_crop_margin() or (0,) * len(patch)
    batch = {"labeled_image": torch.randn(2, 1, *patch, generator=gen),
             "label": (torch.rand(2, *patch, generator=gen) > 0.7).long(),
             "unlabeled_image": torch.randn(2, 1, *(p + 2 * m for p, m in zip(patch, margin, strict=True)),
                                            generator=gen)}
    for net in method.networks.values():
        net.train()
    times = []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        with _autocast(args.precision):
            losses = method.train_step(batch, step)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        method.after_step(step)
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_module(part: str, args: argparse.Namespace) -> float:
    cfg = full_config(load_config(REPO / "configs" / "la" / "multicure.yaml"))
    method = get_method("multicure")(cfg)
    method.build()
    net: UncertaintyRefinedNetwork = method.networks["model2"]
    features = {}

    def keep(level: int, z: torch.Tensor) -> torch.Tensor:
        features.setdefault(level, z)
        return z

    x = torch.randn(4, 1, *cfg["patch_size"])
    with torch.no_grad():
        net.network.decoder.stages(net.network.encoder(x), keep)
    z = features[net.refine_level].detach().requires_grad_(True)
    uncertain = (torch.rand(z.shape[0], 1, *z.shape[2:]) > 0.5).float()
    module = net.multicure if part == "module" else net.multicure.deformable
    times = []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        with _autocast(args.precision):
            out = module(z, uncertain) if part == "module" else module(z)
        out.float().pow(2).mean().backward()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["supervised", "cps", "fixdyn", "mcf", "multicure"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--out", default="docs/results/speed/la_step_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in args.methods:
        rows.append({"method": name, "setting": "defaults", "seconds_per_step": time_method(name, {}, args)})
        print(rows[-1], flush=True)
    if "multicure" in args.methods:
        rows.append({"method": "multicure", "setting": "multicure_module=false",
                     "seconds_per_step": time_method("multicure", {"multicure_module": False}, args)})
        print(rows[-1], flush=True)
        for part in ("module", "deformable"):
            rows.append({"method": "multicure", "setting": f"{part} alone, forward + backward",
                         "seconds_per_step": time_module(part, args)})
            print(rows[-1], flush=True)
    result = {"command": "python " + " ".join(sys.argv), "threads": args.threads, "precision": args.precision,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "rows": [{**r, "seconds_per_step": round(r["seconds_per_step"], 3)} for r in rows]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
