"""How good a DUST run's pseudo-labels are: Dice against the unlabelled pool's ground truth, which training never reads.

A diagnostic for the stage-1/stage-2 Dice drop (docs/results/analysis.md): a student trained on pseudo-labels
that are worse than its own validation Dice can only copy their errors. Two sets are scored:

- stage 1: re-made from the last pre-training snapshot (the network that labelled stage 1) with the run's
  ``output_decoder``, for the reliable half it trained on and the unreliable half it left out
  (``sample_uncertainty.csv``): if the sample-uncertainty ranking works, the reliable half is labelled better;
- the labels stored in the newest iteration checkpoint (kept there for resume): stage 2's when the run got there.

Dice is pooled over slices per class (sum of overlaps over sum of sizes), for all labelled slices of a set and for
those a run with ``skip_empty_pseudo_labels`` trains on (pseudo-label not background only).

``--recalibrate-batches N`` (for runs with ``batchnorm_recalibration_batches``): the stage-1 labels come from the
last snapshot with its BatchNorm statistics re-estimated over N labelled training batches (dropout off), as such a
run's teacher labels, and every ranking is scored twice, from the snapshots as saved (what the run ranked with)
and from the snapshots recalibrated the same way (``snapshot_batchnorm_recalibration``).

    DUST_DATA=../shared/data python benchmarks/investigations/pseudo_label_quality.py runs/acdc/dust_7p_seed1337_fixes \
        [--out docs/results/diagnostics/dust_7p_seed1337_fixes_pseudo_label_quality.json]
"""

from __future__ import annotations

import argparse
import csv
import json
from contextlib import nullcontext
from pathlib import Path

import h5py
import numpy as np
import torch
from scipy.stats import spearmanr

from dust.config import resolve_data_dir
from dust.data import load_training_data
from dust.data.sampler import TwoStreamSampler
from dust.data.transforms import resize_image
from dust.engine.checkpoint import iteration_checkpoints, load_checkpoint
from dust.engine.predict import load_for_inference
from dust.methods.staged import StagedSelfTraining
from dust.models.batchnorm import recalibrate_batchnorm
from dust.uncertainty import sample_uncertainty, split_by_uncertainty


def pooled_dice(pairs: list[tuple[np.ndarray, np.ndarray]], classes: list[str]) -> dict[str, float]:
    """Per-class Dice (in %) pooled over (pseudo-label, ground truth) slice pairs, and their mean."""
    out = {}
    for c, name in enumerate(classes[1:], start=1):
        overlap = sum(int(((p == c) & (g == c)).sum()) for p, g in pairs)
        size = sum(int((p == c).sum() + (g == c).sum()) for p, g in pairs)
        out[name] = round(200 * overlap / size, 2) if size else float("nan")
    out["mean"] = round(float(np.mean([out[n] for n in classes[1:]])), 2)
    return out


def score(name: str, labels: dict[int, np.ndarray], truth: list[np.ndarray], classes: list[str]) -> dict:
    kept = {i: p for i, p in labels.items() if p.any()}
    row = {
        "slices": len(labels),
        "background_only": len(labels) - len(kept),
        "background_only_but_truth_has_foreground": sum(1 for i, p in labels.items() if not p.any() and truth[i].any()),
        "dice_all": pooled_dice([(p, truth[i]) for i, p in labels.items()], classes),
        "dice_kept": pooled_dice([(p, truth[i]) for i, p in kept.items()], classes),
    }
    print(f"{name}: {row['slices']} slices, {row['background_only']} background only "
          f"({row['background_only_but_truth_has_foreground']} of them with foreground in the truth); "
          f"Dice all {row['dice_all']['mean']}, kept {row['dice_kept']['mean']}  per class {row['dice_kept']}")
    return row


def slice_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean Dice (in %) of one slice over the foreground classes present in the prediction or the truth."""
    values = []
    for c in range(1, num_classes):
        p, g = pred == c, truth == c
        if p.any() or g.any():
            values.append(200 * (p & g).sum() / (p.sum() + g.sum()))
    return float(np.mean(values)) if values else 100.0


def ranking_quality(order: list[int], labels: dict[int, np.ndarray], truth: list[np.ndarray],
                    num_classes: int) -> dict:
    """Mean slice Dice of the labels per quarter of a ranking (easiest first), and the Spearman correlation of
    rank and Dice: a ranking that finds the well-labelled slices gives falling Dice and a negative correlation."""
    dice = np.array([slice_dice(labels[i], truth[i], num_classes) for i in order])
    # tied Dice values (many slices score 0 or 100) share their average rank; nan when every slice ties
    spearman = float(spearmanr(np.arange(len(dice)), dice).statistic) if np.ptp(dice) > 0 else float("nan")
    return {"mean_slice_dice_by_quarter": [round(float(q.mean()), 2) for q in np.array_split(dice, 4)],
            "spearman_rank_vs_dice": round(spearman, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recalibrate-batches", type=int, default=0, metavar="N",
                        help="also rank with BatchNorm-recalibrated snapshots; label with the recalibrated last one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    snapshots = sorted((args.run_dir / "checkpoints").glob("pretrain_k*.pt"))
    methods = [load_for_inference(path) for path in snapshots]
    cfg = methods[-1][1]
    root = resolve_data_dir(cfg["data_dir"])
    data = load_training_data(cfg, root)
    pool = data.unlabeled
    versions = {"": methods}  # key: suffix of the result names
    if args.recalibrate_batches:
        # seed 0: not the run's own draws, the same kind of batches (labelled only, as pre-training sees)
        sampler = TwoStreamSampler.from_config(data.labeled, data.unlabeled, cfg, 0)
        batches = [sampler.next(False)["x_l"] for _ in range(args.recalibrate_batches)]
        versions["_recalibrated"] = [load_for_inference(path) for path in snapshots]
        for method, _ in versions["_recalibrated"]:
            recalibrate_batchnorm(method.networks, method.predict, batches, nullcontext())
    labeller = list(versions.values())[-1][-1][0]
    truth = []
    for slice_id in pool.ids:
        with h5py.File(root / "data" / f"{slice_id}.h5", "r") as f:
            truth.append(np.asarray(f["label"][()], dtype=np.uint8))
    classes = list(cfg["class_names"])

    # the last snapshot labels stage 1: argmax at patch size, resized (nearest) to each slice; all K snapshots
    # give the sample uncertainty (Eq. 1), over the whole image (the paper) and over predicted foreground
    labels: dict[int, np.ndarray] = {}
    regions = ("image", "foreground")
    uncertainty: dict[str, list[torch.Tensor]] = {r + v: [] for r in regions for v in versions}
    size = tuple(cfg["patch_size"])
    with torch.inference_mode():
        for start in range(0, len(pool.ids), 64):
            idx = list(range(start, min(start + 64, len(pool.ids))))
            x = torch.cat([resize_image(pool.images[i][None], size, cfg["image_interpolation"]) for i in idx])
            for v, snapshot_methods in versions.items():
                probs = [torch.softmax(method.predict(x).float(), 1) for method, _ in snapshot_methods]
                for r in regions:
                    uncertainty[r + v].append(sample_uncertainty(probs, region=r))
            for i, label in zip(idx, labeller.predict(x).argmax(1), strict=True):
                labels[i] = StagedSelfTraining.label_on_item_grid(label, pool.images[i]).numpy()

    result: dict = {"run_dir": str(args.run_dir), "stage1_labeller": snapshots[-1].name,
                    "recalibrate_batches": args.recalibrate_batches}
    reliable_half: dict[str, set[str]] = {}
    for r in uncertainty:
        order, reliable, unreliable = split_by_uncertainty(torch.cat(uncertainty[r]), cfg["reliable_fraction"])
        reliable_half[r] = {pool.ids[i] for i in reliable.tolist()}
        row = ranking_quality(order.tolist(), labels, truth, len(classes))
        print(f"region {r}: slice Dice by quarter of the ranking (easiest first) {row['mean_slice_dice_by_quarter']}"
              f"; Spearman(rank, Dice) {row['spearman_rank_vs_dice']}")
        for name, half in (("reliable", reliable), ("unreliable", unreliable)):
            row[name] = score(f"  {name} half", {i: labels[i] for i in half.tolist()}, truth, classes)
        result[f"sample_uncertainty_{r}"] = row
    # the recomputation must reproduce the run's own split (the reliable half it trained stage 1 on)
    region = cfg.get("sample_uncertainty_region", "image")
    with (args.run_dir / "sample_uncertainty.csv").open() as f:
        run_reliable = {row["image_id"] for row in csv.DictReader(f) if row["subset"] == "reliable"}
    agree = len(run_reliable & reliable_half[region]) / max(len(run_reliable), 1)
    result[f"sample_uncertainty_{region}"]["reliable_half_shared_with_run_csv"] = round(agree, 4)
    if agree < 1:
        print(f"warning: only {agree:.1%} of the run's reliable half (sample_uncertainty.csv) is in the recomputed one")

    newest = iteration_checkpoints(args.run_dir / "checkpoints")
    if newest:
        state = load_checkpoint(newest[0])
        stored = {i: p.numpy() for i, p in enumerate(state["method_state"]["pseudo_labels"]) if p.numel()}
        if stored:
            result["stored_in"] = newest[0].name
            result["stored"] = score(f"labels stored in {newest[0].name}", stored, truth, classes)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
