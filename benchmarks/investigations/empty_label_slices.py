"""How many ACDC training slices have a background-only ground truth (a dataset fact, not a training input).

Set beside what a teacher predicts (benchmarks/investigations/reliable_split_background.py): if the teacher
calls far more slices empty than the ground truth has, its empty pseudo-labels are mostly wrong.

    DUST_DATA=../shared/data python benchmarks/investigations/empty_label_slices.py \\
        [--out docs/results/diagnostics/acdc_empty_label_slices.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py

from dust.config import resolve_data_dir
from dust.data.ssl4mis import read_list


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="ACDC", help="dataset folder, or a name under $DUST_DATA")
    parser.add_argument("--list", default="train_slices.list")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args()
    root = resolve_data_dir(args.data_dir)
    names = read_list(root / args.list)
    empty = []
    for name in names:
        with h5py.File(root / "data" / f"{name}.h5", "r") as f:
            if not f["label"][()].any():
                empty.append(name)
    percent = round(100 * len(empty) / len(names), 1)
    print(f"{len(empty)} of {len(names)} slices in {args.list} have a background-only label ({percent}%)")
    if args.out:
        args.out.write_text(json.dumps({"list": args.list, "slices": len(names), "background_only": len(empty),
                                        "percent": percent, "slice_ids": empty}, indent=1) + "\n")


if __name__ == "__main__":
    main()
