"""The scripts under benchmarks/ that read a finished run still run on today's inference and checkpoints.

Each is run as a user runs it (its ``__main__``, with arguments) on tiny phantom runs and must write its JSON.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

from dust.engine.trainer import Trainer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run_script(path: Path, args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    runpy.run_path(str(path), run_name="__main__")


def test_batchnorm_statistics_reads_a_2d_run(tiny_cfg, tmp_path: Path, monkeypatch):
    cfg = tiny_cfg(method="dust", model="dual_unet2d", iterations=12, val_every=4, batchnorm_recalibration_batches=2)
    Trainer(cfg).fit()
    out = tmp_path / "batchnorm.json"
    best = str(Path(cfg["run_dir"]) / "checkpoints" / "best.pt")
    _run_script(BENCHMARKS / "batchnorm_statistics.py", [best, "--batches", "2", "--out", str(out)], monkeypatch)
    assert json.loads(out.read_text())


def test_two_network_outputs_reads_3d_two_network_runs(tiny_cfg_3d, tmp_path: Path, monkeypatch):
    for method in ("cps", "multicure"):
        cfg = tiny_cfg_3d(method=method, iterations=2, val_every=2, run_dir=str(tmp_path / method))
        Trainer(cfg).fit()
        out = tmp_path / f"{method}.json"
        _run_script(BENCHMARKS / "two_network_outputs.py",
                    [str(Path(cfg["run_dir"]) / "checkpoints" / "best.pt"), "--out", str(out)], monkeypatch)
        assert json.loads(out.read_text())
