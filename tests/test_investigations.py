"""Every script under benchmarks/ that reads a run still runs on today's inference and checkpoints.

Each is run as a user runs it (its ``__main__``, with arguments) on tiny phantom runs and must write its JSON;
the SSL4MIS anchors need SSL4MIS's code, so only their dust side runs here.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from dust.engine.trainer import Trainer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
INVESTIGATIONS = BENCHMARKS / "investigations"


def _run_script(path: Path, args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    runpy.run_path(str(path), run_name="__main__")


@pytest.fixture
def dust_2d_run(tiny_cfg) -> Path:
    cfg = tiny_cfg(method="dust", model="dual_unet2d", iterations=12, val_every=4, batchnorm_recalibration_batches=2)
    Trainer(cfg).fit()
    return Path(cfg["run_dir"])


def test_the_table_lists_every_investigation():
    table = (INVESTIGATIONS / "README.md").read_text()
    assert all(f"`{p.name}`" in table for p in INVESTIGATIONS.glob("*.py"))


def test_the_2d_investigations_run_on_a_dust_run(dust_2d_run: Path, phantom_root: Path, tmp_path: Path,
                                                 monkeypatch):
    best = str(dust_2d_run / "checkpoints" / "best.pt")
    runs = {
        "pseudo_label_quality.py": [str(dust_2d_run), "--recalibrate-batches", "2"],
        "reliable_split_background.py": [str(dust_2d_run)],
        "sample_uncertainty_statistics.py": [str(dust_2d_run), "--batches", "2"],
        "inference_patch_size.py": [best, "--sizes", "32", "48"],
        "empty_label_slices.py": ["--data-dir", str(phantom_root)],
    }
    for script, args in runs.items():
        out = tmp_path / f"{script}.json"
        _run_script(INVESTIGATIONS / script, [*args, "--out", str(out)], monkeypatch)
        assert json.loads(out.read_text()), script
    out = tmp_path / "batchnorm.json"
    _run_script(BENCHMARKS / "batchnorm_statistics.py", [best, "--batches", "2", "--out", str(out)], monkeypatch)
    assert json.loads(out.read_text())


def test_the_3d_investigations_run(tiny_cfg_3d, tmp_path: Path, monkeypatch):
    dust_cfg = tiny_cfg_3d(method="dust", iterations=12, val_every=4, run_dir=str(tmp_path / "dust3d"))
    Trainer(dust_cfg).fit()
    out = tmp_path / "quality.json"
    _run_script(INVESTIGATIONS / "pseudo_label_quality_3d.py", [dust_cfg["run_dir"], "--out", str(out)], monkeypatch)
    assert json.loads(out.read_text())
    for method in ("cps", "multicure"):
        cfg = tiny_cfg_3d(method=method, iterations=2, val_every=2, run_dir=str(tmp_path / method))
        Trainer(cfg).fit()
        out = tmp_path / f"{method}.json"
        _run_script(INVESTIGATIONS / "two_network_outputs.py",
                    [str(Path(cfg["run_dir"]) / "checkpoints" / "best.pt"), "--out", str(out)], monkeypatch)
        assert json.loads(out.read_text())


def test_the_ssl4mis_anchors_dust_side(phantom_root: Path, tiny_cfg_3d, la_phantom_root: Path, tmp_path: Path,
                                       monkeypatch):
    _run_script(INVESTIGATIONS / "ssl4mis_anchor.py",
                ["layout", "--data", str(phantom_root), "--out", str(tmp_path / "acdc")], monkeypatch)
    assert any((tmp_path / "acdc" / "data" / "slices").iterdir())
    log = tmp_path / "log.txt"
    log.write_text("Namespace(seed=5, labeled_num=7)\niteration 200 : mean_dice : 0.5 mean_hd95 : 9.0\n"
                   "iteration 400 : mean_dice : 0.7 mean_hd95 : 5.0\n")
    _run_script(INVESTIGATIONS / "ssl4mis_anchor.py", ["summarize", str(log), "--out", str(tmp_path / "a.json")],
                monkeypatch)
    summary = json.loads((tmp_path / "a.json").read_text())
    assert summary["runs"][0]["seed"] == 5 and summary["last_dice"]["mean"] == 70.0

    anchor_3d = runpy.run_path(str(INVESTIGATIONS / "ssl4mis_anchor_3d.py"))
    cfg = tiny_cfg_3d(method="mean_teacher")
    anchor_3d["layout_la"](cfg, la_phantom_root, tmp_path / "la")
    listed = (tmp_path / "la" / "train.txt").read_text().split() + (tmp_path / "la" / "val.txt").read_text().split()
    assert sorted(p.stem for p in (tmp_path / "la" / "data").iterdir()) == sorted(listed)
    speed = anchor_3d["dust_seconds_per_iteration"](cfg, 2, 1, tmp_path / "speed_run")
    assert speed["seconds_per_iteration"] > 0
