"""What a finished run directory says about itself: config, training curves, metrics, sample uncertainty.

Everything is read from files the engine writes (``config.yaml``, ``checkpoints/``,
``metrics_<split>_<tag>.{csv,json}``, ``sample_uncertainty.csv``); a run that lacks its metrics files
(interrupted, or older than them) is evaluated from its checkpoints with
:func:`dust.workflows.evaluate_checkpoint`, which writes the missing files.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dust.config import ConfigError, load_config
from dust.engine.checkpoint import iteration_checkpoints
from dust.engine.evaluation import evaluate_checkpoint
from dust.methods import get_method
from dust.methods.loading import stored_config
from dust.metrics import METRIC_NAMES
from dust.storage import load_checkpoint, read_json

log = logging.getLogger("dust")

CHECKPOINT_TAGS = ("last", "best")


@dataclass
class CaseResult:
    """One validation case at one checkpoint: metrics per class and the case's mean Dice over classes."""

    case_id: str
    per_class: dict[str, dict[str, float | None]]

    @property
    def dice(self) -> float:
        return sum(m["dice"] for m in self.per_class.values()) / len(self.per_class)

    def mean(self, metric: str) -> float | None:
        values = [m[metric] for m in self.per_class.values()]
        return None if any(v is None for v in values) else sum(values) / len(values)


@dataclass
class SampleUncertainty:
    """One unlabelled slice of DUST's ranked list (rank 1 = most stable across pre-training snapshots)."""

    rank: int
    image_id: str
    uncertainty: float
    reliable: bool


@dataclass
class RunRecord:
    """A run directory, read once; the report is drawn from this and the checkpoints it points at."""

    run_dir: Path
    cfg: dict[str, Any]
    history: list[dict[str, Any]]  # validation Dice per check: iteration, dice, stage
    train_log: list[dict[str, float]]  # mean loss terms per log window: iteration, loss, <term>...
    stage_starts: list[tuple[str, int]]  # (stage name, first iteration) for every stage
    total_iterations: int
    weights: dict[str, Path]  # checkpoint tag -> the file holding those weights
    summaries: dict[str, dict] = field(default_factory=dict)  # tag -> metrics summary (metrics_*.json)
    cases: dict[str, list[CaseResult]] = field(default_factory=dict)  # tag -> per case
    notes: list[str] = field(default_factory=list)  # what was derived rather than read, for the reader
    sample_uncertainty: list[SampleUncertainty] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Short name for tables and figure titles."""
        cfg = self.cfg
        return f"{cfg['method']} {cfg['labeled_patients']}p seed {cfg['seed']} ({self.run_dir.name})"

    @property
    def class_names(self) -> list[str]:
        return [n for i, n in enumerate(self.cfg["class_names"]) if i > 0]


def read_case_csv(path: Path) -> list[CaseResult]:
    """The per-case CSV written by :func:`dust.metrics.write_case_csv` (one row per case and class)."""
    by_case: dict[str, dict[str, dict[str, float | None]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            by_case.setdefault(row["case"], {})[row["class"]] = {
                m: float(row[m]) if row.get(m) not in (None, "") else None for m in METRIC_NAMES
            }
    return [CaseResult(case, per_class) for case, per_class in by_case.items()]


def read_sample_uncertainty(path: Path) -> list[SampleUncertainty]:
    with path.open(newline="") as f:
        return [
            SampleUncertainty(int(r["rank"]), r["image_id"], float(r["uncertainty"]), r["subset"] == "reliable")
            for r in csv.DictReader(f)
        ]


def _stage_starts(cfg: dict[str, Any]) -> tuple[list[tuple[str, int]], int]:
    # The method describes its stages from the config alone (no networks are built for this).
    starts, begin = [], 0
    for stage in get_method(cfg["method"])(cfg).stages():
        starts.append((stage.name, begin))
        begin += stage.iterations
    return starts, begin


def load_run(run_dir: Path) -> RunRecord:
    """Read a run directory; evaluate a checkpoint whose metrics files are missing."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml; is this a dust run directory?")
    cfg = stored_config(load_config(config_path), config_path)  # a run of someone else's: its method is not imported
    ckpt_dir = run_dir / "checkpoints"
    weights = {}
    newest = iteration_checkpoints(ckpt_dir)
    if newest:
        weights["last"] = newest[0]
    if (ckpt_dir / "best.pt").is_file():
        weights["best"] = ckpt_dir / "best.pt"
    starts, total = _stage_starts(cfg)
    run = RunRecord(run_dir, cfg, [], [], starts, total, weights)

    # Curves: the newest iteration checkpoint holds the whole history (best.pt only up to the best iteration).
    source = weights.get("last", weights.get("best"))
    if source is not None:
        state = load_checkpoint(source)
        run.history, run.train_log = list(state.get("history", [])), list(state.get("train_log", []))
        if source.name == "best.pt":
            run.notes.append("no iteration checkpoint: curves end at the best checkpoint's iteration")

    split = cfg["val_split"]
    for tag in CHECKPOINT_TAGS:
        stem = run_dir / f"metrics_{split}_{tag}"
        if not stem.with_suffix(".csv").is_file() or not stem.with_suffix(".json").is_file():
            if tag not in weights:
                run.notes.append(f"no {stem.name}.csv and no {tag} checkpoint to evaluate")
                continue
            log.info("report: %s has no %s.csv; evaluating %s", run_dir, stem.name, weights[tag])
            evaluate_checkpoint(weights[tag], split, None, run_dir, tag=tag)
            run.notes.append(f"{stem.name}.* computed for this report from {weights[tag].relative_to(run_dir)}")
        run.summaries[tag] = read_json(stem.with_suffix(".json"))
        run.cases[tag] = read_case_csv(stem.with_suffix(".csv"))

    ranked = run_dir / "sample_uncertainty.csv"
    if ranked.is_file():
        run.sample_uncertainty = read_sample_uncertainty(ranked)
    return run
