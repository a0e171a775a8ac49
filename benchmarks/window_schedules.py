"""Is a denser sliding window worse because of a fault, or because the model depends on where its window sits?

For one trained checkpoint, scores the validation volumes with several window schedules: the default (overlap 0.5,
Gaussian blending); the papers' stride 4x18x18 on 80x112x112 scaled to the CPU protocol's 32x64x64 patch (2x10x10),
Gaussian and plain average; a denser overlap. The control that separates the two explanations runs each schedule
with a network that cannot depend on window position (a 1x1 convolution of the intensity, ``Pointwise``): with no
fault in padding, border handling or the normalisation of the blending weights, every schedule gives it exactly its
whole-volume prediction, and a Dice difference between schedules on the trained model is the model's, not the
window's. Also reported per schedule: how much the trained model's windows disagree where they overlap (the mean
over voxels of the spread of the windows' foreground probability), which is what position dependence looks like.

    DUST_DATA=../shared/data python benchmarks/window_schedules.py --checkpoint RUN/checkpoints/best.pt \
        --out docs/results/diagnostics/window_schedules_mcf.json

Evaluation only (no training), on the CPU it is run on; the JSON records the CPU and the commands' settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn

from dust.config import resolve_data_dir
from dust.data import load_split
from dust.data.transforms import resampled_shape, resize_image
from dust.engine.evaluation import evaluate_volumes
from dust.inference import Predictor
from dust.methods.loading import full_config, load_trained
from dust.results import cpu_model

SCHEDULES = {  # name -> config keys
    "overlap 0.5, gaussian (default)": {"inference_overlap": 0.5, "inference_stride": None,
                                        "inference_blend": "gaussian"},
    "stride 2x10x10, gaussian": {"inference_stride": [2, 10, 10], "inference_blend": "gaussian"},
    "stride 2x10x10, plain average": {"inference_stride": [2, 10, 10], "inference_blend": "constant"},
    "overlap 0.75, gaussian": {"inference_overlap": 0.75, "inference_stride": None, "inference_blend": "gaussian"},
}


class Pointwise(nn.Module):
    """Logits from the intensity alone (a 1x1 convolution): its prediction cannot depend on the window."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def window_starts(size: int, patch: int, step: int) -> list[int]:
    """Where windows start along one axis: every ``step``, and the last one flush with the end (as MONAI)."""
    return sorted({*range(0, max(size - patch, 0) + 1, max(step, 1)), max(size - patch, 0)})


def window_spread(predictor: Predictor, predict, x: torch.Tensor) -> float:
    """Over the voxels that several windows cover: the mean (max - min) of the windows' foreground probability."""
    patch = predictor.patch_size
    steps = [max(int(p * (1 - o)), 1) for p, o in zip(patch, predictor.window_overlap(), strict=True)]
    shape = x.shape[2:]
    high, low, count = torch.full(shape, -1.0), torch.full(shape, 2.0), torch.zeros(shape)
    with torch.inference_mode():
        for a in window_starts(shape[0], patch[0], steps[0]):
            for b in window_starts(shape[1], patch[1], steps[1]):
                for c in window_starts(shape[2], patch[2], steps[2]):
                    region = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
                    fg = torch.softmax(predict(x[(..., *region)]).float(), 1)[0, 1]
                    high[region] = torch.maximum(high[region], fg)
                    low[region] = torch.minimum(low[region], fg)
                    count[region] += 1
    several = count > 1
    return float((high - low)[several].mean()) if several.any() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--spread-volumes", type=int, default=2, help="volumes the window spread is measured on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    method, cfg = load_trained(args.checkpoint, "cpu")
    cfg = full_config({**cfg, "bf16": False})
    volumes = load_split(cfg, resolve_data_dir(cfg["data_dir"]), args.split)
    for net in method.networks.values():
        net.eval()
    pointwise = Pointwise().eval()
    rows = []
    for name, keys in SCHEDULES.items():
        run_cfg = full_config({**cfg, **keys})
        tic = time.perf_counter()
        _, summary = evaluate_volumes(method, volumes, run_cfg, torch.device("cpu"), distances=False)
        seconds = time.perf_counter() - tic
        predictor = Predictor.from_config(run_cfg, torch.device("cpu"))
        control, spread = 0.0, []
        for vol in volumes[: args.spread_volumes]:
            x = resize_image(torch.as_tensor(vol.image)[None].float(),
                             resampled_shape(tuple(vol.image.shape[1:]), predictor.resample_factor))
            with torch.inference_mode():  # the control: the schedule vs the position-independent network's forward
                blended = predictor._sliding_window(lambda w: (pointwise(w),), x)[0]
                control = max(control, float((blended - torch.softmax(pointwise(x), 1)).abs().max()))
            spread.append(window_spread(predictor, method.predict, x))
        rows.append({"schedule": name, **keys, "dice": round(100 * float(summary["overall"]["dice"]["mean"]), 2),
                     "seconds": round(seconds, 1), "position_independent_max_abs_error": control,
                     "window_spread_fg_probability": round(sum(spread) / len(spread), 4)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"checkpoint": str(args.checkpoint), "split": args.split, "method": cfg["method"],
              "cpu": cpu_model() or platform.machine(), "threads": args.threads, "precision": "fp32",
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
