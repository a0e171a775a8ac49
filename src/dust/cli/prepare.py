"""``dust prepare --source DIR --out DIR``: a NIfTI dataset (MSD, nnU-Net v2, raw ACDC) -> dust's training layout."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_prepare(args: argparse.Namespace) -> int:
    from dust.data.prepare import CONFIG_FILE, prepare_dataset

    out = Path(args.out)
    record = prepare_dataset(
        Path(args.source), out, layout=args.layout, modalities=args.modalities, intensity_norm=args.norm,
        slice_axis=args.slice_axis, val=args.val, test=args.test, labeled=args.labeled, seed=args.seed,
        splits_file=Path(args.splits) if args.splits else None, unlabeled_dirs=[Path(d) for d in args.unlabeled],
    )
    splits = ", ".join(f"{n} {k}" for k, n in record["splits"].items())
    print(f"dust prepare: {record['layout']} dataset -> {out} ({splits} cases; channels "
          f"{record['channel_names']}; classes {record['class_names']}; {record['intensity_norm']} per case)")
    print(f"  splits: {out / 'splits.json'} (edit it, then run prepare again with --splits)")
    print(f"  train:  dust train --config {out / CONFIG_FILE} --set method=dust")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="convert a NIfTI dataset (Medical Segmentation Decathlon, nnU-Net v2, raw "
                                       "ACDC) into dust's training layout, with a seeded split by patient")
    p.add_argument("--source", required=True, help="dataset folder (with dataset.json, or ACDC's patientXXX/)")
    p.add_argument("--out", required=True, help="folder for the prepared dataset (replaced if prepared before)")
    p.add_argument("--layout", default="auto", choices=["auto", "msd", "nnunet", "acdc"])
    p.add_argument("--modalities", nargs="+", metavar="NAME_OR_INDEX",
                   help="channels to use, by dataset.json name or index, e.g. T2 ADC (default: all)")
    p.add_argument("--norm", default="minmax", choices=["minmax", "zscore"],
                   help="per-case intensity normalisation: minmax (SSL4MIS) or zscore (default: minmax)")
    p.add_argument("--slice-axis", type=int, default=2, choices=[0, 1, 2],
                   help="NIfTI voxel axis to cut 2D slices along (default 2, the through-plane axis)")
    p.add_argument("--val", type=float, default=0.2, help="validation patients: fraction (<1) or count")
    p.add_argument("--test", type=float, default=0.0, help="test patients: fraction (<1) or count")
    p.add_argument("--labeled", type=int, help="labelled training patients (default: all with labels; the other "
                                               "training patients join the unlabelled pool)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--splits", metavar="JSON", help="use this split file (e.g. an edited splits.json) instead")
    p.add_argument("--unlabeled", action="append", default=[], metavar="DIR",
                   help="folder of images without labels for the unlabelled pool (repeatable)")
    p.set_defaults(func=cmd_prepare)
