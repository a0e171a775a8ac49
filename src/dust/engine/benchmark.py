"""The benchmark: every (method, labelled patients, seed) of a protocol trained by the ``train`` workflow.

Each combination is exactly one ``dust train --config <protocol configs>/<method>.yaml --set labeled_patients=N
--set seed=S --record <json>`` (that command is what its records carry, so anyone can re-run one row).
Combinations whose records are already in the results JSON are skipped, so an interrupted benchmark continues
where it stopped; a run directory that already holds checkpoints is resumed rather than refused.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from dust.config import ConfigError, format_run_dir, load_config
from dust.engine.checkpoint import iteration_checkpoints
from dust.engine.workflows import full_config, train
from dust.results import identity_of, record_key, results_markdown, update_results

log = logging.getLogger("dust")

_REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Protocol:
    """Where a protocol's configs and results live (paths relative to the repository root)."""

    name: str
    config_dir: Path
    results_json: Path
    results_markdown: Path
    title: str


PROTOCOLS = {
    "acdc-cpu": Protocol(
        "acdc-cpu", Path("configs/acdc"), Path("docs/results/acdc_cpu.json"), Path("docs/results/README.md"),
        "ACDC, CPU budget protocol (validation split)",
    ),
}


@dataclass
class BenchmarkJob:
    """One combination: its resolved config, the equivalent ``dust train`` command, and whether it runs."""

    method: str
    labeled_patients: int
    seed: int
    cfg: dict
    command: str
    done: bool  # its last and best records are already in the results JSON

    @property
    def run_dir(self) -> Path:
        return format_run_dir(self.cfg)


def _config_file(protocol: Protocol, method: str) -> tuple[Path, Path]:
    """(path as written in the command, path that exists here): the repository's configs from anywhere."""
    written = protocol.config_dir / f"{method}.yaml"
    for candidate in (written, _REPO_ROOT / written):
        if candidate.is_file():
            return written, candidate
    known = sorted(p.stem for p in (_REPO_ROOT / protocol.config_dir).glob("*.yaml"))
    raise ConfigError(f"{written}: no config for method {method!r} in protocol {protocol.name} (known: {known})")


def plan_benchmark(protocol: Protocol, methods: list[str], labeled_patients: list[int], seeds: list[int],
                   results: list[dict], record_json: Path) -> list[BenchmarkJob]:
    """Every combination in order (labelled patients, method, seed), marked done when ``results`` holds it."""
    present = {record_key(r) for r in results}
    jobs = []
    for n in labeled_patients:
        for method in methods:
            written, path = _config_file(protocol, method)
            for seed in seeds:
                overrides = [f"labeled_patients={n}", f"seed={seed}"]
                cfg = full_config(load_config(path, overrides))
                command = " ".join(
                    ["dust train --config", shlex.quote(str(written)),
                     *[f"--set {shlex.quote(o)}" for o in overrides], "--record", shlex.quote(str(record_json))]
                )
                done = all(record_key(identity_of(cfg, tag)) in present for tag in ("last", "best"))
                jobs.append(BenchmarkJob(method, n, seed, cfg, command, done))
    return jobs


def run_job(job: BenchmarkJob) -> list[dict]:
    """Train and evaluate one combination (resuming its run directory when it holds checkpoints)."""
    resume = bool(iteration_checkpoints(job.run_dir / "checkpoints"))
    if resume:
        log.info("benchmark: %s holds checkpoints; resuming it", job.run_dir)
    return train(job.cfg, resume=resume, command=job.command)


def run_benchmark(jobs: list[BenchmarkJob], results_json: Path, markdown: Path, title: str,
                  force: bool = False) -> list[dict]:
    """Run every job not done (all of them with ``force``); after each, merge its records into the JSON and
    regenerate the Markdown, so an interruption loses at most the run in progress. Returns the new records."""
    new = []
    todo = [j for j in jobs if force or not j.done]
    for i, job in enumerate(todo, start=1):
        log.info("benchmark %d/%d: %s", i, len(todo), job.command)
        records = run_job(job)
        merged = update_results(results_json, records)
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(results_markdown(merged, title))
        new += records
    if not todo and results_json.is_file():  # nothing to run: the table is still brought up to date
        markdown.write_text(results_markdown(json.loads(results_json.read_text()), title))
    return new
