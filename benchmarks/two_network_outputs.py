"""Validation Dice of each network of a two-network run alone, and of what the method predicts with both.

For co-training methods (``cps``, ``mcf``, ``fixdyn``, ``multicure``) the recorded Dice is of ``predict``, which may
use one network or average two; when it is low, this says which network is the weak one. For ``multicure`` the
auxiliary network is run as in training, with the predictive network's uncertainty map. Per validation volume and
the mean (foreground classes, whole volumes through the engine's sliding window / resize inference):

    DUST_DATA=../shared/data python benchmarks/two_network_outputs.py \
        runs/la/multicure_8p_seed1337/checkpoints/iter_0000400.pt [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dust.config import resolve_data_dir
from dust.data import load_split
from dust.inference import Predictor
from dust.methods.loading import load_trained
from dust.methods.multicure import uncertainty_map
from dust.metrics import case_metrics
from dust.models.deformable import UncertaintyRefinedNetwork


def foreground_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean Dice in % over the foreground classes (dust's metric, as the recorded numbers)."""
    scored = case_metrics(pred, truth, {c: str(c) for c in range(1, num_classes)}, distances=False)
    return 100.0 * float(np.mean([m.dice for m in scored.values()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    method, cfg = load_trained(args.checkpoint)
    for net in method.networks.values():
        net.eval()
    first, second = method.networks["model"], method.networks["model2"]

    def heads(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = first(x)
        if isinstance(second, UncertaintyRefinedNetwork):  # multicure: the map the auxiliary network trains with
            other = second.refined(x, uncertainty_map(torch.softmax(logits.float(), 1),
                                                      float(cfg["confidence_threshold"])))[0]
        else:
            other = second(x)
        return logits, other, method.predict(x)

    predictor = Predictor.from_config(cfg, torch.device("cpu"))
    rows = []
    with torch.inference_mode():
        for volume in load_split(cfg, resolve_data_dir(cfg["data_dir"]), args.split):
            outs = predictor.case(heads, volume.image)
            row = {"case": volume.case_id}
            for name, probs in zip(("model", "model2", "predict"), outs, strict=True):
                row[name] = round(foreground_dice(probs.argmax(0).numpy(), volume.label, cfg["num_classes"]), 2)
            rows.append(row)
            print(row, flush=True)
    summary = {k: round(float(np.mean([r[k] for r in rows])), 2) for k in ("model", "model2", "predict")}
    result = {"checkpoint": str(args.checkpoint), "method": cfg["method"], "split": args.split,
              "mean_dice": summary, "cases": rows}
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
