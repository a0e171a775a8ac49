"""``dust report RUN_DIR [RUN_DIR ...]``: one self-contained HTML report (a comparison when given several runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dust.cli.options import add_method_option, trust_named_methods


def cmd_report(args: argparse.Namespace) -> int:
    from dust.report import write_report

    trust_named_methods(args)
    if args.out:
        out = Path(args.out)
    else:  # one run: beside its results; a comparison belongs to no single run
        out = Path(args.run_dirs[0]) / "report.html" if len(args.run_dirs) == 1 else Path("report.html")
    print(f"wrote {write_report([Path(d) for d in args.run_dirs], out, args.slices)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write an HTML report (curves, metrics, overlays) of one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by dust train")
    p.add_argument("--out", help="HTML file (default: RUN_DIR/report.html for one run, ./report.html for several)")
    p.add_argument("--slices", type=int, default=3, help="slices shown for the best and the worst case")
    add_method_option(p)
    p.set_defaults(func=cmd_report)
