"""The benchmark: every (method, labelled patients, seed) of a protocol trained by the ``train`` workflow.

Each combination is exactly one ``dust train --config <protocol configs>/<method>.yaml --set labeled_patients=N
--set seed=S --record <json>`` (that command is what its records carry, so anyone can re-run one row).
Combinations whose records are already in the results JSON are skipped, so an interrupted benchmark continues
where it stopped; a run directory that already holds checkpoints is resumed rather than refused.

With ``jobs > 1`` several combinations train side by side, each in its own ``dust train`` process with
``threads`` threads (the command then carries ``--set threads=T``: a different thread count changes the
floating-point sums, so it is part of what reproduces a number). On a small CPU this finishes a table sooner
than one run after another with all cores each: a U-Net step of this size does not use two cores fully
(``benchmarks/throughput.py --processes``). This process alone writes the results JSON and the table.

A variant of the protocol (``settings``: extra ``key=value`` overrides, e.g. ``batchnorm_recalibration_batches=50``)
is benchmarked the same way: the overrides go into every command, the variant's records are told apart from the
plain protocol's by their setting, and unless the overrides name a ``run_dir`` the runs go to the protocol's run
directories with the overrides appended, so a variant never resumes (or overwrites) a plain run's checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

from dust.config import ConfigError, find_config, format_run_dir, load_config, shipped_configs
from dust.engine.checkpoint import iteration_checkpoints
from dust.engine.errors import RunFailedError
from dust.methods.loading import full_config
from dust.results import (
    Comparison,
    identity_of,
    pin_precision,
    precision_of,
    record_key,
    results_markdown,
    update_results,
)
from dust.workflows import train

log = logging.getLogger("dust")


@dataclass(frozen=True)
class Protocol:
    """Where a protocol's configs and results live (paths relative to the repository root)."""

    name: str
    config_dir: Path
    results_json: Path
    results_markdown: Path
    title: str
    comparison: Comparison | None = None  # the side-by-side table heading the Markdown

    def write_results_page(self, records: list[dict]) -> None:
        """Regenerate the protocol's Markdown page from ``records``."""
        self.results_markdown.parent.mkdir(parents=True, exist_ok=True)
        self.results_markdown.write_text(results_markdown(records, self.title, self.comparison))


# Every method is compared with BatchNorm recalibration: the semi-supervised methods train BatchNorm on batches
# mixing labelled and unlabelled slices and on perturbed inputs, and evaluating with those running statistics
# costs some of them most of their Dice (docs/results/analysis.md, "BatchNorm statistics"); re-estimating them on clean
# labelled batches before each evaluation measures what the weights learned. It changes nothing in training.
_ACDC_COMPARISON = Comparison(
    methods=("supervised", "mean_teacher", "ua_mt", "dct", "urpc", "st_plus_plus", "cps", "self_training", "st_ss",
             "dust"),
    labeled_patients=(7, 14),
    setting={"iterations": 4000, "split": "val", "precision": "bf16", "resize": "bilinear",
             "options": "batchnorm_recalibration_batches=50"},
    note="Each method at its defaults (configs/acdc/METHOD.yaml; 4000 iterations, bf16) with BatchNorm statistics "
         "re-estimated on 50 labelled batches before every evaluation (`--set batchnorm_recalibration_batches=50`; "
         "why: [analysis.md](analysis.md)). Reproduce a row with `dust benchmark --protocol acdc-cpu --methods "
         "METHOD --labeled-patients N --seeds 1337 2024 4242 --jobs 2 --threads 1 --set "
         "batchnorm_recalibration_batches=50`; each seed's command is under Commands.",
)

# LA is compared at each method's defaults, as the LA papers evaluate (no BatchNorm recalibration).
_LA_COMPARISON = Comparison(
    methods=("supervised", "mean_teacher", "ua_mt", "cps", "dtc", "mc_net", "mcf", "self_training", "st_ss", "dust",
             "fixdyn", "multicure"),
    labeled_patients=(8, 16),
    # fp32 since the re-run after issue 45: it runs the same on every CPU, where bf16 kernels differ between CPUs and
    # are emulated (slowly) where the CPU lacks them; the earlier bf16 rows stay on the results page as a variant
    setting={"iterations": 1000, "split": "val", "precision": "fp32", "resize": "crop", "options": ""},
    note="Each method at its defaults (configs/la/METHOD.yaml: volumes resampled by 0.5, VNet, crops 32x64x64, "
         "batch 2 + 2, 1000 iterations), fp32 (protocol and timings: [la.md](la.md)). Labelled patients = labelled "
         "volumes (the first N of train.list); validation = the last 8 of train.list, on the original grid. "
         "Reproduce a row with `dust benchmark --protocol la-cpu --methods METHOD --labeled-patients N --seeds "
         "1337 2024 4242 --jobs 2 --threads 1 --set bf16=false` (on one CPU kind: the same command differs by "
         "2-4 Dice between CPUs); each seed's command is under Commands.",
    analysis="la.md",
)

PROTOCOLS = {
    "acdc-cpu": Protocol(
        "acdc-cpu", Path("configs/acdc"), Path("docs/results/acdc_cpu.json"), Path("docs/results/README.md"),
        "ACDC, CPU budget protocol (validation split)", _ACDC_COMPARISON,
    ),
    "la-cpu": Protocol(
        "la-cpu", Path("configs/la"), Path("docs/results/la_cpu.json"), Path("docs/results/la_cpu.md"),
        "LA, CPU budget protocol (validation split)", _LA_COMPARISON,
    ),
}


def get_protocol(name: str, results_json: str | Path | None = None, results_markdown: str | Path | None = None,
                 title: str | None = None) -> Protocol:
    """The protocol called ``name``, with its results JSON, Markdown page or title replaced where given (the
    ``--json``/``--markdown``/``--title`` options of ``dust benchmark`` and ``dust results``)."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    return replace(protocol, results_json=Path(results_json or protocol.results_json),
                   results_markdown=Path(results_markdown or protocol.results_markdown),
                   title=title or protocol.title)


@dataclass
class BenchmarkJob:
    """One combination: its resolved config, the equivalent ``dust train`` command, and whether it runs."""

    method: str
    labeled_patients: int
    seed: int
    cfg: dict
    command: str
    done: bool  # its last and best records are already in the results JSON
    config_path: Path  # the config file as it exists here (the command names it relative to the repository)
    overrides: list[str]  # the command's --set values

    @property
    def run_dir(self) -> Path:
        return format_run_dir(self.cfg)

    @property
    def resumes(self) -> bool:
        """Its run directory already holds checkpoints (an interrupted earlier attempt): continue it."""
        return bool(iteration_checkpoints(self.run_dir / "checkpoints"))


def _config_file(protocol: Protocol, method: str) -> tuple[Path, Path]:
    """(path as written in the command, path that exists here): the protocol's config, from the current folder or
    among the configs shipped with dust (``dust train`` finds ``configs/...`` the same way from any folder)."""
    written = protocol.config_dir / f"{method}.yaml"
    try:
        return written, find_config(written)
    except ConfigError:
        folder = shipped_configs() / Path(*protocol.config_dir.parts[1:])
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"{written}: no config for method {method!r} in protocol {protocol.name} "
                          f"(known: {known})") from None


def variant_run_dir(run_dir: str, settings: list[str]) -> str:
    """``run_dir`` with the variant's overrides appended (``..._seed{seed}_batchnorm_recalibration_batches-50``)."""
    suffix = "_".join(re.sub(r"[^A-Za-z0-9._]+", "-", s.strip()).strip("-") for s in settings)
    return f"{run_dir}_{suffix}"


def plan_benchmark(protocol: Protocol, methods: list[str], labeled_patients: list[int], seeds: list[int],
                   results: list[dict], threads: int | None = None,
                   settings: list[str] | None = None) -> list[BenchmarkJob]:
    """Every combination in order (labelled patients, method, seed), marked done when ``results`` holds it; each
    command records into the protocol's results JSON.

    ``threads`` (when given) overrides the configs' thread count and is written into each command; ``settings``
    (``key=value`` overrides) make every run a variant of the protocol (see the module docstring)."""
    settings = list(settings or [])
    keys = {item.split("=", 1)[0].strip() for item in settings}
    for item in settings:
        if "=" not in item or item.split("=", 1)[0].strip() in ("method", "labeled_patients", "seed", "threads"):
            raise ConfigError(f"--set {item!r}: give key=value for a setting of the variant "
                              "(the method, labelled patients, seeds and threads have options of their own)")
    present = {record_key(r) for r in results}
    # an fp32 protocol runs fp32 everywhere (`bf16: auto` would pick bf16 on a CPU with it, a row of another setting);
    # a bf16 protocol leaves auto alone: forcing bf16 where the CPU lacks it would emulate it, many times slower
    fp32 = protocol.comparison is not None and protocol.comparison.setting.get("precision") == "fp32"
    pinned = ["bf16=false"] if fp32 and "bf16" not in keys else []
    # a variant's runs get run directories of their own, unless a setting names one
    variant_run_dirs = bool(settings) and "run_dir" not in keys
    jobs = []
    for n in labeled_patients:
        for method in methods:
            written, path = _config_file(protocol, method)
            for seed in seeds:
                overrides = [f"labeled_patients={n}", f"seed={seed}", *([f"threads={threads}"] if threads else []),
                             *pinned, *settings]
                cfg = full_config(load_config(path, overrides))
                if variant_run_dirs:
                    run_dir = format_run_dir({**cfg, "run_dir": variant_run_dir(str(cfg["run_dir"]), settings)})
                    overrides.append(f"run_dir={run_dir}")
                    cfg = {**cfg, "run_dir": str(run_dir)}  # what resolving the overrides again would give
                command = pin_precision(" ".join(
                    ["dust train --config", shlex.quote(str(written)),
                     *[f"--set {shlex.quote(o)}" for o in overrides],
                     "--record", shlex.quote(str(protocol.results_json))]
                ), precision_of(cfg))
                done = all(record_key(identity_of(cfg, tag)) in present for tag in ("last", "best"))
                jobs.append(BenchmarkJob(method, n, seed, cfg, command, done, path, overrides))
    return jobs


def run_job(job: BenchmarkJob) -> list[dict]:
    """Train and evaluate one combination (resuming its run directory when it holds checkpoints)."""
    if job.resumes:
        log.info("benchmark: %s holds checkpoints; resuming it", job.run_dir)
    return train(job.cfg, resume=job.resumes, command=job.command)


def run_job_in_subprocess(job: BenchmarkJob) -> list[dict]:
    """:func:`run_job` in a ``dust train`` process of its own (console output in ``RUN_DIR/console.log``)."""
    run_dir = job.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if job.resumes:
        argv = ["train", "--resume", str(run_dir)]  # its config.yaml holds the thread count it started with
    else:  # the job's command without --record (this process records), its config found from any directory
        argv = ["train", "--config", str(job.config_path), *[a for o in job.overrides for a in ("--set", o)]]
    console = run_dir / "console.log"
    with open(console, "w") as out:
        done = subprocess.run([sys.executable, "-m", "dust", *argv], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = console.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RunFailedError(f"{job.command} failed (exit {done.returncode}): {tail[0]}; full output in {console}")
    records = json.loads((run_dir / "results.json").read_text())
    return [{**r, "command": job.command} for r in records]


def default_threads(jobs: int) -> int:
    """Threads per run when ``jobs`` runs share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // jobs)


def run_benchmark(jobs: list[BenchmarkJob], protocol: Protocol, force: bool = False,
                  parallel: int = 1) -> list[dict]:
    """Run every job not done (all of them with ``force``), ``parallel`` at a time; after each, merge its records
    into the protocol's JSON and regenerate its Markdown page, so an interruption loses at most the runs in
    progress. Returns the new records. A failed run (with ``parallel > 1``) does not stop the others; the error is
    raised at the end."""
    new: list[dict] = []
    todo = [j for j in jobs if force or not j.done]

    def record(records: list[dict]) -> None:
        protocol.write_results_page(update_results(protocol.results_json, records))
        new.extend(records)

    if parallel <= 1:
        for i, job in enumerate(todo, start=1):
            log.info("benchmark %d/%d: %s", i, len(todo), job.command)
            record(run_job(job))
    else:
        failures = []
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            running = {pool.submit(run_job_in_subprocess, job): job for job in todo}
            log.info("benchmark: %d runs, %d side by side (console output in each RUN_DIR/console.log)",
                     len(todo), parallel)
            for future in as_completed(running):
                job = running[future]
                try:
                    records = future.result()
                except RunFailedError as err:
                    log.error("benchmark: %s", err)
                    failures.append(str(err))
                    continue
                record(records)
                log.info("benchmark: done %s (%s)", job.command,
                         ", ".join(f"{r['checkpoint']} Dice {r['dice']:.2f}" for r in records))
        if failures:
            raise RunFailedError(f"{len(failures)} of {len(todo)} benchmark runs failed: " + " | ".join(failures))
    if not todo and protocol.results_json.is_file():  # nothing to run: the table is still brought up to date
        protocol.write_results_page(json.loads(protocol.results_json.read_text()))
    return new
