"""Make a shipped model from a recorded run: its final weights as a weights-only fp16 checkpoint, plus its entry
in ``models/index.json`` (the record it came from, sha256, input, classes, per-case Dice to check it by).

    DUST_DATA=../shared/data python models/ship.py runs/acdc/dust_7p_seed1337_bnrecal --name acdc_dust_7p \\
        --input "short-axis cardiac cine MRI (ACDC), slices min-max normalised per volume"

The final weights are the newest iteration checkpoint's (what the run's ``last`` record scored, BatchNorm
statistics included). Stored in fp16 (a few MB); loaded into an fp32 model they score within rounding of the
fp32 weights; the entry states the full validation Dice of both (``val_dice_fp16`` beside the record's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

from dust.config import resolve_data_dir
from dust.data import load_split
from dust.engine.checkpoint import iteration_checkpoints
from dust.engine.evaluation import evaluate_volumes
from dust.methods.loading import load_trained
from dust.storage import atomic_save, atomic_write_text, load_checkpoint

MODELS = Path(__file__).resolve().parent
INDEX = MODELS / "index.json"
CHECK_CASES = 2  # validation volumes whose per-case Dice the shipped-model test reproduces


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_only_fp16(state: dict) -> dict:
    """What inference needs of a checkpoint: format, method, classes, config, networks (floats in fp16)."""
    networks = {name: {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
                for name, weights in state["networks"].items()}
    return {"format": state["format"], "dust_version": state.get("dust_version"), "method": state["method"],
            "num_classes": state["num_classes"], "config": state["config"], "networks": networks}


def per_case_dice(checkpoint: Path) -> tuple[dict[str, float], float]:
    """Foreground Dice (%) of each validation volume and the mean over all of them, at the run's precision."""
    method, cfg = load_trained(checkpoint)
    volumes = load_split(cfg, resolve_data_dir(cfg["data_dir"]), cfg["val_split"])
    per_case, summary = evaluate_volumes(method, volumes, cfg, torch.device("cpu"), distances=False)
    cases = {v.case_id: round(100 * sum(c.dice for c in case.values()) / len(case), 3)
             for v, case in zip(volumes, per_case, strict=True)}
    return cases, round(100 * summary["overall"]["dice"]["mean"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", required=True, help="file stem under models/, e.g. acdc_dust_7p")
    parser.add_argument("--input", required=True, help="what the model expects as input, in words")
    parser.add_argument("--note", default="", help="anything a user should know, e.g. the machine it was trained on")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    final = iteration_checkpoints(args.run_dir / "checkpoints")[0]
    state = load_checkpoint(final)
    target = MODELS / f"{args.name}.pt"
    atomic_save(weights_only_fp16(state), target)
    cases, val_dice = per_case_dice(target)
    record = next(r for r in json.loads((args.run_dir / "results.json").read_text()) if r["checkpoint"] == "last")
    cfg = state["config"]
    entry = {
        "name": args.name, "file": target.name, "sha256": sha256(target), "size_bytes": target.stat().st_size,
        "method": state["method"], "from_run": str(args.run_dir), "from_checkpoint": final.name,
        "record": {k: record[k] for k in ("method", "labeled_patients", "seed", "iterations", "precision",
                                          "options", "dice", "command")},
        "input": args.input, "in_channels": cfg["in_channels"], "classes": cfg["class_names"],
        "val_dice_fp16": val_dice,
        "check_cases": dict(list(cases.items())[:CHECK_CASES]),
    }
    if args.note:
        entry["note"] = args.note
    index = json.loads(INDEX.read_text()) if INDEX.is_file() else []
    index = [e for e in index if e["name"] != args.name] + [entry]
    atomic_write_text(json.dumps(sorted(index, key=lambda e: e["name"]), indent=1) + "\n", INDEX)
    print(f"{target} ({entry['size_bytes'] / 1e6:.1f} MB): val Dice {val_dice} with fp16 weights, record "
          f"{record['dice']} ({record['precision']})")


if __name__ == "__main__":
    main()
