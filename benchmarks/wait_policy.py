"""Training speed with OpenMP's wait policies, on an idle machine and with one other busy process: the measurement
behind dust's default (``GOMP_SPINCOUNT=10000``, set in ``dust/__init__.py`` unless the user set a policy).

Each variant runs ``benchmarks/throughput.py`` (the engine's real training step, ACDC-shaped: 128x128, labelled
batch 8 + unlabelled batch 8) in a fresh process with its environment, so the OpenMP runtime reads the policy when
torch loads it. "loaded" starts one single-thread process doing matrix products (what another training or a
browser tab is to a laptop) for the duration of the variant. Variants:

- ``libgomp default``: ``GOMP_SPINCOUNT=300000``, libgomp's built-in spin count when no policy is set (what torch
  did before dust set one; dust leaves a user's ``GOMP_SPINCOUNT`` alone);
- ``spin 10000``: ``GOMP_SPINCOUNT=10000``, a spin 30 times shorter than libgomp's, then sleep (dust's default);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once);
- ``active``: ``OMP_WAIT_POLICY=ACTIVE`` (spin without a limit).

    python benchmarks/wait_policy.py --out docs/results/speed/wait_policy.json

Writes the JSON and a Markdown table beside it (``.md``). Run it with nothing else running: the "idle" rows need
idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {
    "libgomp default": {"GOMP_SPINCOUNT": "300000"},
    "spin 10000": {"GOMP_SPINCOUNT": "10000"},  # a short spin (~tens of microseconds) before sleeping
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
}
LOAD = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\n"
        "while True:\n    a = torch.tanh(a @ a)\n")


def run_variant(threads: int, policy: str, loaded: bool, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(POLICIES[policy])
    load = subprocess.Popen([sys.executable, "-c", LOAD], env=env) if loaded else None
    try:
        if load is not None:
            time.sleep(2.0)  # the load is busy before the timing starts
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "t.json"
            started = time.perf_counter()
            subprocess.run([sys.executable, str(Path(__file__).with_name("throughput.py")), "--methods", args.method,
                            "--iterations", str(args.iterations), "--warmup", str(args.warmup),
                            "--threads", str(threads), "--precision", args.precision, "--out", str(out)],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - started
            row = json.loads(out.read_text())["rows"][0]
    finally:
        if load is not None:
            load.kill()
            load.wait()
    result = {"threads": threads, "policy": policy, "machine_state": "loaded" if loaded else "idle",
              "seconds_per_iteration": row["seconds_per_iteration"], "mean_seconds": row["mean_seconds"],
              "wall_seconds_with_startup": round(wall, 1)}
    print(f"threads {threads}  {policy:16s} {result['machine_state']:6s} "
          f"{row['seconds_per_iteration']:.3f} s/it (median), {wall:.0f} s wall", flush=True)
    return result


def markdown(result: dict) -> str:
    lines = [f"# OpenMP wait policy: {result['method']} training speed, idle and loaded", "",
             f"`{result['command']}` on {result['cpu_count']} cores ({result['machine']}), torch {result['torch']}, "
             f"{result['precision']}; loaded = one other single-thread busy process.", "",
             "| threads | policy | idle s/it | loaded s/it | loaded / idle |", "|---|---|---|---|---|"]
    by_key = {(r["threads"], r["policy"], r["machine_state"]): r["seconds_per_iteration"] for r in result["rows"]}
    for threads, policy in dict.fromkeys((r["threads"], r["policy"]) for r in result["rows"]):
        idle, loaded = by_key.get((threads, policy, "idle")), by_key.get((threads, policy, "loaded"))
        ratio = f"{loaded / idle:.2f}" if idle and loaded else ""
        lines.append(f"| {threads} | {policy} | {idle} | {loaded} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="mean_teacher")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="fp32")
    parser.add_argument("--out", default="docs/results/speed/wait_policy.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    variants = [(cores, policy) for policy in POLICIES] + [(1, "passive")]
    rows = [run_variant(threads, policy, loaded, args) for loaded in (False, True) for threads, policy in variants]
    import torch  # only for the version: the variants ran in their own processes

    result = {"command": "python " + " ".join(sys.argv), "method": args.method, "precision": args.precision,
              "cpu_count": cores, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
