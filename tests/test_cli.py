"""The command line as a user runs it: train -> evaluate, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dust.cli.main import main
from dust.config import resolve_bf16

# what `bf16: auto` resolves to on this machine (bf16 only where the CPU computes it natively)
NATIVE_PRECISION = "bf16" if resolve_bf16("auto", "cpu") else "fp32"


def _write_config(tmp_path: Path, phantom_root: Path) -> Path:
    cfg = {
        "data_dir": str(phantom_root.resolve()), "labeled_patients": 2, "patch_size": [32, 32],
        "channels": [4, 8, 16, 32, 64], "batch_size": 4, "iterations": 10, "val_every": 5, "threads": 1,
        "tensorboard": False, "progress": False, "run_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_then_evaluate(tmp_path: Path, phantom_root: Path, capsys):
    config = _write_config(tmp_path, phantom_root)
    record = tmp_path / "results.json"
    assert main(["train", "--config", str(config), "--set", "seed=3", "--record", str(record)]) == 0
    records = json.loads(record.read_text())
    assert {r["checkpoint"] for r in records} == {"last", "best"}
    assert records[0]["seed"] == 3 and "dust train --config" in records[0]["command"]
    run = tmp_path / "run"
    for name in ("config.yaml", "train.log", "metrics_val_last.csv", "metrics_val_best.json", "results.json"):
        assert (run / name).is_file(), name
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--split", "test"]) == 0
    summary = json.loads((run / "metrics_test_best.json").read_text())
    assert summary["n_cases"] == 2 and set(summary["per_class"]) == {"RV", "Myo", "LV"}
    md = tmp_path / "table.md"
    merged = tmp_path / "merged.json"
    assert main(["results", "--json", str(merged), "--markdown", str(md), "--add", str(run)]) == 0
    assert json.loads(merged.read_text()) == records
    assert f"| supervised | 2 | 10, val, {NATIVE_PRECISION}, bilinear, bilinear | 3 | 1 |" in md.read_text()


def test_a_resumed_run_is_credited_to_the_command_that_started_it(tmp_path: Path, phantom_root: Path):
    config = _write_config(tmp_path, phantom_root)
    record = tmp_path / "results.json"
    assert main(["train", "--config", str(config), "--set", "iterations=5", "--record", str(record)]) == 0
    started = json.loads(record.read_text())[0]["command"]
    # a killed or finished run is continued with --resume (here to more iterations); the result is credited to
    # the command that started it plus the resume's overrides
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "iterations=10"]) == 0
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "--config" in started and {r["command"] for r in resumed} == {started + " --set iterations=10"}
    assert resumed[0]["iterations"] == 10


def test_errors_are_one_clear_line(tmp_path: Path, phantom_root: Path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    config = _write_config(tmp_path, phantom_root)
    assert main(["train", "--config", str(config), "--set", "labeled_patients=99"]) == 2
    assert "99 labelled patients requested" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(config)]) == 2
    assert "not a readable dust checkpoint" in capsys.readouterr().err
    for command in (["results"], ["benchmark", "--methods", "supervised"]):  # both name the protocols there are
        assert main([*command, "--protocol", "acdc-gpu"]) == 2
        assert "unknown protocol 'acdc-gpu'; known: ['acdc-cpu', 'la-cpu']" in capsys.readouterr().err


NAN_AT_7 = """
from dust.methods.supervised import Supervised


class TurnsNaN(Supervised):
    def train_step(self, batch, iteration):
        losses = super().train_step(batch, iteration)
        return {"sup": losses["sup"] * (float("nan") if iteration == 7 else 1.0)}
"""


def test_a_nan_is_reported_as_one_line_naming_iteration_and_term(tmp_path: Path, phantom_root: Path, capsys,
                                                                  monkeypatch):
    (tmp_path / "turns_nan.py").write_text(NAN_AT_7)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _write_config(tmp_path, phantom_root)
    assert main(["train", "--config", str(config), "--set", "method=turns_nan:TurnsNaN"]) == 2
    err = capsys.readouterr().err
    assert "iteration 7: loss term(s) ['sup'] are not finite" in err
    assert "Traceback" not in err


def test_demo_prints_per_class_dice_and_chance(tmp_path: Path, capsys):
    tiny = ["iterations=15", "val_every=5", "patch_size=[32,32]", "channels=[4,8,16,32,64]", "threads=1",
            "tensorboard=false", "progress=false", f"data_dir={tmp_path / 'phantom'}"]
    assert main(["demo", "--out", str(tmp_path / "demo"), *[a for kv in tiny for a in ("--set", kv)]]) == 0
    out = capsys.readouterr().out
    for name in ("RV", "Myo", "LV", "mean", "chance"):
        assert name in out
    assert (tmp_path / "phantom" / "train_slices.list").is_file()  # generated on first use
    assert "dust on the synthetic cardiac phantom" in out  # the default demo runs the headline method
    assert (tmp_path / "demo" / "sample_uncertainty.csv").is_file()


def test_set_reads_numbers_yaml_1_1_leaves_as_strings_and_refuses_words():
    from dust.config import ConfigError, load_config, resolve_config

    cfg = resolve_config(load_config(None, ["lr=1e-5", "iterations=40.0"]), {})
    assert cfg["lr"] == 1e-5 and isinstance(cfg["lr"], float)
    assert cfg["iterations"] == 40 and isinstance(cfg["iterations"], int)
    with pytest.raises(ConfigError, match="lr: expected a number"):
        resolve_config(load_config(None, ["lr=fast"]), {})
