"""Does a checkpoint lose Dice to stale BatchNorm running statistics?

Scores one checkpoint on the validation volumes twice: as ``dust evaluate`` does (eval mode, BatchNorm uses the
running mean / variance collected during training) and with each BatchNorm layer normalising by the statistics
of the batch it is given (inference batches hold up to 32 slices, so one whole ACDC volume, 8-16 slices;
dropout stays off, running statistics untouched).
A large gap means the running statistics no longer describe the network's activations: typically when the
weights still move fast relative to BatchNorm's momentum, or when training-time perturbations change the
activation statistics. Dice only, the run's own resizing and patch size:

    DUST_DATA=../shared/data python benchmarks/batchnorm_statistics.py \\
        runs/acdc/urpc_7p_seed1337/checkpoints/iter_0004000.pt --out docs/results/urpc_7p_seed1337_batchnorm.json
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from dust.config import resolve_data_dir
from dust.data.ssl4mis import load_volumes
from dust.engine.evaluation import dice_percent, evaluate_volumes
from dust.engine.workflows import load_trained


@contextmanager
def batch_statistics(networks: dict[str, nn.Module]):
    """BatchNorm layers normalise with the current batch's statistics; nothing else changes, nothing is kept."""
    layers = [m for net in networks.values() for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.track_running_stats, m.running_mean, m.running_var) for m in layers]
    for m in layers:
        # without running buffers, BatchNorm uses batch statistics in eval mode too, and updates nothing
        m.track_running_stats, m.running_mean, m.running_var = False, None, None
    try:
        yield
    finally:
        for m, (track, mean, var) in zip(layers, saved, strict=True):
            m.track_running_stats, m.running_mean, m.running_var = track, mean, var


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    method, cfg = load_trained(args.checkpoint, torch.device("cpu"))
    volumes = load_volumes(resolve_data_dir(cfg["data_dir"]), args.split, cfg["num_classes"])
    rows = {}
    modes = {"running_statistics": nullcontext(), "batch_statistics": batch_statistics(method.networks)}
    for mode, statistics in modes.items():
        with statistics:
            _, summary = evaluate_volumes(method, volumes, cfg, torch.device("cpu"), distances=False)
        rows[mode] = dice_percent(summary)
        print(f"{mode:20s} Dice {rows[mode]['dice']:.2f} {rows[mode]['per_class_dice']}")
    if args.out:
        args.out.write_text(json.dumps({
            "command": f"python benchmarks/batchnorm_statistics.py {args.checkpoint} --out {args.out}",
            "checkpoint": str(args.checkpoint), "method": cfg["method"], "split": args.split, **rows,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
