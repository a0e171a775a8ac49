"""How good a 3D DUST run's pseudo-labels are, and whether Eq. 1 ranks the unlabelled volumes by that quality.

The 3D counterpart of ``pseudo_label_quality.py`` (ACDC slices): for a finished ``dust`` / ``st_ss`` run on LA it
scores, against the unlabelled volumes' ground truth (which training never reads), on the training grid:

- stage 1's labels, re-made from the last pre-training snapshot through the engine's pool inference (the sliding
  window the run used), per volume, for the reliable and the unreliable half of ``sample_uncertainty.csv``;
- stage 2's labels, as stored in the newest iteration checkpoint (kept there for resume).

And the Spearman correlation between a volume's Eq. 1 value and its stage-1 label Dice (a ranking that finds the
well-labelled volumes gives a negative one), and between Eq. 1 and the atrium's share of the volume (agreeing
background dilutes Eq. 1 over the whole image, so a small structure scores low).

    DUST_DATA=../shared/data python benchmarks/investigations/pseudo_label_quality_3d.py runs/la/dust_8p_seed1337 \
        --out docs/results/diagnostics/la_dust_8p_seed1337_pseudo_label_quality.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from dust.config import resolve_data_dir
from dust.data.la import read_case, split_ids
from dust.data.transforms import resampled_shape, resize_image, resize_label
from dust.engine.checkpoint import iteration_checkpoints, load_checkpoint
from dust.engine.predict import load_for_inference
from dust.inference import Predictor
from dust.metrics import case_metrics


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice in % (dust's metric: 100 when both are empty)."""
    scored = case_metrics((pred > 0).astype(np.uint8), (truth > 0).astype(np.uint8), {1: "foreground"},
                          distances=False)
    return round(100.0 * scored["foreground"].dice, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with (args.run_dir / "sample_uncertainty.csv").open() as f:
        ranked = list(csv.DictReader(f))  # most reliable first
    snapshot = sorted((args.run_dir / "checkpoints").glob("pretrain_k*.pt"))[-1]
    teacher, cfg = load_for_inference(snapshot)
    root = resolve_data_dir(cfg["data_dir"])
    predictor = Predictor.from_config(cfg, torch.device("cpu"))
    state = load_checkpoint(iteration_checkpoints(args.run_dir / "checkpoints")[0])
    stage2 = state.get("method_state", {}).get("pseudo_labels")
    # the pool's order, in which the checkpoint holds its labels
    pool_ids = split_ids(root, int(cfg["labeled_patients"]), "val", int(cfg["holdout_cases"]))["unlabeled"]
    rows = []
    for row in ranked:
        image, label = read_case(root, row["image_id"], cfg, True)
        grid = resampled_shape(image.shape[1:], float(cfg["resample_factor"]))  # the training grid of the item
        x = resize_image(torch.from_numpy(image)[None], grid, cfg["image_interpolation"])[0]
        truth = resize_label(torch.from_numpy(label)[None], grid)[0].numpy()
        with torch.inference_mode():
            _, _, (logits,) = next(predictor.items(lambda v: (teacher.predict(v),), [x], [0]))
        entry = {"image_id": row["image_id"], "rank": int(row["rank"]), "uncertainty": float(row["uncertainty"]),
                 "subset": row["subset"], "foreground_share": round(float((truth > 0).mean()), 4),
                 "stage1_dice": dice(logits[0].argmax(0).numpy(), truth)}
        if stage2 is not None:
            entry["stage2_dice"] = dice(stage2[pool_ids.index(row["image_id"])].numpy(), truth)
        rows.append(entry)
        print(entry, flush=True)
    summary = {"run_dir": str(args.run_dir), "volumes": len(rows)}
    for subset in ("reliable", "unreliable"):
        picked = [r["stage1_dice"] for r in rows if r["subset"] == subset]
        summary[f"stage1_mean_dice_{subset}"] = round(float(np.mean(picked)), 2) if picked else None
        shares = [r["foreground_share"] for r in rows if r["subset"] == subset]
        summary[f"mean_foreground_share_{subset}"] = round(float(np.mean(shares)), 4) if shares else None
    summary["stage1_mean_dice"] = round(float(np.mean([r["stage1_dice"] for r in rows])), 2)
    if stage2 is not None:
        summary["stage2_mean_dice"] = round(float(np.mean([r["stage2_dice"] for r in rows])), 2)
    summary["spearman_uncertainty_vs_stage1_dice"] = round(float(spearmanr(
        [r["uncertainty"] for r in rows], [r["stage1_dice"] for r in rows]).statistic), 3)
    summary["spearman_uncertainty_vs_foreground_share"] = round(float(spearmanr(
        [r["uncertainty"] for r in rows], [r["foreground_share"] for r in rows]).statistic), 3)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "volumes": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
