"""Does a checkpoint lose Dice to stale BatchNorm running statistics, and is dropout the reason?

Scores one checkpoint on the validation volumes with four sets of BatchNorm statistics:

- ``running_statistics``: as ``dust evaluate`` does (eval mode, the running mean / variance kept in training);
- ``batch_statistics``: each BatchNorm layer normalises by the batch it is given (inference batches hold up to 32
  slices, so one whole ACDC volume, 8-16 slices);
- ``recomputed_dropout_on``: running statistics re-estimated (``dust.models.batchnorm``: a plain average) over
  ``--batches`` training batches drawn as training draws them (labelled + unlabelled, augmented), with dropout
  active as in training; this should reproduce ``running_statistics`` when those are merely the training-time
  statistics;
- ``recomputed_dropout_off``: the same batches with dropout off, i.e. the activations the network sees at test
  time, which is what ``batchnorm_recalibration_batches`` does in training. A gap between the two recomputed rows
  is dropout's train/test variance shift.

``--network NAME`` scores another network of a two-network method instead of the one its inference uses (e.g.
``model2``, CPS's xavier-initialised network). The checkpoint file is never changed. Dice only, the run's own
resizing and patch size:

    DUST_DATA=../shared/data python benchmarks/batchnorm_statistics.py \\
        runs/acdc/urpc_7p_seed1337/checkpoints/iter_0004000.pt \\
        --out docs/results/diagnostics/urpc_7p_seed1337_batchnorm.json
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from dust.config import resolve_data_dir
from dust.data import load_training_data
from dust.data.sampler import TwoStreamSampler
from dust.engine.evaluation import dice_percent, evaluate_volumes
from dust.methods.loading import load_trained
from dust.models.batchnorm import batchnorm_layers, recalibrate_batchnorm


@contextmanager
def batch_statistics(networks: dict[str, nn.Module]) -> Iterator[None]:
    """BatchNorm layers normalise with the current batch's statistics; nothing else changes, nothing is kept."""
    layers = batchnorm_layers(networks)
    saved = [(m.track_running_stats, m.running_mean, m.running_var) for m in layers]
    for m in layers:
        # without running buffers, BatchNorm uses batch statistics in eval mode too, and updates nothing
        m.track_running_stats, m.running_mean, m.running_var = False, None, None
    try:
        yield
    finally:
        for m, (track, mean, var) in zip(layers, saved, strict=True):
            m.track_running_stats, m.running_mean, m.running_var = track, mean, var


@contextmanager
def recomputed_statistics(method, batches: list[torch.Tensor], dropout: bool, bf16: bool) -> Iterator[None]:
    """:func:`recalibrate_batchnorm` over ``batches``, dropout on or off; the weights and buffers are restored
    afterwards."""
    saved = {k: copy.deepcopy(net.state_dict()) for k, net in method.networks.items()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    recalibrate_batchnorm(method.networks, method.predict, batches, autocast, dropout)
    try:
        yield
    finally:
        for k, net in method.networks.items():
            net.load_state_dict(saved[k])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--batches", type=int, default=50, help="training batches for the recomputed statistics")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--network", help="score this network of the method (default: the one inference uses)")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    method, cfg = load_trained(args.checkpoint, torch.device("cpu"))
    if args.network:
        if args.network not in method.networks:
            parser.error(f"--network {args.network}: {args.checkpoint} holds {sorted(method.networks)}")
        network = method.networks[args.network]
        method.predict = network  # recalibration then reaches only this network's BatchNorm layers
    cfg = {**cfg, "val_split": args.split}
    data = load_training_data(cfg, resolve_data_dir(cfg["data_dir"]))
    # seed 0: not the run's own draws, the same kind of batches
    sampler = TwoStreamSampler.from_config(data.labeled, data.unlabeled, cfg, 0)
    drawn = [sampler.next(True) for _ in range(args.batches)]
    batches = [torch.cat([b["labeled_image"], b["unlabeled_image"]]) for b in drawn]
    bf16 = bool(cfg["bf16"])
    modes = {
        "running_statistics": lambda: nullcontext(),
        "batch_statistics": lambda: batch_statistics(method.networks),
        "recomputed_dropout_on": lambda: recomputed_statistics(method, batches, dropout=True, bf16=bf16),
        "recomputed_dropout_off": lambda: recomputed_statistics(method, batches, dropout=False, bf16=bf16),
    }
    rows = {}
    torch.manual_seed(0)  # the dropout masks of recomputed_dropout_on: the same numbers on every run
    for mode, statistics in modes.items():
        with statistics():
            _, summary = evaluate_volumes(method, data.val, cfg, torch.device("cpu"), distances=False)
        rows[mode] = dice_percent(summary)
        print(f"{mode:24s} Dice {rows[mode]['dice']:.2f} {rows[mode]['per_class_dice']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({
            "command": f"python benchmarks/batchnorm_statistics.py {args.checkpoint}"
                       + (f" --network {args.network}" if args.network else "") + f" --out {args.out}",
            "checkpoint": str(args.checkpoint), "method": cfg["method"], "network": args.network or "inference",
            "split": args.split,
            "recompute_batches": args.batches, **rows,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
