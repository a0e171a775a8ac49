"""``dust`` command line: argument parsing only; the work is done by ``dust.workflows``."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from dust.cli import benchmark, check_data, export, export_model, predict, prepare, rank, report
from dust.cli.options import add_method_option, trust_named_methods
from dust.config import ConfigError, format_run_dir, load_config
from dust.data.types import DataError
from dust.engine.errors import NonFiniteLossError, RunDirectoryBusyError, RunFailedError
from dust.methods import name_user_method, refuse_unnamed_method
from dust.storage import CheckpointError, DiskFullError, read_json

USER_ERRORS = (
    ConfigError, DataError, CheckpointError, NonFiniteLossError, RunFailedError, RunDirectoryBusyError, FileExistsError,
    FileNotFoundError, DiskFullError,
    ValueError,
    OSError,  # the machine's answer about a file (read-only, a folder where a file should be...): it names the file
)


def describe(err: BaseException) -> str:
    """An error as the one line the user reads: an ``OSError`` as ``FILE: reason`` (not ``[Errno 13] ...``)."""
    if isinstance(err, OSError) and err.strerror:
        names = [str(n) for n in (err.filename, err.filename2) if n is not None]
        return f"{' -> '.join(names)}: {err.strerror}" if names else str(err.strerror)
    return (str(err).strip().splitlines() or [type(err).__name__])[0] if isinstance(err, OSError) else str(err)


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed, recorded next to every benchmark number."""
    return "dust " + " ".join(shlex.quote(a) for a in args.argv)


def add_device_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", metavar="DEVICE",
                   help=f"where {what} runs: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N; a device "
                        "that is not here is refused")


def cmd_train(args: argparse.Namespace) -> int:
    from dust.engine import distributed
    from dust.methods.loading import full_config, pick_device, with_keys_of_older_runs
    from dust.results import update_results
    from dust.workflows import train

    if args.device:
        args.set = [*args.set, f"device={args.device}"]
    if args.resume:
        run_dir = Path(args.resume)
        stored = run_dir / "config.yaml"
        if not stored.is_file():
            raise ConfigError(f"{run_dir}: no config.yaml; is this a dust run directory?")
        cfg = load_config(stored, args.set)
        cfg["run_dir"] = str(run_dir)
        # the run directory's config.yaml may be someone else's: its own method class is imported only when this
        # command names it again
        name_user_method(load_config(None, args.set).get("method", ""))
        refuse_unnamed_method(str(cfg.get("method", "supervised")), stored,
                              f"--set method={cfg.get('method', 'supervised')}")
        cfg = with_keys_of_older_runs(cfg)  # a run begun before a default changed continues as it began
    else:
        if not args.config:
            raise ConfigError("dust train needs --config FILE (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.set)
    pick_device(cfg.get("device", "auto"))  # an absent device is one line here, before any process or run folder
    if args.nproc > 1 and "RANK" not in os.environ:  # the launcher: start the ranks, each runs this command
        return distributed.launch(args.nproc, args.argv)
    cfg = full_config(cfg)
    try:
        records = train(cfg, resume=bool(args.resume), command=_command_line(args), overwrite=args.overwrite)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; continue from the last checkpoint with `dust train --resume "
                                f"{format_run_dir(cfg)}`") from None
    if not distributed.ranks_from_env().is_main:
        return 0  # rank 0 records and prints
    if args.record:
        update_results(Path(args.record), records)
    for r in records:
        print(f"{r['checkpoint']:>4}: Dice {r['dice']:.2f}  Jaccard {r['jaccard']:.2f}  HD95 {r['hd95_vox']:.2f}  "
              f"ASD {r['asd_vox']:.2f}  " + "  ".join(f"{c} {v['dice']:.2f}" for c, v in r["per_class"].items()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dust.engine.evaluation import evaluate_checkpoint, evaluation_folder

    trust_named_methods(args)
    if args.pred or args.ref:  # folders of NIfTIs, as nnU-Net's evaluate-folder
        from dust.predict import evaluate_folders

        if not (args.pred and args.ref) or args.checkpoint:
            raise ConfigError("dust evaluate: give --pred DIR and --ref DIR together, without --checkpoint")
        summary = evaluate_folders(Path(args.pred), Path(args.ref), Path(args.out) if args.out else None,
                                   args.class_names, args.empty_mask_policy or "dust")
        print(json.dumps(summary["overall"], indent=1))
        return 0
    if not args.checkpoint:
        raise ConfigError("dust evaluate needs --checkpoint CKPT (or --pred DIR --ref DIR)")
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else evaluation_folder(checkpoint)
    summary = evaluate_checkpoint(checkpoint, args.split, args.data_dir, out,
                                  empty_mask_policy=args.empty_mask_policy, device=args.device)
    print(json.dumps(summary["overall"], indent=1))
    print(f"dust evaluate: per-case metrics in {out / f'metrics_{args.split}_{checkpoint.stem}.csv'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dust.methods.loading import full_config
    from dust.workflows import chance_dice, train

    device = [f"device={args.device}"] if args.device else []
    cfg = load_config(args.config, [f"run_dir={args.out}", *args.set, *device])
    if args.iterations is not None:  # the short form: a run of N iterations, validated at its end (at least)
        cfg["iterations"] = args.iterations
        cfg["val_every"] = min(int(cfg.get("val_every", args.iterations)), args.iterations)
    cfg = full_config(cfg)
    print(f"dust demo: {cfg['method']} on the synthetic cardiac phantom ({cfg['data_dir']}), "
          f"{cfg['iterations']} iterations; run directory {args.out}")
    records = train(cfg, resume=False, command=_command_line(args))
    last = records[0]
    chance = chance_dice(cfg)
    print("\nvalidation Dice (%) at the last checkpoint, per class (chance: a uniformly random label per voxel):")
    for name, vals in last["per_class"].items():
        print(f"  {name:>4}: {vals['dice']:6.2f}   (chance {chance['per_class'][name]['dice']['mean'] * 100:5.2f})")
    print(f"  mean: {last['dice']:6.2f}   (chance {chance['overall']['dice']['mean'] * 100:5.2f}); "
          f"HD95 {last['hd95_vox']:.2f} vox, ASD {last['asd_vox']:.2f} vox")
    out = Path(args.out)
    for name, what in (("report.html", "the experiment report (open it in a browser)"),
                       ("sample_uncertainty.csv", "every unlabelled slice ranked by sample uncertainty (Eq. 1)"),
                       ("figures", "pseudo-labels and pixel uncertainty per stage")):
        if (out / name).exists():
            print(f"  {out / name}: {what}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from dust.benchmark import get_protocol
    from dust.results import identity_of, replace_readme_table, update_results

    protocol = get_protocol(args.protocol, args.json, args.markdown, args.title)
    results_json = protocol.results_json

    trust_named_methods(args)
    for run_dir in args.add:
        run_records = Path(run_dir) / "results.json"
        if not run_records.is_file():
            raise FileNotFoundError(f"{run_records}: no results.json; has this run finished?")
        records = read_json(run_records)
        cfg = load_config(Path(run_dir) / "config.yaml")
        method = str(cfg.get("method", "supervised"))
        refuse_unnamed_method(method, Path(run_dir) / "config.yaml", f"--method {method}")
        for record in records:  # a run recorded by an older dust lacks newer identity keys: take them from its config
            for key, value in identity_of(cfg, record["checkpoint"]).items():
                record.setdefault(key, value)
        update_results(results_json, records)
    records = read_json(results_json)
    protocol.write_results_page(records)
    print(f"wrote {protocol.results_markdown} from {len(records)} records")
    if args.readme:
        if protocol.comparison is None:
            raise ConfigError(f"protocol {protocol.name!r} has no side-by-side comparison for a README table")
        page = os.path.relpath(protocol.results_markdown, Path(args.readme).parent)
        replace_readme_table(Path(args.readme), records, protocol.name, protocol.comparison, page)
        print(f"updated the results table in {args.readme}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dust", description="Semi-supervised medical image segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method from a YAML config, then evaluate last/best on val")
    p.add_argument("--config", help="YAML config file, or the name of one shipped with dust (e.g. la/mcf: "
                                    "configs/la/mcf.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its newest checkpoint")
    p.add_argument("--record", metavar="JSON", help="append the last/best records to a results JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="start again from iteration 0 in a run directory that holds a trained model, removing that "
                        "run's checkpoints (without it, such a run directory is refused)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel over N processes on this machine (as torchrun; see docs/distributed.md)")
    add_device_argument(p, "training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a split's volumes, or folders of NIfTI labels")
    p.add_argument("--checkpoint")
    p.add_argument("--split", default="val", help="list name: val, test, ... (<split>.list in the dataset)")
    p.add_argument("--data-dir", help="dataset folder (default: the checkpoint's config)")
    p.add_argument("--out", help="folder for metrics CSV/JSON (default: a run's checkpoint: its run directory; "
                                 "another checkpoint: runs/evaluate/<name>/; --pred/--ref: the --pred folder)")
    p.add_argument("--pred", metavar="DIR", help="predicted label NIfTIs, scored against --ref files of the same name")
    p.add_argument("--ref", metavar="DIR", help="reference label NIfTIs (their header spacing gives mm distances)")
    p.add_argument("--class-names", nargs="+", metavar="NAME",
                   help="with --pred/--ref: names of labels 0..K-1, background first (default: the labels found)")
    p.add_argument("--empty-mask-policy", choices=["dust", "nnunet", "exclude"],
                   help="how a class empty in prediction or reference scores (docs/metrics.md; default: the run's, "
                        "or dust)")
    add_method_option(p)
    add_device_argument(p, "the checkpoint")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="generate the phantom, train DUST, evaluate, print per-class Dice")
    p.add_argument("--config", default="phantom/dust",
                   help="default: phantom/dust (DUST on the phantom, a config shipped with dust); phantom/supervised "
                        "for the supervised baseline")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--iterations", type=int, metavar="N", help="train N iterations instead of the config's (e.g. 20: "
                                                               "a check that everything runs, not a model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_device_argument(p, "the demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("results", help="regenerate the Markdown results table from a results JSON")
    p.add_argument("--protocol", default="acdc-cpu",
                   help="whose results: gives the defaults below and the methods-side-by-side table")
    p.add_argument("--json", help="results JSON (default: the protocol's, docs/results/acdc_cpu.json)")
    p.add_argument("--markdown", help="Markdown to write (default: the protocol's, docs/results/README.md)")
    p.add_argument("--title", help="page title (default: the protocol's)")
    p.add_argument("--add", nargs="*", default=[], metavar="RUN_DIR",
                   help="first merge these finished runs' results.json (each keeps the command that produced it)")
    p.add_argument("--readme", metavar="FILE",
                   help="also rewrite the short table between the results-table markers in FILE (e.g. README.md)")
    add_method_option(p)
    p.set_defaults(func=cmd_results)

    check_data.add_parser(sub)
    prepare.add_parser(sub)
    predict.add_parser(sub)
    export.add_parser(sub)
    export_model.add_parser(sub)
    rank.add_parser(sub)
    report.add_parser(sub)
    benchmark.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if os.environ.get("DUST_DEBUG"):
            raise
        print(f"dust {args.command}: error: {describe(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: every file dust writes is whole (atomic), so one line is enough
        if os.environ.get("DUST_DEBUG"):
            raise
        print(f"dust {args.command}: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
