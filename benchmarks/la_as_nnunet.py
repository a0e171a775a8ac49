"""Write the LA volumes (UA-MT's h5 layout) as an nnU-Net v2 folder of NIfTIs at 0.625 mm, and a dust split file
that holds the LA CPU protocol's split, so the own-data path (`dust prepare --dims 3`) can be compared with the
`la_h5` reader on the same cases (docs/your_own_data.md, recipe "LA").

    python benchmarks/la_as_nnunet.py --la $DUST_DATA/LA --out ../la_nnunet [--labeled 8]
    dust prepare --source ../la_nnunet --out ../la_prepared --dims 3 --norm zscore --spacing 1.25 \
        --patch 32 64 64 --splits ../la_nnunet/splits_dust.json

Each h5 `image` (X, Y, Z) is written unchanged with the affine diag(0.625, 0.625, 0.625) (the LA volumes record no
geometry); `label` likewise. The split: labelled = the first `--labeled` of train.list, validation = the last 8
(the la_h5 reader's holdout_cases), unlabelled = the rest, in train.list's order (so the sampler draws the same
items in the same order as the la_h5 reader).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

SPACING_MM = 0.625
HOLDOUT = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--la", type=Path, required=True, help="the LA folder (volumes/<id>/mri_norm2.h5, train.list)")
    parser.add_argument("--out", type=Path, required=True, help="the nnU-Net v2 folder to write (must not exist)")
    parser.add_argument("--labeled", type=int, default=8)
    args = parser.parse_args()
    ids = [line.strip() for line in (args.la / "train.list").read_text().splitlines() if line.strip()]
    if args.out.exists():
        raise SystemExit(f"{args.out}: exists; choose a new folder")
    (args.out / "imagesTr").mkdir(parents=True)
    (args.out / "labelsTr").mkdir()
    affine = np.diag([SPACING_MM] * 3 + [1.0])
    for case_id in ids:
        with h5py.File(args.la / "volumes" / case_id / "mri_norm2.h5", "r") as f:
            image, label = np.asarray(f["image"], dtype=np.float32), np.asarray(f["label"], dtype=np.uint8)
        nib.save(nib.Nifti1Image(image, affine), args.out / "imagesTr" / f"{case_id}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), args.out / "labelsTr" / f"{case_id}.nii.gz")
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "LA": 1}, "numTraining": len(ids),
            "file_ending": ".nii.gz", "name": "LA (UA-MT's z-scored volumes, 0.625 mm)"}
    (args.out / "dataset.json").write_text(json.dumps(meta, indent=1))
    pool = ids[:-HOLDOUT]
    splits = {"seed": 0, "labeled": pool[: args.labeled], "unlabeled": pool[args.labeled :], "val": ids[-HOLDOUT:],
              "test": []}
    (args.out / "splits_dust.json").write_text(json.dumps(splits, indent=1))
    print(f"{len(ids)} cases -> {args.out} (split: {args.out / 'splits_dust.json'})")


if __name__ == "__main__":
    main()
