"""Evaluate a method's predictions on labelled volumes: per-case, per-class metrics and a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dust.config import resolve_data_dir
from dust.data import load_split, write_phantom
from dust.data.types import Volume
from dust.engine import distributed
from dust.inference import Predictor
from dust.methods.loading import full_config, load_trained, pick_device
from dust.metrics import case_metrics, summarize, write_case_csv


def evaluate_volumes(
    method: Any,
    volumes: list[Volume],
    cfg: dict[str, Any],
    device: torch.device,
    distances: bool = True,
    sharded: bool = False,
) -> tuple[list[dict], dict]:
    """Predict every volume with ``method.predict`` and score it against its label.

    ``distances=False`` skips HD95/ASD (the fast check used during training). ``sharded``: called by every rank
    of a job of several processes (``dust.engine.distributed``), rank r scores volumes r, r+N, ... and every rank
    returns all cases, in order; a caller on one rank alone leaves it off and scores them all.
    """
    if sharded and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = volumes[rank::world]
        per_case_mine = _score_volumes(method, mine, cfg, device, distances) if mine else []
        shards = distributed.all_gather_objects(per_case_mine)
        per_case = [shards[i % world][i // world] for i in range(len(volumes))]
    else:
        per_case = _score_volumes(method, volumes, cfg, device, distances)
    return per_case, summarize(per_case, cfg["empty_mask_policy"])


def _score_volumes(method: Any, volumes: list[Volume], cfg: dict[str, Any], device: torch.device,
                   distances: bool) -> list[dict]:
    class_names = {i: n for i, n in enumerate(cfg["class_names"]) if i > 0}
    for net in method.networks.values():
        net.eval()
    predictor = Predictor.from_config(cfg, device)
    per_case = []
    for vol in volumes:
        label = vol.label  # read once (a stored volume reads it from disk)
        if label is None:
            raise ValueError(f"volume {vol.case_id} has no label to evaluate against")
        # on the label's own grid
        pred = predictor.segment(method, vol.image, spacing=vol.spacing).label.numpy().astype(np.uint8)
        per_case.append(case_metrics(pred, label, class_names, vol.spacing, distances=distances,
                                     empty_mask_policy=cfg["empty_mask_policy"]))
    return per_case


def dice_percent(summary: dict, digits: int = 2) -> dict:
    """``{"dice": overall, "per_class_dice": {class: mean}}`` from a :func:`summarize` result, Dice in percent."""
    return {
        "dice": round(100 * summary["overall"]["dice"]["mean"], digits),
        "per_class_dice": {name: round(100 * m["dice"]["mean"], digits) for name, m in summary["per_class"].items()},
    }


def write_evaluation(out_dir: Path, tag: str, volumes: list[Volume], per_case: list[dict], summary: dict) -> None:
    """``metrics_<tag>.csv`` (one row per case and class) and ``metrics_<tag>.json`` (the summary)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_case_csv(out_dir / f"metrics_{tag}.csv", [v.case_id for v in volumes], per_case)
    (out_dir / f"metrics_{tag}.json").write_text(json.dumps(summary, indent=2))


def evaluation_folder(checkpoint: Path) -> Path:
    """Where ``dust evaluate --checkpoint`` writes by default: a run's ``checkpoints/X.pt`` into its run directory;
    any other checkpoint (e.g. a shipped model under ``models/``, which must stay as checked out) into
    ``runs/evaluate/<checkpoint name>/`` under the current folder."""
    if checkpoint.parent.name == "checkpoints" and (checkpoint.parent.parent / "config.yaml").is_file():
        return checkpoint.parent.parent
    return Path("runs") / "evaluate" / checkpoint.stem


def evaluate_checkpoint(
    path: Path, split: str, data_dir: str | None, out_dir: Path | None, tag: str | None = None,
    empty_mask_policy: str | None = None, device: str | None = None,
) -> dict:
    """Evaluate a checkpoint on ``<split>.list`` volumes; writes ``metrics_<split>_<tag>.{csv,json}`` (``tag``
    defaults to the checkpoint's file name) into ``out_dir``, by default :func:`evaluation_folder`.
    ``empty_mask_policy`` overrides the run's."""
    method, cfg = load_trained(path, device)  # device None: auto, whatever the run trained on
    if empty_mask_policy is not None:
        cfg = full_config({**cfg, "empty_mask_policy": empty_mask_policy})
    root = resolve_data_dir(data_dir or cfg["data_dir"])
    if data_dir is None and cfg["generate_phantom"]:
        write_phantom(cfg, root)  # makes sure the phantom exists
    volumes = load_split(cfg, root, split)
    per_case, summary = evaluate_volumes(method, volumes, cfg, pick_device(cfg["device"]))
    out_dir = out_dir or evaluation_folder(path)
    write_evaluation(out_dir, f"{split}_{tag or path.stem}", volumes, per_case, summary)
    return summary
