"""Memory and speed of the own-3D-data path: `dust prepare --dims 3` and training from data larger than memory.

1. ``prepare``: writes ``--cases`` synthetic CT volumes of 512 x 512 x 120 voxels (int16 HU, 0.8 x 0.8 x 2.5 mm: a
   body ellipse at soft-tissue values with noise, air outside, one labelled organ blob) as an nnU-Net v2 folder, then
   times `dust prepare --dims 3 --norm ct` on the first ``--prepare-cases`` of them and on all of them, each in
   its own process (wall time and the process's peak RSS).
2. ``train``: `dust train` on the prepared ``--cases`` volumes (about 5 GB as float32) for ``--iterations``
   iterations of Mean Teacher (labelled and unlabelled crops; then one validation volume by the sliding window):
   the process's peak RSS, which lazy crops keep far below the data's size.
3. ``la``: seconds per iteration of the same training step on LA fed by the in-memory `la_h5` reader and by the
   lazy `prepared_3d` reader (the LA volumes prepared from NIfTI, `benchmarks/la_as_nnunet.py`), interleaved
   step by step so both see the same machine load; the difference is the sampler's reading of crops from disk.

    python benchmarks/own_3d_scale.py --work /tmp/dust_scale --la-prepared ../la_prepared \
        --out docs/results/speed/own_3d_scale.json

Peak RSS is ``ru_maxrss`` of each child process (os.wait4), so it covers everything that process held.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (512, 512, 120)  # x, y, z
SPACING = (0.8, 0.8, 2.5)


def synthetic_ct(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16, label uint8), both (X, Y, Z): a body ellipse of soft tissue in air, an organ blob labelled 1."""
    rng = np.random.default_rng(seed)
    x, y = np.ogrid[: SHAPE[0], : SHAPE[1]]
    body = ((x - 256) / rng.uniform(200, 240)) ** 2 + ((y - 256) / rng.uniform(150, 190)) ** 2 <= 1
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[body] = 40
    noise = rng.normal(0, 20, size=SHAPE).astype(np.int16)
    hu += noise
    cx, cy, cz = rng.integers(200, 312), rng.integers(200, 312), rng.integers(30, 90)
    xs, ys, zs = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    organ = ((xs - cx) / 40.0) ** 2 + ((ys - cy) / 30.0) ** 2 + ((zs - cz) / 12.0) ** 2 <= 1
    hu[organ] += 60
    return hu, organ.astype(np.uint8)


def write_source(root: Path, cases: int) -> None:
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    affine = np.diag([*SPACING, 1.0])
    for i in range(cases):
        image, label = synthetic_ct(i)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"ct{i:03d}_0000.nii")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"ct{i:03d}.nii")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii",
                                                   "labels": {"background": 0, "organ": 1}}))


def subset(source: Path, target: Path, cases: int) -> None:
    """An nnU-Net folder of the first ``cases`` cases of ``source``, by symbolic links."""
    (target / "imagesTr").mkdir(parents=True)
    (target / "labelsTr").mkdir()
    for i in range(cases):
        for sub, name in (("imagesTr", f"ct{i:03d}_0000.nii"), ("labelsTr", f"ct{i:03d}.nii")):
            (target / sub / name).symlink_to((source / sub / name).resolve())
    shutil.copy(source / "dataset.json", target / "dataset.json")


def measured(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds and peak RSS (GiB) of that process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    return {"command": " ".join(cmd), "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}


def la_step_speed(la_cfg_path: Path, prepared: Path, steps: int, warmup: int) -> dict:
    import torch

    from dust.config import load_config
    from dust.data import load_training_data
    from dust.data.sampler import TwoStreamSampler
    from dust.methods import get_method
    from dust.methods.loading import full_config

    torch.set_num_threads(1)
    configs = {"la_h5 (in memory)": full_config({**load_config(la_cfg_path), "threads": 1}),
               "prepared_3d (crops from disk)": full_config({**load_config(prepared / "dust.yaml"),
                                                            "method": "mean_teacher", "foreground_oversample": 0.0,
                                                            "threads": 1})}
    runs = {}
    for name, cfg in configs.items():
        data = load_training_data(cfg, Path(cfg["data_dir"]) if name.startswith("prepared") else
                                  Path(os.environ["DUST_DATA"]) / "LA")
        method = get_method("mean_teacher")(cfg)
        method.build()
        optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
        sampler = TwoStreamSampler.from_config(data.labeled, data.unlabeled, cfg, seed=0)
        runs[name] = (method, optimizer, sampler, [], [])
    for step in range(warmup + steps):
        for method, optimizer, sampler, times, sample_times in runs.values():  # interleaved: one machine state
            started = time.perf_counter()
            batch = sampler.next(with_unlabeled=True)
            sampled = time.perf_counter()
            losses = method.train_step(batch, step)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            method.after_step(step)
            if step >= warmup:
                times.append(time.perf_counter() - started)
                sample_times.append(sampled - started)
    out = {name: {"s_per_iteration_median": round(statistics.median(t), 4),
                  "sampler_s_median": round(statistics.median(s), 4)} for name, (_, _, _, t, s) in runs.items()}
    a, b = (v["s_per_iteration_median"] for v in out.values())
    out["lazy_over_in_memory"] = round(b / a, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (about 11 GB with 40 cases)")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--prepare-cases", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--la-prepared", type=Path, help="LA prepared from NIfTI (benchmarks/la_as_nnunet.py)")
    parser.add_argument("--la-steps", type=int, default=30)
    parser.add_argument("--parts", nargs="+", default=["prepare", "train", "la"], choices=["prepare", "train", "la"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dust = [sys.executable, "-m", "dust"]
    env_threads = {"OMP_NUM_THREADS": "1"}
    os.environ.update(env_threads)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "date": time.strftime("%Y-%m-%d"), "threads": 1}
    source = args.work / "source"
    full = args.work / "prepared_all"
    if "prepare" in args.parts:
        shutil.rmtree(args.work, ignore_errors=True)
        started = time.perf_counter()
        write_source(source, args.cases)
        result["synthetic_cases"] = {"cases": args.cases, "shape_xyz": SHAPE, "spacing_mm": SPACING,
                                     "write_seconds": round(time.perf_counter() - started, 1)}
        subset(source, args.work / "source_subset", args.prepare_cases)
        labeled = str(min(8, args.prepare_cases - 1))
        common = ["prepare", "--dims", "3", "--norm", "ct", "--val", "1", "--labeled", labeled]
        result[f"prepare_{args.prepare_cases}"] = measured(
            [*dust, *common, "--source", str(args.work / "source_subset"), "--out", str(args.work / "prepared_sub")])
        result[f"prepare_{args.cases}"] = measured([*dust, *common, "--source", str(source), "--out", str(full)])
        stored = sum(p.stat().st_size for p in (full / "cases").glob("*.h5"))
        result["prepared_gib"] = round(stored / 2**30, 2)
        shutil.rmtree(args.work / "prepared_sub")
    if "train" in args.parts:
        result["train"] = measured([*dust, "train", "--config", str(full / "dust.yaml"), "--set", "method=mean_teacher",
                                    "--set", f"iterations={args.iterations}", "--set", f"val_every={args.iterations}",
                                    "--set", "threads=1", "--set", "progress=false", "--set", "tensorboard=false",
                                    "--set", f"run_dir={args.work / 'run'}"])
        result["train"]["iterations"] = args.iterations
    if "la" in args.parts and args.la_prepared:
        repo = Path(__file__).resolve().parents[1]
        result["la_step_speed"] = la_step_speed(repo / "configs" / "la" / "mean_teacher.yaml", args.la_prepared,
                                                args.la_steps, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
