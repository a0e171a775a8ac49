"""``dust export-model --checkpoint CKPT --out DIR [--onnx]``: a trained model for use without dust."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export_model(args: argparse.Namespace) -> int:
    from dust.engine.export import CONTRACT_FILE, export_model

    out = Path(args.out)
    spec = export_model(Path(args.checkpoint), out, onnx=args.onnx)
    files = ", ".join(str(out / f) for f in spec["files"].values() if f)
    print(f"dust export-model: {files}; how to call it: {out / CONTRACT_FILE} (docs/deployment.md)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-model", help="write a checkpoint's network(s) as TorchScript (and ONNX) with the "
                                            "pre/post-processing contract (model.json) beside it")
    p.add_argument("--checkpoint", required=True, help="a dust checkpoint (e.g. RUN_DIR/checkpoints/best.pt)")
    p.add_argument("--out", required=True, help="folder for model.torchscript.pt, model.onnx and model.json")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs: pip install onnx onnxscript)")
    p.set_defaults(func=cmd_export_model)
