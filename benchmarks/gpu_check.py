"""Proof of the CUDA path on a GPU machine, one script (at most 8 minutes on one GPU); JSON under docs/results/speed/.

1. the test suite's CUDA-marked tests (``pytest -m cuda``: training in bf16 on the GPU, GPU checkpoints loading on
   the CPU, device names);
2. 20 iterations of every 3D method at the LA full protocol (``configs/la_full/METHOD.yaml``: full resolution, crops
   80x112x112, batch 2 + 2) in bf16 autocast, through the engine (``Trainer.fit``): seconds per iteration (median of
   the iteration times, so stage starts and the closing validation do not count) and peak GPU memory;
3. one LA-sized volume through the full protocol's sliding window (stride 4x18x18, constant blending): seconds and
   peak memory;
4. a 1-GPU ``torchrun`` (``torch.distributed.run --standalone --nproc-per-node 1 -m dust train``) of a few
   iterations, as a user's multi-GPU job starts.

Data: ``$DUST_DATA/LA`` when it is there, else a generated phantom of LA's size in the LA layout (the JSON says
which; speed does not depend on the content). On a GPU machine::

    python benchmarks/gpu_check.py                      # writes docs/results/speed/gpu_check.json

``--device cpu --quick`` runs every part end to end on a CPU at phantom sizes (small patch, a few iterations; the
CUDA tests skip): what CI checks, so the script is known to run before a GPU is at hand. Exit status 1 when a part
failed (the JSON says which).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
FULL = REPO / "configs" / "la_full"
LA_SHAPE = (194, 143, 88)  # an LA volume (X, Y, Z), 0.625 mm
BUDGET_S = 8 * 60


def three_d_methods() -> list[str]:
    """Every 3D method: the ones with a full-protocol config (tests/test_gpu_check.py keeps it equal to configs/la)."""
    return sorted(p.stem for p in FULL.glob("*.yaml"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def data_root(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    """The LA data, or a phantom in its layout (LA-sized, or small for --quick)."""
    from dust.data.phantom3d import generate_la_phantom

    real = Path(os.environ.get("DUST_DATA", REPO.parent / "shared" / "data")) / "LA"
    if not args.quick and (real / "train.list").is_file():
        return real, f"LA ({real})"
    shape = (40, 36, 24) if args.quick else LA_SHAPE
    root = generate_la_phantom(scratch / "la_phantom", seed=0, n_cases=14, shape=shape)
    return root, f"phantom, {14} volumes of {list(shape)} (X, Y, Z)"


def overrides(args: argparse.Namespace, root: Path, run_dir: Path, iterations: int) -> list[str]:
    """The full protocol as written, on this data and device, for ``iterations`` (--quick: a phantom-sized patch)."""
    sets = [f"data_dir={root}", f"device={args.device}", f"iterations={iterations}", f"val_every={iterations}",
            "labeled_patients=8", "holdout_cases=2", "tensorboard=false", "progress=false", f"run_dir={run_dir}",
            f"bf16={'true' if args.device.startswith('cuda') else 'auto'}"]
    if args.quick:
        sets += ["patch_size=[16,32,32]", "channels=[4,8,16,32,64]", "threads=1"]
    return sets


def time_method(name: str, args: argparse.Namespace, root: Path, data: Any, scratch: Path) -> dict[str, Any]:
    """``iterations`` iterations of ``name`` through the engine; the median time of one iteration."""
    from dust.config import load_config
    from dust.engine.trainer import Trainer
    from dust.methods.loading import full_config

    cfg = full_config(load_config(FULL / f"{name}.yaml", overrides(args, root, scratch / name, args.iterations)))
    trainer = Trainer(cfg, data=data)
    device = trainer.device
    stamps: list[float] = []

    def stamp(iteration: int) -> None:  # the end of each iteration, the GPU's work included
        _sync(device)
        stamps.append(time.perf_counter())

    trainer.step_end_hooks.append(stamp)
    _reset_peak(device)
    _sync(device)
    stamps.append(time.perf_counter())
    started = time.perf_counter()
    try:
        trainer.fit()
    finally:
        trainer.release_run_directory()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"s_per_it": round(statistics.median(steps), 4), "iterations": len(steps),
            "slowest_iteration_s": round(max(steps), 3), "seconds_with_stage_starts_and_validation":
            round(time.perf_counter() - started, 2), "peak_memory_gib": _peak_gib(device),
            "bf16": bool(cfg["bf16"]), "patch_size": cfg["patch_size"], "batch": [cfg["batch_size"],
                                                                                  cfg["unlabeled_batch_size"]]}


def sliding_window(args: argparse.Namespace, root: Path, data: Any) -> dict[str, Any]:
    """One validation volume through the full protocol's sliding window (the supervised VNet, untrained)."""
    from dust.config import load_config
    from dust.inference import Predictor
    from dust.methods.loading import build_method, full_config, pick_device

    device = pick_device(args.device)
    cfg = full_config(load_config(FULL / "supervised.yaml", overrides(args, root, Path("unused"), 1)))
    method = build_method(cfg, device)
    for net in method.networks.values():
        net.eval()
    volume = data.val[0]
    predictor = Predictor.from_config(cfg, device)
    _reset_peak(device)
    predictor.case(lambda x: (method.predict(x),), volume.image[:, :8] if args.quick else volume.image)  # warm-up
    _reset_peak(device)
    _sync(device)
    started = time.perf_counter()
    probs = predictor.case(lambda x: (method.predict(x),), volume.image)[0]
    _sync(device)
    return {"volume_SHW": list(volume.image.shape[1:]), "window": cfg["patch_size"], "stride": cfg["inference_stride"],
            "blend": cfg["inference_blend"], "bf16": bool(cfg["bf16"]),
            "seconds": round(time.perf_counter() - started, 3), "peak_memory_gib": _peak_gib(device),
            "probabilities_sum_to_1": bool(torch.allclose(probs.sum(0), torch.ones(()), atol=1e-3))}


def torchrun(args: argparse.Namespace, root: Path, scratch: Path) -> dict[str, Any]:
    """A 1-GPU job through torchrun's launcher, as `torchrun --nproc-per-node 1 -m dust train` starts it."""
    iterations = 2 if args.quick else 10
    sets = overrides(args, root, scratch / "torchrun", iterations)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "dust",
            "train", "--config", str(FULL / "supervised.yaml"), *[a for kv in sets for a in ("--set", kv)]]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = {"command": " ".join(argv[1:]), "returncode": done.returncode,
              "seconds": round(time.perf_counter() - started, 2),
              "results_json": (scratch / "torchrun" / "results.json").is_file()}
    if done.returncode != 0:
        result["stderr_tail"] = done.stderr[-2000:]
    return result


def cuda_tests(device: torch.device) -> dict[str, Any]:
    """The suite's CUDA-marked tests; counts from pytest's closing line. On a GPU they must run (and pass); on a CPU
    they skip."""
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(REPO / "tests")]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)}
    ok = done.returncode == 0 and (device.type != "cuda" or counts.get("passed", 0) > 0)
    result = {"returncode": done.returncode, "ok": ok, "summary": summary, **counts,
              "seconds": round(time.perf_counter() - started, 2)}
    if not ok:
        result["output_tail"] = done.stdout[-3000:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: what CI runs)")
    parser.add_argument("--quick", action="store_true", help="phantom sizes and a few iterations: runs in CI time")
    parser.add_argument("--iterations", type=int, help="per method (default: 20; --quick: 8, the fewest that give "
                                                       "DUST's pre-training three distinct snapshots)")
    parser.add_argument("--methods", nargs="+", help="default: every 3D method (configs/la_full)")
    parser.add_argument("--out", type=Path, help="JSON to write (default: docs/results/speed/gpu_check.json; "
                                                 "--quick: gpu_check_quick.json in a temporary folder)")
    args = parser.parse_args(argv)
    args.iterations = args.iterations or (8 if args.quick else 20)
    from dust.config import load_config
    from dust.data import load_training_data
    from dust.methods.loading import full_config, pick_device

    device = pick_device(args.device)  # refused in one line when the device is not here
    started = time.perf_counter()
    report: dict[str, Any] = {
        "what": "benchmarks/gpu_check.py: the CUDA path (CUDA-marked tests, every 3D method at the LA full protocol "
                "in bf16, the full protocol's sliding window, a 1-GPU torchrun)",
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "quick": args.quick,
    }
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dust_gpu_check_") as tmp:
        scratch = Path(tmp)
        print("gpu_check: CUDA-marked tests ...", flush=True)
        report["cuda_tests"] = cuda_tests(device)
        if not report["cuda_tests"]["ok"]:
            failures.append("cuda_tests")
        root, report["data"] = data_root(args, scratch)
        cfg = full_config(load_config(FULL / "supervised.yaml", overrides(args, root, scratch / "data", 1)))
        data = load_training_data(cfg, root)
        data.val = data.val[:1]  # the closing validation of each timing run: one volume
        report["methods"] = {}
        for name in args.methods or three_d_methods():
            print(f"gpu_check: {name}, {args.iterations} iterations ...", flush=True)
            try:
                report["methods"][name] = time_method(name, args, root, data, scratch)
            except Exception as err:  # recorded, and the other parts still run
                report["methods"][name] = {"error": f"{type(err).__name__}: {err}"[:500]}
                failures.append(name)
            print(f"  {report['methods'][name]}", flush=True)
        print("gpu_check: sliding window ...", flush=True)
        try:
            report["sliding_window"] = sliding_window(args, root, data)
        except Exception as err:
            report["sliding_window"] = {"error": f"{type(err).__name__}: {err}"[:500]}
            failures.append("sliding_window")
        print("gpu_check: torchrun ...", flush=True)
        report["torchrun"] = torchrun(args, root, scratch)
        if report["torchrun"]["returncode"] != 0:
            failures.append("torchrun")
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["within_budget"] = report["seconds"] <= BUDGET_S
    report["failed"] = failures
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_check_quick.json" if args.quick
                       else REPO / "docs" / "results" / "speed" / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_check: {report['seconds']} s ({'within' if report['within_budget'] else 'OVER'} the "
          f"{BUDGET_S} s budget); failed: {failures or 'none'}; {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
