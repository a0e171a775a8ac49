"""Does DUST's Eq. 1 ranking change when its pre-training snapshots get test-time BatchNorm statistics?

The K snapshots are written in the middle of pre-training, with the running statistics kept in training (dropout
on). ``batchnorm_recalibration_batches`` recalibrates the network before each validation and so before the
pseudo-labels, but the snapshots ranked by Eq. 1 are used as saved. This script recomputes Eq. 1 for a finished
DUST / ST+SS run from its own snapshots, once as saved and once with each snapshot's statistics re-estimated the
way the engine does it (``dust.models.batchnorm``, dropout off, over ``--batches`` labelled training batches: what
pre-training draws), and compares the two rankings: Spearman correlation, how much of one reliable half is in the
other, and the share of slices in each reliable half that the last snapshot predicts as background only.
The run's files are never changed:

    DUST_DATA=../shared/data python benchmarks/investigations/sample_uncertainty_statistics.py \\
        runs/acdc/dust_7p_seed1337_bnrecal \\
        --out docs/results/diagnostics/dust_7p_seed1337_bnrecal_sample_uncertainty.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
import yaml

from dust.config import resolve_data_dir
from dust.data import load_training_data
from dust.data.sampler import TwoStreamSampler
from dust.data.transforms import resize_image
from dust.engine.checkpoint import load_checkpoint
from dust.methods.loading import build_method, full_config
from dust.models.batchnorm import recalibrate_batchnorm
from dust.uncertainty import sample_uncertainty, split_by_uncertainty


def ranks(values: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(values, stable=True)).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batches", type=int, default=50, help="labelled training batches per recalibration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = full_config(yaml.safe_load((args.run_dir / "config.yaml").read_text()))
    data = load_training_data(cfg, resolve_data_dir(cfg["data_dir"]))
    pool = data.unlabeled
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cfg["bf16"]))
    # seed 0: not the run's own draws, the same kind of batches (labelled only, as pre-training sees)
    sampler = TwoStreamSampler.from_config(data.labeled, data.unlabeled, cfg, 0)
    batches = [sampler.next(False)["x_l"] for _ in range(args.batches)]

    paths = sorted((args.run_dir / "checkpoints").glob("pretrain_k*.pt"))
    if len(paths) < 2:
        raise SystemExit(f"{args.run_dir}/checkpoints: needs >= 2 pretrain_k*.pt snapshots, found {len(paths)}")
    versions: dict[str, list] = {"as_saved": [], "recalibrated": []}
    for path in paths:
        for version, snapshots in versions.items():
            method = build_method(cfg, torch.device("cpu"))
            method.networks["model"].load_state_dict(load_checkpoint(path))
            if version == "recalibrated":
                recalibrate_batchnorm(method.networks, method.predict, batches, autocast)
            method.networks["model"].eval()
            snapshots.append(method)

    size = tuple(cfg["patch_size"])
    uncertainty: dict[str, list[torch.Tensor]] = {v: [] for v in versions}
    background_only: dict[str, list[torch.Tensor]] = {v: [] for v in versions}
    with torch.inference_mode(), autocast:
        for start in range(0, len(pool), 64):
            x = torch.cat([resize_image(pool.images[i][None], size, cfg["image_interpolation"])
                           for i in range(start, min(start + 64, len(pool)))])
            for version, snapshots in versions.items():
                probs = [torch.softmax(m.predict(x).float(), 1) for m in snapshots]
                uncertainty[version].append(sample_uncertainty(probs, region=cfg["sample_uncertainty_region"]))
                background_only[version].append((probs[-1].argmax(1) == 0).flatten(1).all(1))
    u = {v: torch.cat(us) for v, us in uncertainty.items()}
    bg = {v: torch.cat(b) for v, b in background_only.items()}

    rows = csv.DictReader((args.run_dir / "sample_uncertainty.csv").open())
    stored = {r["image_id"]: float(r["uncertainty"]) for r in rows}
    stored_u = torch.tensor([stored[i] for i in pool.ids], dtype=torch.float64)
    reliable = {v: set(split_by_uncertainty(u[v], cfg["reliable_fraction"])[1].tolist()) for v in versions}
    result = {
        "command": f"python benchmarks/investigations/sample_uncertainty_statistics.py {args.run_dir}"
                   + (f" --out {args.out}" if args.out else ""),
        "run_dir": str(args.run_dir), "snapshots": [p.name for p in paths], "pool_slices": len(pool),
        "recalibration_batches": args.batches,
        "spearman_as_saved_vs_run_csv": round(spearman(u["as_saved"].double(), stored_u), 4),
        "spearman_as_saved_vs_recalibrated": round(spearman(u["as_saved"].double(), u["recalibrated"].double()), 4),
        "reliable_half_overlap_percent": round(
            100 * len(reliable["as_saved"] & reliable["recalibrated"]) / len(reliable["as_saved"]), 1),
    }
    for version in versions:
        idx = torch.tensor(sorted(reliable[version]))
        result[f"reliable_background_only_percent_{version}"] = round(100 * float(bg[version][idx].float().mean()), 1)
        result[f"pool_background_only_percent_{version}"] = round(100 * float(bg[version].float().mean()), 1)
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
