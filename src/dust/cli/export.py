"""``dust export --input CASE.h5|DIR --output DIR``: h5 cases (and their labels) as NIfTI files."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from dust.data.nifti import LA_CASE_FILE, export_h5_case
    from dust.data.types import DataError

    source = Path(args.input)
    # a folder of h5 cases, or of LA-layout case folders (<id>/mri_norm2.h5, e.g. LA/volumes)
    cases = (sorted(source.glob("*.h5")) or sorted(source.glob(f"*/{LA_CASE_FILE}"))) if source.is_dir() else [source]
    if not cases or not all(p.is_file() for p in cases):
        raise DataError(f"{source}: no .h5 case here")
    out = Path(args.output)
    written = [p for case in cases for p in export_h5_case(case, out, args.spacing)]
    print(f"dust export: {len(cases)} case(s), {len(written)} NIfTI file(s) in {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write h5 cases (dust or SSL4MIS layout) as NIfTI: images, and labels under "
                                      "labels/, on the grid dust predict writes")
    p.add_argument("--input", required=True, help="an .h5 case, or a folder of them (or of LA's <id>/mri_norm2.h5)")
    p.add_argument("--output", required=True, help="folder for <case>.nii.gz (and labels/<case>.nii.gz); an LA "
                                                   "case is named by its folder, <id>")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="voxel size in mm, for cases that keep no geometry (ACDC as SSL4MIS stores it: take it "
                        "from the scan's own NIfTI header); default: the stored affine, else 1 mm")
    p.set_defaults(func=cmd_export)
