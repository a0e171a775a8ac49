"""``dust predict --checkpoint CKPT --input FILE_OR_DIR --output DIR [--uncertainty]``: label NIfTIs for new cases."""

from __future__ import annotations

import argparse
from pathlib import Path

from dust.cli.options import add_method_option, trust_named_methods


def cmd_predict(args: argparse.Namespace) -> int:
    from dust.predict import predict_cases

    trust_named_methods(args)
    out = Path(args.output)
    written = predict_cases(Path(args.checkpoint), Path(args.input), out, uncertainty=args.uncertainty,
                            device=args.device)
    extra = f" and uncertainty maps in {out / 'uncertainty'}" if args.uncertainty else ""
    print(f"dust predict: {len(written)} label map(s) in {out}{extra}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment NIfTI (or h5) cases; labels are written on the input's voxel grid "
                                       "with its affine and header")
    p.add_argument("--checkpoint", required=True, help="a dust checkpoint (e.g. RUN_DIR/checkpoints/best.pt)")
    p.add_argument("--input", required=True, help="a case file, or a folder of cases (.nii.gz, .nii, .h5; "
                                                  "nnU-Net channel files CASE_0000, CASE_0001 are one case)")
    p.add_argument("--output", required=True,
                   help="folder for <case>.nii.gz label maps; dust_predictions.json there records the model and the "
                        "files written: only those, of the same model, are ever replaced")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write uncertainty/<case>.nii.gz: decoder KL (dual-decoder models) or entropy")
    add_method_option(p)
    p.add_argument("--device", help="auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_predict)
