"""How many slices of DUST's reliable / unreliable halves the teacher predicts as pure background.

Eq. 1 averages the snapshot disagreement over all pixels, so a slice on which every snapshot predicts only
background scores near zero and lands in the "reliable" half. This measures that share for a finished (or
stage-1) DUST run from its own files: the last pre-training snapshot and sample_uncertainty.csv.

    python benchmarks/investigations/reliable_split_background.py runs/acdc/dust_7p_seed1337 [--out docs/results/x.json]
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
from dust.data.transforms import resize_image
from dust.engine.checkpoint import load_checkpoint
from dust.methods.loading import full_config
from dust.models import make_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = full_config(yaml.safe_load((args.run_dir / "config.yaml").read_text()))
    pool = load_training_data(cfg, resolve_data_dir(cfg["data_dir"])).unlabeled
    snapshots = sorted((args.run_dir / "checkpoints").glob("pretrain_k*.pt"))
    net = make_model(cfg, "dual_unet")
    net.load_state_dict(load_checkpoint(snapshots[-1]))
    net.eval()
    size = tuple(cfg["patch_size"])
    background_only: dict[str, bool] = {}
    with torch.inference_mode():
        for start in range(0, len(pool.ids), 64):
            idx = range(start, min(start + 64, len(pool.ids)))
            x = torch.cat([resize_image(pool.images[i][None], size, cfg["image_interpolation"]) for i in idx])
            pred = net.forward_main(x).argmax(1)
            for j, i in enumerate(idx):
                background_only[pool.ids[i]] = bool((pred[j] == 0).all())

    rows = list(csv.DictReader((args.run_dir / "sample_uncertainty.csv").open()))
    result = {"run_dir": str(args.run_dir), "snapshot": snapshots[-1].name}
    for subset in ("reliable", "unreliable"):
        ids = [r["image_id"] for r in rows if r["subset"] == subset]
        n_bg = sum(background_only[i] for i in ids)
        result[subset] = {"slices": len(ids), "predicted_background_only": n_bg,
                          "percent": round(100 * n_bg / max(len(ids), 1), 1)}
        print(f"{subset:>10}: {n_bg} of {len(ids)} slices predicted as background only ({result[subset]['percent']}%)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
