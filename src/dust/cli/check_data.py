"""``dust check-data --config F [--set k=v]``: list every problem of a config's dataset, exit 2 if there is one."""

from __future__ import annotations

import argparse
import sys


def cmd_check_data(args: argparse.Namespace) -> int:
    from dust.config import load_config
    from dust.data import check_data
    from dust.methods.loading import full_config

    cfg = full_config(load_config(args.config, args.set))
    problems = check_data(cfg)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"dust check-data: {len(problems)} problem(s) in {cfg['data_dir']}", file=sys.stderr)
        return 2
    print(f"dust check-data: {cfg['data_dir']} is usable with this config")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-data", help="check a config's dataset (files, shapes, labels, splits) before training")
    p.add_argument("--config", required=True, help="YAML config file, or a shipped config's name (e.g. la/mcf)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=cmd_check_data)
