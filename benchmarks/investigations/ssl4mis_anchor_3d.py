"""dust beside SSL4MIS's 3D code on one machine, in one run: training speed and sliding-window inference on LA.

dust does not ship SSL4MIS's code. Given an SSL4MIS checkout (HiLab-git/SSL4MIS) and a Python that has its
dependencies (torch, tensorboardX, medpy, SimpleITK, scikit-image, h5py), this script copies SSL4MIS's ``code/``
folder into a temporary directory, applies the edits below (printed into the JSON), and times it beside dust:

    python benchmarks/investigations/ssl4mis_anchor_3d.py --ssl4mis /path/to/SSL4MIS \\
        --ssl4mis-python /path/to/venv/bin/python \\
        --run runs/la/supervised_8p_seed1337 --out docs/results/speed/throughput_la.json

1. **Training**: SSL4MIS's ``train_mean_teacher_3D.py`` (VNet, batch 4 = 2 labelled + 2 unlabelled, crops of
   64x64x32 voxels of the full-resolution volumes, its own data loader with 4 workers) against dust's
   ``mean_teacher`` on the LA CPU protocol (the same network and batch, crops of 32x64x64 (S, H, W) of volumes
   resampled by 0.5: the same input size), both fp32 and one thread; the mean (and median) seconds per iteration after a
   warm-up. SSL4MIS's is read from the timestamps of its per-iteration log lines, dust's from the trainer's step
   hook (both include sampling, augmentation, forward, backward and the optimiser step).
2. **Inference of one LA volume at full resolution** (the first validation volume, randomly initialised VNets
   in eval mode: the time does not depend on the weights), fp32, one thread: SSL4MIS's ``test_single_case``
   (its NumPy window loop, patch 112x112x80, stride 18x18x4) against dust's ``Predictor`` (MONAI's sliding window)
   (a) at that patch and stride with plain averaging, and (b) at dust's default overlap 0.5 with Gaussian blending.
3. **Dice of (a) and (b)**: a model trained on the LA CPU protocol (``--run``) scored on the validation volumes
   with its own patch (32x64x64) at the papers' stride scaled to that patch (2x10x10: 4/80 and 18/112 of the
   patch, constant blending) and at the default (overlap 0.5, Gaussian). No full-resolution model can be trained
   on this CPU; the comparison is of the window schedule, which is what (a) and (b) differ in. The papers' stride
   with Gaussian blending is scored too, to tell the window density from the blending.

Edits to SSL4MIS (none touches the model, loss, optimiser, schedule, augmentation or sampling): every ``.cuda()``
removed and ``pin_memory=False`` (a CPU run); ``--patch_size`` read as three ints (it is declared ``type=list``);
``--threads`` (``torch.set_num_threads``); the unlabelled indices run to the dataset's length instead of
BraTS's 250; the image summaries (torchvision's ``make_grid``) skipped; ``torchvision.transforms.Compose``
replaced by a three-line equivalent when torchvision is missing; the deprecated ``Tensor.add_(Number, Tensor)``
in the EMA update written ``add_(Tensor, alpha=Number)`` (the same arithmetic; newer PyTorch refuses the old form).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from dust.config import load_config
from dust.data import load_split
from dust.data.la import split_ids
from dust.engine.evaluation import dice_percent, evaluate_volumes
from dust.engine.trainer import Trainer
from dust.inference import Predictor
from dust.methods.loading import full_config, load_trained
from dust.models import make_model

REPO = Path(__file__).resolve().parents[2]
SSL4MIS_STRIDE, SSL4MIS_PATCH = (18, 4), (112, 112, 80)  # (xy, z) and (X, Y, Z), test_single_case's arguments
TRAIN_EDITS = [  # (what SSL4MIS's train_mean_teacher_3D.py says, what the CPU run says instead)
    ("parser.add_argument('--patch_size', type=list,", "parser.add_argument('--patch_size', type=int, nargs=3,"),
    ("args = parser.parse_args()\n",
     "parser.add_argument('--threads', type=int, default=1)\nargs = parser.parse_args()\n"
     "torch.set_num_threads(args.threads)\n"),
    ("list(range(args.labeled_num, 250))", "list(range(args.labeled_num, len(db_train)))"),
    ("pin_memory=True", "pin_memory=False"),
    ("if iter_num % 20 == 0:", "if False:  # image summaries skipped"),
    ("ema_param.data.mul_(alpha).add_(1 - alpha, param.data)",
     "ema_param.data.mul_(alpha).add_(param.data, alpha=1 - alpha)"),
]
COMPOSE_SHIM = """
class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, sample):
        for t in self.transforms:
            sample = t(sample)
        return sample
"""


def prepare_ssl4mis(checkout: Path, work: Path) -> Path:
    """SSL4MIS's ``code/`` copied into ``work`` with the CPU edits; returns that folder."""
    code = work / "code"
    if (checkout / "code").is_dir():
        shutil.copytree(checkout / "code", code, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    else:  # a bare snapshot (git directory without a work tree)
        code.mkdir(parents=True)
        archive = subprocess.run(["git", "--git-dir", str(checkout), "archive", "HEAD", "code"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    for path in code.rglob("*.py"):
        text = path.read_text()
        if ".cuda()" in text:
            path.write_text(text.replace(".cuda()", ""))
    script = code / "train_mean_teacher_3D.py"
    text = script.read_text()
    for old, new in TRAIN_EDITS:
        if old not in text:
            raise SystemExit(f"{script}: expected {old!r} (another SSL4MIS version?); update TRAIN_EDITS")
        text = text.replace(old, new)
    script.write_text(text)
    return code


def ssl4mis_python_has_torchvision(python: str) -> bool:
    return subprocess.run([python, "-c", "import torchvision"], capture_output=True).returncode == 0


def shim_torchvision(code: Path) -> None:
    """A ``torchvision`` with only what the training script uses (Compose; make_grid is never called)."""
    pkg = code / "torchvision"
    (pkg / "utils").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "transforms.py").write_text(COMPOSE_SHIM)
    (pkg / "utils" / "__init__.py").write_text("def make_grid(*args, **kwargs):\n    raise NotImplementedError\n")


def layout_la(cfg: dict, data: Path, out: Path) -> None:
    """The LA cases as SSL4MIS's ``BraTS2019`` dataset reads them (``data/<id>.h5``, ``train.txt``, ``val.txt``):
    dust's labelled cases first, then its unlabelled pool, so ``--labeled_num`` picks the same labelled volumes."""
    split = split_ids(data, int(cfg["labeled_patients"]), cfg["val_split"], int(cfg["holdout_cases"]))
    (out / "data").mkdir(parents=True, exist_ok=True)
    ids = split["labeled"] + split["unlabeled"]
    for case in ids + split["eval"]:
        link = out / "data" / f"{case}.h5"
        if not link.exists():
            link.symlink_to((data / "volumes" / case / "mri_norm2.h5").resolve())
    (out / "train.txt").write_text("\n".join(ids) + "\n")
    (out / "val.txt").write_text("\n".join(split["eval"]) + "\n")


def ssl4mis_seconds_per_iteration(python: str, code: Path, root: Path, labeled: int, iterations: int,
                                  warmup: int) -> dict:
    command = [python, "train_mean_teacher_3D.py", "--root_path", str(root), "--exp", "LA/speed", "--model", "vnet",
               "--max_iterations", str(warmup + iterations + 1), "--labeled_num", str(labeled), "--batch_size", "4",
               "--labeled_bs", "2", "--patch_size", "64", "64", "32", "--threads", "1"]
    done = subprocess.run(command, cwd=code, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"SSL4MIS's training failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    log = (code.parent / "model" / f"LA/speed_{labeled}" / "vnet" / "log.txt").read_text()
    stamps = []
    for line in log.splitlines():
        match = re.match(r"\[(\d+):(\d+):(\d+)\.(\d+)\] iteration \d+ : loss", line)
        if match:
            h, m, s, ms = (int(g) for g in match.groups())
            stamps.append(h * 3600 + m * 60 + s + ms / 1000)
    steps = [b - a for a, b in zip(stamps[warmup:-1], stamps[warmup + 1 :], strict=True)]
    return {**step_statistics(steps), "command": " ".join(command[1:])}


def dust_seconds_per_iteration(cfg: dict, iterations: int, warmup: int, run_dir: Path) -> dict:
    cfg = {**cfg, "iterations": warmup + iterations + 1, "val_every": warmup + iterations + 1, "run_dir": str(run_dir)}
    trainer = Trainer(cfg)
    stamps: list[float] = []
    original = trainer.method.after_step

    def stamped(iteration: int) -> None:
        original(iteration)
        stamps.append(time.perf_counter())

    trainer.method.after_step = stamped
    trainer.fit()
    steps = [b - a for a, b in zip(stamps[warmup:-1], stamps[warmup + 1 :], strict=True)]
    return step_statistics(steps)


def step_statistics(steps: list[float]) -> dict:
    """Mean seconds per iteration (the speed-up's basis: it counts SSL4MIS's data-loader restarts at every epoch,
    which at 8 labelled volumes and 2 per batch is every 4 iterations) and the median (a step's own cost)."""
    return {"seconds_per_iteration": round(statistics.mean(steps), 4),
            "median_seconds_per_iteration": round(statistics.median(steps), 4), "iterations_timed": len(steps)}


SSL4MIS_INFERENCE = """
import sys, time, h5py, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, {code!r})
from networks.vnet import VNet
from test_3D_util import test_single_case
torch.manual_seed(0)
net = VNet(n_channels=1, n_classes=2, normalization="batchnorm", has_dropout=True).eval()
image = h5py.File({h5!r}, "r")["image"][:]
tic = time.perf_counter()
test_single_case(net, image, {stride_xy}, {stride_z}, {patch}, num_classes=2)
print(time.perf_counter() - tic)
"""


def inference_seconds(args: argparse.Namespace, code: Path, cfg: dict, h5: Path) -> dict:
    script = SSL4MIS_INFERENCE.format(code=str(code), h5=str(h5), stride_xy=SSL4MIS_STRIDE[0],
                                      stride_z=SSL4MIS_STRIDE[1], patch=SSL4MIS_PATCH)
    done = subprocess.run([args.ssl4mis_python, "-c", textwrap.dedent(script)], check=True, capture_output=True,
                          text=True)
    ssl4mis = float(done.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    full = {**cfg, "patch_size": [80, 112, 112], "channels": [16, 32, 64, 128, 256]}
    net = make_model(full).eval()
    import h5py

    with h5py.File(h5) as f:
        image = torch.from_numpy(f["image"][:]).permute(2, 1, 0)[None].contiguous()  # (1, Z, Y, X) as dust reads it
    timings = {}
    for name, kw in {"same_stride": {"stride": (4, 18, 18), "blend": "constant"},
                     "default": {"overlap": float(cfg["inference_overlap"]), "blend": "gaussian"}}.items():
        predictor = Predictor((80, 112, 112), torch.device("cpu"), bf16=False, channels_last=True,
                              spatial_policy="crop", **kw)
        tic = time.perf_counter()
        predictor.case(lambda x: (net(x),), image)
        timings[name] = time.perf_counter() - tic
    return {"volume_shape_xyz": list(image.shape[1:][::-1]), "ssl4mis_seconds": round(ssl4mis, 2),
            "dust_same_stride_seconds": round(timings["same_stride"], 2),
            "dust_default_seconds": round(timings["default"], 2)}


def dice_of_window_schedules(run_dir: Path, data: Path) -> dict:
    method, cfg = load_trained(run_dir / "checkpoints" / "best.pt")
    cfg = {**cfg, "data_dir": str(data), "threads": 1}
    volumes = load_split(cfg, data, cfg["val_split"])
    patch = cfg["patch_size"]
    stride = [max(1, round(patch[0] * 4 / 80)), *[max(1, round(p * 18 / 112)) for p in patch[1:]]]
    out = {"checkpoint": str(run_dir / "checkpoints" / "best.pt"), "patch_size": patch, "papers_stride_scaled": stride,
           "precision": "bf16" if cfg["bf16"] else "fp32"}
    # the third schedule separates the two differences between (a) and (b): window density and blending
    for name, extra in {"same_stride": {"inference_stride": stride, "inference_blend": "constant"},
                        "same_stride_gaussian": {"inference_stride": stride, "inference_blend": "gaussian"},
                        "default": {"inference_stride": None, "inference_blend": "gaussian"}}.items():
        tic = time.perf_counter()
        _, summary = evaluate_volumes(method, volumes, {**cfg, **extra}, torch.device("cpu"), distances=False)
        out[f"{name}_dice"] = dice_percent(summary, 3)["dice"]
        out[f"{name}_seconds"] = round(time.perf_counter() - tic, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ssl4mis", type=Path, required=True, help="SSL4MIS checkout (or bare git snapshot)")
    parser.add_argument("--ssl4mis-python", default=sys.executable, help="a Python with SSL4MIS's dependencies")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DUST_DATA", REPO.parent / "shared/data"))
                        / "LA")
    parser.add_argument("--run", type=Path, required=True, help="a finished LA CPU-protocol run (for the Dice)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "docs/results/speed/throughput_la.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = full_config(load_config(REPO / "configs/la/mean_teacher.yaml", [
        f"data_dir={args.data}", "bf16=false", "threads=1", "tensorboard=false", "progress=false"]))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        code = prepare_ssl4mis(args.ssl4mis, work)
        if not ssl4mis_python_has_torchvision(args.ssl4mis_python):
            shim_torchvision(code)
        layout_la(cfg, args.data, work / "LA")
        print("training: SSL4MIS train_mean_teacher_3D.py ...", flush=True)
        ssl4mis_train = ssl4mis_seconds_per_iteration(args.ssl4mis_python, code, work / "LA",
                                                      int(cfg["labeled_patients"]), args.iterations, args.warmup)
        print(f"  {ssl4mis_train['seconds_per_iteration']} s/it; dust mean_teacher ...", flush=True)
        dust_train = dust_seconds_per_iteration(cfg, args.iterations, args.warmup, work / "dust_run")
        print(f"  {dust_train['seconds_per_iteration']} s/it; inference of one volume ...", flush=True)
        first_val = split_ids(args.data, int(cfg["labeled_patients"]), cfg["val_split"],
                              int(cfg["holdout_cases"]))["eval"][0]
        inference = inference_seconds(args, code, cfg, args.data / "volumes" / first_val / "mri_norm2.h5")
        print(f"  {inference}; Dice of the two window schedules ...", flush=True)
    dice = dice_of_window_schedules(args.run, args.data)
    result = {
        "command": f"python benchmarks/investigations/ssl4mis_anchor_3d.py --ssl4mis SSL4MIS --ssl4mis-python PYTHON "
                   f"--run {args.run} "
                   f"--iterations {args.iterations} --warmup {args.warmup} --out {args.out}",
        "train_speedup": round(ssl4mis_train["seconds_per_iteration"] / dust_train["seconds_per_iteration"], 3),
        "inference_speedup_same_stride": round(inference["ssl4mis_seconds"] / inference["dust_same_stride_seconds"], 3),
        "inference_speedup_default": round(inference["ssl4mis_seconds"] / inference["dust_default_seconds"], 3),
        "default_dice_delta": round(dice["default_dice"] - dice["same_stride_dice"], 3),
        "training": {"ssl4mis": ssl4mis_train, "dust": dust_train, "precision": "fp32", "threads": 1},
        "inference": {**inference, "precision": "fp32", "threads": 1, "patch_xyz": list(SSL4MIS_PATCH),
                      "stride_xyz": [SSL4MIS_STRIDE[0], SSL4MIS_STRIDE[0], SSL4MIS_STRIDE[1]]},
        "dice": dice,
        "ssl4mis_edits": [f"{old!r} -> {new!r}" for old, new in TRAIN_EDITS] + ["every .cuda() removed"],
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())},
        "numpy": np.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if "speedup" in k or "delta" in k}, indent=2))


if __name__ == "__main__":
    main()
