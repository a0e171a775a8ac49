"""``dust prepare --source DIR --out DIR``: a NIfTI dataset (MSD, nnU-Net v2, raw ACDC) -> dust's training layout."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_prepare(args: argparse.Namespace) -> int:
    from dust.data.prepare import CONFIG_FILE, VolumeOptions, parse_label_map, prepare_dataset

    out = Path(args.out)
    dims = args.dims
    norm = args.norm or ("zscore" if dims == 3 else "minmax")
    volume_options = VolumeOptions(
        spacing=args.spacing, window=args.window, patch_size=args.patch, crop_nonzero=not args.no_crop,
        **({"patch_voxels": args.patch_voxels} if args.patch_voxels else {}),
    )
    if dims == 2 and (args.spacing or args.window or args.patch or args.patch_voxels or args.no_crop):
        raise ValueError("--spacing, --window, --patch, --patch-voxels and --no-crop plan a 3D dataset: add --dims 3")
    record = prepare_dataset(
        Path(args.source), out, layout=args.layout, modalities=args.modalities, intensity_norm=norm,
        slice_axis=args.slice_axis, val=args.val, test=args.test, labeled=args.labeled, seed=args.seed,
        splits_file=Path(args.splits) if args.splits else None, unlabeled_dirs=[Path(d) for d in args.unlabeled],
        dims=dims, volume_options=volume_options, label_map=parse_label_map(args.label_map) if args.label_map else None,
    )
    splits = ", ".join(f"{n} {k}" for k, n in record["splits"].items())
    print(f"dust prepare: {record['layout']} dataset -> {out} ({splits} cases; channels "
          f"{record['channel_names']}; classes {record['class_names']}; intensity {record['intensity_norm']})")
    if dims == 3:
        plan = record["plan"]
        print(f"  plan:   {record['target_spacing']} mm (S, H, W), median shape "
              f"{[round(m) for m in plan['median_shape']]}, {plan['model']} patch {plan['patch_size']}")
    print(f"  splits: {out / 'splits.json'} (edit it, then run prepare again with --splits)")
    print(f"  train:  dust train --config {out / CONFIG_FILE} --set method={'mcf' if dims == 3 else 'dust'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="convert a NIfTI dataset (Medical Segmentation Decathlon, nnU-Net v2, raw "
                                       "ACDC) into dust's training layout, with a seeded split by patient")
    p.add_argument("--source", required=True, help="dataset folder (with dataset.json, or ACDC's patientXXX/)")
    p.add_argument("--out", required=True, help="folder for the prepared dataset (replaced if prepared before)")
    p.add_argument("--layout", default="auto", choices=["auto", "msd", "nnunet", "acdc"])
    p.add_argument("--modalities", nargs="+", metavar="NAME_OR_INDEX",
                   help="channels to use, by dataset.json name or index, e.g. T2 ADC (default: all)")
    p.add_argument("--dims", type=int, default=2, choices=[2, 3],
                   help="2: slices for a 2D model (default, as nnU-Net's 2d); 3: resampled volumes read crop by crop "
                        "and a plan for a 3D model (as nnU-Net's 3d_fullres); docs/your_own_data.md says which")
    p.add_argument("--norm", choices=["minmax", "zscore", "zscore_nonzero", "ct", "none"],
                   help="intensity normalisation: minmax / zscore per case (default minmax in 2D, zscore in 3D); "
                        "zscore_nonzero inside the nonzero mask (skull-stripped MRI); ct: clip + z-score with the "
                        "dataset's foreground statistics (--dims 3); none: as stored (data normalised before, e.g. "
                        "UA-MT's LA volumes)")
    p.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="--norm ct: clip to this window (HU, e.g. -125 275) instead of the foreground percentiles")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                   help="--dims 3: target spacing, one number (isotropic) or three (x y z of the files; default: the "
                        "dataset's median, the coarse axis at its 10th percentile when anisotropic)")
    p.add_argument("--patch", type=int, nargs=3, metavar=("S", "H", "W"),
                   help="--dims 3: patch size (default: planned from the median shape and --patch-voxels)")
    p.add_argument("--patch-voxels", type=int, metavar="N",
                   help="--dims 3: the planned patch holds at most N voxels (default 131072 = 32x64x64, a CPU; "
                        "a GPU takes 96x96x96 = 884736)")
    p.add_argument("--no-crop", action="store_true",
                   help="--dims 3: keep each case whole instead of cropping it to where a channel is nonzero")
    p.add_argument("--label-map", nargs="+", metavar="SRC[,SRC]=CLASS",
                   help="map source label values to classes, e.g. 1,2,4=1 (BraTS whole tumour); unnamed values "
                        "become background")
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
