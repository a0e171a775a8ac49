"""Validation Dice of one checkpoint when slices are resized to other patch sizes at inference.

SSL4MIS's training scripts validate with ``test_single_volume(...)`` without a patch size, whose default is
256x256, whatever size the model was trained at. This scores a dust checkpoint both at its training size and at
other sizes (the run's own image resizing, Dice only), to tell which of the two an external number can come from:

    DUST_DATA=../shared/data python benchmarks/investigations/inference_patch_size.py \\
        runs/acdc/supervised_7p_seed2024_nearest/checkpoints/iter_0004000.pt --sizes 128 256 \\
        --out docs/results/diagnostics/inference_patch_size.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dust.config import resolve_data_dir
from dust.data.ssl4mis import load_volumes
from dust.engine.evaluation import dice_percent, evaluate_volumes
from dust.methods.loading import load_trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="square patch sizes to score")
    parser.add_argument("--split", default="val")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    method, cfg = load_trained(args.checkpoint, torch.device("cpu"))
    volumes = load_volumes(resolve_data_dir(cfg["data_dir"]), args.split, cfg["num_classes"])
    rows = []
    for size in args.sizes:
        _, summary = evaluate_volumes(method, volumes, {**cfg, "patch_size": [size, size]}, torch.device("cpu"),
                                      distances=False)
        rows.append({"patch_size": size, "trained_at": list(cfg["patch_size"]), **dice_percent(summary)})
        print(f"patch {size}x{size} (trained at {cfg['patch_size']}): Dice {rows[-1]['dice']:.2f} "
              f"{rows[-1]['per_class_dice']}")
    if args.out:
        args.out.write_text(json.dumps({
            "command": "python benchmarks/investigations/inference_patch_size.py " + " ".join(
                [str(args.checkpoint), "--sizes", *map(str, args.sizes), "--out", str(args.out)]),
            "checkpoint": str(args.checkpoint), "split": args.split,
            "image_interpolation": cfg["image_interpolation"], "rows": rows,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
