"""Iteration checkpoints of a run: rotation, and resuming from the newest readable one.

The last ``keep`` iteration checkpoints are kept; an unreadable newest one is moved aside (``*.pt.corrupt``, so
rotation never deletes a good file to keep it) and loading falls back to the one before; when every one is
unreadable, resuming stops instead of starting again over the user's files. Writing and reading one file
(atomically, weights only) is :mod:`dust.storage`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from dust.storage import CheckpointError, atomic_save, load_checkpoint

log = logging.getLogger("dust")
_ITER = re.compile(r"^iter_(\d+)\.pt$")


def iteration_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Iteration checkpoints, newest first."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("iter_*.pt") if (m := _ITER.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def trained_model_files(ckpt_dir: Path) -> list[Path]:
    """Every model file of a run: iteration checkpoints (also those moved aside as unreadable), ``best.pt`` and a
    method's snapshots (``pretrain_kK.pt``). A run directory holding any of them holds trained work that a new
    run must not overwrite unless the user says so (``dust train --overwrite``)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.name.endswith((".pt", ".pt.corrupt")) and not p.is_dir())


def remove_trained_model_files(ckpt_dir: Path) -> list[Path]:
    """Delete what :func:`trained_model_files` lists (and temp files of cut writes): ``--overwrite`` starts a run
    again from iteration 0, and an older run's iteration checkpoints would otherwise outrank the new ones."""
    removed = trained_model_files(ckpt_dir)
    for path in [*removed, *ckpt_dir.glob(".*.pt.*.tmp")]:
        path.unlink(missing_ok=True)
    return removed


def save_iteration_checkpoint(state: dict[str, Any], ckpt_dir: Path, iteration: int, keep: int) -> Path:
    path = ckpt_dir / f"iter_{iteration:07d}.pt"
    atomic_save(state, path)
    for old in iteration_checkpoints(ckpt_dir)[max(keep, 1) :]:
        old.unlink(missing_ok=True)
    return path


def load_latest(ckpt_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest readable iteration checkpoint, or None when there is none yet. An unreadable one is moved aside
    to ``<name>.corrupt`` with a warning; if every checkpoint is unreadable, a ``CheckpointError`` says so."""
    found = iteration_checkpoints(ckpt_dir)
    for path in found:
        try:
            return load_checkpoint(path), path
        except CheckpointError as err:
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            log.warning("skipping unreadable checkpoint (moved to %s), falling back to the previous one: %s",
                        aside.name, err)
    if found:
        raise CheckpointError(f"{ckpt_dir}: all {len(found)} checkpoint(s) are unreadable (moved aside as "
                              "*.pt.corrupt); nothing to resume from. Restore a checkpoint, start a new run (another "
                              "run_dir), or start this one again from iteration 0 with --overwrite")
    return None
