"""What ``dust train`` does, as plain functions (so tests and notebooks call them without a shell): check the
data, train, evaluate the last and best checkpoints, record, write the run's report.

It sits above the engine and the report (it uses both); everything below it never imports it.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dust.config import ConfigError, format_run_dir, resolve_data_dir
from dust.data import check_data, load_split
from dust.data.check import raise_if_problems
from dust.engine import distributed
from dust.engine.checkpoint import iteration_checkpoints, remove_trained_model_files, trained_model_files
from dust.engine.evaluation import evaluate_volumes, write_evaluation
from dust.engine.trainer import Trainer, close_run_log
from dust.methods.loading import pick_device
from dust.metrics import case_metrics, summarize
from dust.report import write_report
from dust.results import make_record, pin_precision, precision_of
from dust.storage import CheckpointError, atomic_write_text, load_checkpoint, load_network_weights

log = logging.getLogger("dust")


def train(cfg: dict[str, Any], resume: bool = False, command: str = "", overwrite: bool = False) -> list[dict]:
    """Train, then evaluate the last and best checkpoints on the validation split with every metric.

    Writes ``metrics_val_{last,best}.{csv,json}`` and ``results.json`` (benchmark records) into the run dir.
    The dataset is checked first (``dust check-data``): a problem stops the run before any training. Started
    as one of several processes (torchrun, ``dust train --nproc``), it trains data-parallel and rank 0 writes.
    A run directory that holds a trained model (any checkpoint) is continued with ``resume``, never started
    again over, unless ``overwrite`` (a fresh run only) says to replace that run's model files.
    """
    run_dir = format_run_dir(cfg)
    if resume and overwrite:
        raise ConfigError("--overwrite starts a run again from iteration 0; it does not go with --resume")
    refuse_to_overwrite(run_dir, resume, overwrite)
    owns_group = not torch.distributed.is_initialized()
    ranks = distributed.init_from_env(pick_device(cfg["device"]))
    try:
        # rank 0 reads the files; every rank stops on the same problems
        raise_if_problems(distributed.broadcast_object(check_data(cfg) if ranks.is_main else None))
        return _train_and_evaluate(cfg, resume, command, overwrite)
    finally:
        close_run_log()
        if owns_group:
            distributed.shutdown()


def refuse_to_overwrite(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written (the Trainer rewrites ``config.yaml`` and the log at once), to start a
    run from iteration 0 in a run directory that holds a trained model: a fresh run there, or a resume that finds
    no iteration checkpoint to continue (e.g. after they were all found unreadable and moved aside)."""
    ckpt_dir = run_dir / "checkpoints"
    held = trained_model_files(ckpt_dir)
    if overwrite or not held:
        return
    shown = ", ".join(p.name for p in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
    if not resume:
        how = (f"continue it with `dust train --resume {run_dir}`" if iteration_checkpoints(ckpt_dir) else
               "keep it and choose another run_dir (--set run_dir=...)")
        raise FileExistsError(f"{run_dir} already holds a trained model ({shown}); {how}, or start it again from "
                              "iteration 0 over that model with --overwrite")
    if not iteration_checkpoints(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no iteration checkpoint to resume from, but the run holds a trained "
                              f"model ({shown}) that starting again would overwrite; restore a checkpoint "
                              f"(e.g. rename an iter_*.pt.corrupt you repaired), or start again from iteration 0 "
                              f"with `dust train --config {run_dir / 'config.yaml'} --overwrite`")


def _command_of_record(run_dir: Path, command: str, resume: bool, is_main: bool) -> str:
    """The command a result is credited to: the one that started the run (kept in ``command.txt``), followed
    by the ``--set`` overrides a resume changed (later ones win).

    ``dust train --resume RUN_DIR`` alone reproduces nothing once the run directory is gone; the starting
    command does, because a resumed run continues exactly. A resume that repeats the starting command (as
    ``dust benchmark`` does) changes nothing, so nothing is appended.
    """
    path = run_dir / "command.txt"
    if resume and path.is_file():
        started = path.read_text().strip()
        in_effect = dict(_set_overrides(started))  # later ones win
        resumed_with = dict(_set_overrides(command))
        changed = [f"{k}={v}" for k, v in resumed_with.items() if in_effect.get(k) != v]
        return " ".join([started, *(f"--set {shlex.quote(o)}" for o in changed)])
    if is_main and command and not resume:
        atomic_write_text(command + "\n", path)
    return command


def _set_overrides(command: str) -> list[tuple[str, str]]:
    """(KEY, VALUE) of every ``--set KEY=VALUE`` (or ``--set=KEY=VALUE``) in a command line, in order."""
    tokens = shlex.split(command)
    values = [tokens[i + 1] if t == "--set" else t[len("--set="):] for i, t in enumerate(tokens)
              if (t == "--set" and i + 1 < len(tokens)) or t.startswith("--set=")]
    return [tuple(v.split("=", 1)) for v in values if "=" in v]


def _train_and_evaluate(cfg: dict[str, Any], resume: bool, command: str, overwrite: bool = False) -> list[dict]:
    trainer = Trainer(cfg)
    try:
        if overwrite and trainer.is_main:  # only now, with the run directory locked: never under a live run
            removed = remove_trained_model_files(trainer.ckpt_dir)
            if removed:
                log.info("--overwrite: removed the earlier run's %d model file(s) from %s", len(removed),
                         trainer.ckpt_dir)
        distributed.barrier()
        if resume and not trainer.resume():
            log.info("no checkpoint in %s yet: starting from iteration 0", trainer.ckpt_dir)
        command = pin_precision(_command_of_record(trainer.run_dir, command, resume, trainer.is_main),
                                precision_of(cfg))
        trainer.fit()
        records = []
        for tag in ("last", "best"):
            if tag == "best":
                best = trainer.ckpt_dir / "best.pt"
                load_network_weights(trainer.method.networks, load_checkpoint(best), best)
            per_case, summary = evaluate_volumes(trainer.method, trainer.data.val, cfg, trainer.device, sharded=True)
            if trainer.is_main:
                write_evaluation(trainer.run_dir, f"{cfg['val_split']}_{tag}", trainer.data.val, per_case, summary)
            records.append(make_record(cfg, summary, tag, trainer.train_seconds, command))
            log.info("%s checkpoint: %s Dice %.2f | per class %s", tag, cfg["val_split"], records[-1]["dice"],
                     {c: v["dice"] for c, v in records[-1]["per_class"].items()})
        if trainer.is_main:
            atomic_write_text(json.dumps(records, indent=1), trainer.run_dir / "results.json")
            write_run_report(trainer.run_dir)
        return records
    finally:
        trainer.release_run_directory()  # after the last file of the run is written


def write_run_report(run_dir: Path) -> None:
    """``run_dir/report.html``; a failure is a warning: the run's checkpoints and metrics are already written."""
    try:
        log.info("report: %s", write_report([run_dir], run_dir / "report.html"))
    except Exception as err:  # whatever went wrong, the results written above must survive it
        log.warning("no report written for %s (%s: %s); retry with `dust report %s`",
                    run_dir, type(err).__name__, err, run_dir)


def chance_dice(cfg: dict[str, Any]) -> dict:
    """Dice of a uniformly random prediction on the validation volumes: the floor a trained model must beat."""
    rng = np.random.default_rng(0)
    names = {i: n for i, n in enumerate(cfg["class_names"]) if i > 0}
    volumes = load_split(cfg, resolve_data_dir(cfg["data_dir"]), cfg["val_split"])
    return summarize([
        case_metrics(rng.integers(0, cfg["num_classes"], v.label.shape), v.label, names, distances=False)
        for v in volumes
    ])
