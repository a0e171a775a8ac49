"""The full LA protocol has a config for every 3D method, and benchmarks/gpu_check.py runs end to end on a CPU
(`--device cpu --quick`), so the GPU check is known to run before a GPU machine is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dust.config import load_config
from dust.methods import available_methods
from dust.methods.loading import full_config

REPO = Path(__file__).resolve().parents[1]


def test_every_3d_method_has_a_full_protocol_config_named_as_the_registry_names_it():
    cpu = sorted(p.stem for p in (REPO / "configs" / "la").glob("*.yaml"))
    full = sorted(p.stem for p in (REPO / "configs" / "la_full").glob("*.yaml"))
    assert full == cpu and set(full) <= set(available_methods())
    for name in full:
        cfg = full_config(load_config(REPO / "configs" / "la_full" / f"{name}.yaml"))
        assert cfg["method"] == name
        # the papers' 112x112x80 (X, Y, Z) crops, stride 18x18x4, in dust's (S, H, W) order; full resolution
        assert (cfg["patch_size"], cfg["inference_stride"], cfg["resample_factor"], cfg["iterations"]) == (
            [80, 112, 112], [4, 18, 18], 1.0, 6000), name
        assert (cfg["batch_size"], cfg["unlabeled_batch_size"], cfg["spatial_policy"]) == (2, 2, "crop")


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_a_cpu(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["quick"] and report["cuda_tests"]["ok"]
    assert sorted(report["methods"]) == sorted(p.stem for p in (REPO / "configs" / "la_full").glob("*.yaml"))
    for name, timing in report["methods"].items():
        assert timing["s_per_it"] > 0 and timing["iterations"] == 8, name
    assert report["sliding_window"]["probabilities_sum_to_1"] and report["sliding_window"]["stride"] == [4, 18, 18]
    assert report["torchrun"]["returncode"] == 0 and report["torchrun"]["results_json"]
