"""Seconds per training iteration of registered methods, through the real engine (``Trainer.fit``).

The CPU budget protocol's shape: 128x128 patches, labelled batch 8 (+ unlabelled batch 8), U-Net 16-256,
channels_last, threads = core count, on a small synthetic phantom; bf16 autocast where the CPU computes bf16
natively (``--precision auto``, what ``dust train`` does by default). Each method trains ``warmup + iterations``
iterations of its last stage (for DUST and the other staged methods the short stages before it are run first and
not timed: the semi-supervised step is what a run spends its time on); an iteration is timed from one step end
(``Trainer.step_end_hooks``) to the next, so it includes batch sampling and augmentation, the forward/backward, the
optimiser step, the NaN check and logging. Reported: the median (robust to a background hiccup) and the mean. Run on an
otherwise idle machine:

    python benchmarks/throughput.py --iterations 30 --warmup 5

writes docs/results/speed/throughput.json with the machine's core count and the torch version. Methods that are not
registered are skipped with a note. ``--profile DIR`` also writes a cProfile of each method's timed iterations.

``--processes N`` runs N copies side by side (each with ``--threads``; they time the methods in the same order,
so the copies time the same method at about the same moment) and adds, per method, the iterations per second of
all copies together: what ``dust benchmark --jobs N`` gains over one run at a time with all cores, e.g.

    python benchmarks/throughput.py --processes 2 --threads 1 --out docs/results/throughput_2x1.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dust.config import resolve_bf16
from dust.data.phantom import generate_phantom
from dust.engine.trainer import Trainer
from dust.methods import available_methods
from dust.methods.loading import full_config

TARGETS = "MT <= 0.175 s/iteration, DUST <= 1.3 x MT (2-core CPU)"


def time_method(method: str, data_dir: Path, run_dir: Path, iterations: int, warmup: int, threads: int,
                bf16: bool, profile_to: Path | None = None) -> dict:
    timed = warmup + iterations + 1  # `iterations` intervals between the step-end stamps after the warm-up
    # staged methods: 3 pre-training iterations (K = 3 snapshots), 1 of stage 1, then the timed last stage
    staged_total = timed + 4
    staged = {"pretrain_fraction": 3 / staged_total, "stage1_fraction": 1 / staged_total}
    cfg = {
        "method": method, "data_dir": str(data_dir), "labeled_patients": 2, "patch_size": [128, 128],
        "batch_size": 8, "unlabeled_batch_size": 8, "bf16": bf16, "channels_last": True, "threads": threads,
        "tensorboard": False, "progress": False, "run_dir": str(run_dir), "seed": 0,
    }
    resolved = full_config(cfg)
    if "pretrain_fraction" in resolved:
        resolved = full_config({**cfg, **staged})
    resolved["iterations"] = resolved["val_every"] = staged_total if "pretrain_fraction" in resolved else timed
    trainer = Trainer(resolved)
    last_stage = trainer.spans[-1]
    stamps: list[float] = []
    profiler = cProfile.Profile() if profile_to else None

    def stamp(iteration: int) -> None:
        if iteration >= last_stage.begin:
            stamps.append(time.perf_counter())
            if profiler is not None and len(stamps) == warmup + 1:
                profiler.enable()
            if profiler is not None and len(stamps) == timed:
                profiler.disable()  # before the final validation and checkpoint

    trainer.step_end_hooks.append(stamp)
    trainer.fit()
    if profiler is not None:
        profiler.dump_stats(str(profile_to))
    steps = [b - a for a, b in zip(stamps[warmup:-1], stamps[warmup + 1 :], strict=True)]
    return {
        "method": method, "stage": last_stage.stage.name, "iterations_timed": len(steps),
        "seconds_per_iteration": round(statistics.median(steps), 4), "mean_seconds": round(statistics.mean(steps), 4),
    }


def side_by_side(args: argparse.Namespace) -> dict:
    """``args.processes`` copies of this script at once; their rows, and per method the summed throughput."""
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"copy{i}.json" for i in range(args.processes)]
        argv = [sys.executable, __file__, "--methods", *args.methods, "--iterations", str(args.iterations),
                "--warmup", str(args.warmup), "--threads", str(args.threads), "--precision", args.precision]
        copies = [subprocess.Popen([*argv, "--out", str(out)], stdout=subprocess.DEVNULL) for out in outs]
        if any(c.wait() != 0 for c in copies):
            raise SystemExit("a copy failed; run it alone to see why")
        results = [json.loads(out.read_text()) for out in outs]
    rows = [{**row, "process": i} for i, r in enumerate(results) for row in r["rows"]]
    together = {}
    for method in {row["method"] for row in rows}:
        together[method] = round(sum(1 / row["seconds_per_iteration"] for row in rows if row["method"] == method), 3)
        print(f"{method:14s} {together[method]:.3f} iterations/s over {args.processes} processes "
              f"x {args.threads} thread(s)")
    return {"rows": rows, "iterations_per_second_all_processes": together, "skipped": results[0]["skipped"]}


def time_here(args: argparse.Namespace, bf16: bool) -> dict:
    registered = set(available_methods())
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_phantom(Path(tmp) / "phantom", n_train_patients=6, n_val_patients=1, n_test_patients=1,
                                slices_per_volume=(6, 8), size_range=(128, 160))
        for method in args.methods:
            if method not in registered:
                skipped[method] = "not registered in this dust"
                print(f"{method:14s} skipped: not registered (known: {', '.join(sorted(registered))})")
                continue
            prof = Path(args.profile) / f"{method}.prof" if args.profile else None
            if prof is not None:
                prof.parent.mkdir(parents=True, exist_ok=True)
            row = time_method(method, data, Path(tmp) / f"run_{method}", args.iterations, args.warmup,
                              args.threads, bf16, prof)
            rows.append(row)
            print(f"{method:14s} {row['seconds_per_iteration']:.3f} s/iteration (median of {row['iterations_timed']}"
                  f", mean {row['mean_seconds']:.3f}, stage {row['stage']})")
    seconds = {r["method"]: r["seconds_per_iteration"] for r in rows}
    ratio = round(seconds["dust"] / seconds["mean_teacher"], 3) if {"dust", "mean_teacher"} <= seconds.keys() else None
    if ratio is not None:
        print(f"dust / mean_teacher = {ratio:.2f} (targets: {TARGETS})")
    return {"rows": rows, "dust_over_mean_teacher": ratio, "skipped": skipped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["supervised", "mean_teacher", "dust"])
    parser.add_argument("--iterations", type=int, default=30, help="timed iterations per method")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast only where the CPU computes bf16 natively (as dust train)")
    parser.add_argument("--processes", type=int, default=1, help="copies timed side by side")
    parser.add_argument("--out", default="docs/results/speed/throughput.json")
    parser.add_argument("--profile", metavar="DIR", help="write <DIR>/<method>.prof (cProfile of the timed part)")
    args = parser.parse_args()

    bf16 = resolve_bf16("auto", "cpu") if args.precision == "auto" else args.precision == "bf16"
    timed = side_by_side(args) if args.processes > 1 else time_here(args, bf16)
    result = {
        "command": "python " + " ".join(sys.argv),
        "cpu_count": os.cpu_count(), "threads": args.threads, "processes": args.processes,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "native_bf16": resolve_bf16("auto", "cpu"),
        "setup": "128x128, labelled batch 8 + unlabelled batch 8, U-Net 16-256, channels_last, "
                 + ("bf16 autocast" if bf16 else "fp32"),
        "targets": TARGETS, **timed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
