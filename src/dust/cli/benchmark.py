"""``dust benchmark``: train every (method, labelled patients, seed) of a protocol, record it, regenerate the table."""

from __future__ import annotations

import argparse
import json

from dust.config import ConfigError


def cmd_benchmark(args: argparse.Namespace) -> int:
    from dust.benchmark import default_threads, get_protocol, plan_benchmark, run_benchmark
    from dust.engine.trainer import setup_logging

    protocol = get_protocol(args.protocol, args.json, args.markdown)
    results_json = protocol.results_json
    results = json.loads(results_json.read_text()) if results_json.is_file() else []
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: give at least 1")
    threads = args.threads or (default_threads(args.jobs) if args.jobs > 1 else None)
    jobs = plan_benchmark(protocol, args.methods, args.labeled_patients, args.seeds, results, threads,
                          settings=args.settings)
    runs = [j for j in jobs if args.force or not j.done]
    for job in jobs:
        state = "run " if job in runs else "skip"
        reason = f"  (in {results_json})" if job.done else ""
        print(f"{state}  {job.method} {job.labeled_patients}p seed {job.seed} -> {job.run_dir}{reason}\n"
              f"      {job.command}")
    print(f"{len(runs)} to run, {len(jobs) - len(runs)} skipped")
    if args.dry_run:
        return 0
    setup_logging(None)  # progress lines on the console (each run adds its own train.log)
    new = run_benchmark(jobs, protocol, args.force, parallel=args.jobs)
    print(f"{len(new)} records added to {results_json}; table: {protocol.results_markdown}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="train every method x labelled patients x seed of a protocol and record it")
    p.add_argument("--protocol", default="acdc-cpu",
                   help="acdc-cpu: configs/acdc/<method>.yaml, records in docs/results/acdc_cpu.json")
    p.add_argument("--methods", nargs="+", required=True, metavar="METHOD",
                   help="methods with a config in the protocol's folder (e.g. supervised dust)")
    p.add_argument("--labeled-patients", nargs="+", type=int, default=[7, 14], metavar="N",
                   help="labelled-patient budgets (default: 7 14)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1337], metavar="SEED", help="seeds (default: 1337)")
    p.add_argument("--json", help="results JSON (default: the protocol's)")
    p.add_argument("--markdown", help="Markdown table regenerated after each run (default: the protocol's)")
    p.add_argument("--force", action="store_true",
                   help="also run combinations already in the JSON (a run directory with checkpoints is resumed, "
                        "so a finished run is re-evaluated; delete it to train again)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N combinations side by side, each in its own process (CPU machines; default 1)")
    p.add_argument("--threads", type=int, metavar="T",
                   help="threads per run, written into each command (default with --jobs N: cores / N; "
                        "otherwise the config's)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="benchmark a variant of the protocol: the override goes into every command (repeatable; "
                        "runs go to the protocol's run directories with the overrides appended)")
    p.add_argument("--dry-run", action="store_true", help="print which combinations would run or be skipped")
    p.set_defaults(func=cmd_benchmark)
