"""``dust rank --checkpoints CKPT... --input DIR``: which unlabelled cases to annotate next (DUST Eq. 1)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dust.cli.options import add_method_option, trust_named_methods


def cmd_rank(args: argparse.Namespace) -> int:
    from dust.predict import rank_cases

    trust_named_methods(args)
    out = Path(args.out)
    rows = rank_cases([Path(p) for p in args.checkpoints], Path(args.input), out, device=args.device)
    print(f"dust rank: {len(rows)} case(s), hardest first, in {out}")
    for i, row in enumerate(rows[: args.show], 1):
        print(f"  {i:>3}  {row['case']}  {row['uncertainty']:.4g}  (hardest slice {row['hardest_slice']})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rank", help="rank unlabelled cases by DUST's sample-level uncertainty (Eq. 1), hardest "
                                    "first: the cases worth annotating next")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                   help="K >= 2 checkpoints in training order, e.g. RUN_DIR/checkpoints/pretrain_k*.pt of a DUST "
                        "run; the last is the reference")
    p.add_argument("--input", required=True, help="a folder of unlabelled cases (or one case file)")
    p.add_argument("--out", default="ranking.csv", help="CSV to write (default: ranking.csv)")
    p.add_argument("--show", type=int, default=10, help="print this many of the hardest cases")
    add_method_option(p)
    p.add_argument("--device", help="auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_rank)
