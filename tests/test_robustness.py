"""Long runs a user can trust: a kill -9 loses no work, broken data is refused before training, NaN stops cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from dust.cli.main import main
from dust.data import check_data
from dust.data.types import DataError
from dust.engine.checkpoint import iteration_checkpoints, load_checkpoint, load_latest
from dust.engine.trainer import NonFiniteLossError, Trainer
from dust.workflows import train


# ---------------------------------------------------------------------------------------------- check-data
def _h5(path: Path, **arrays: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value


def _read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


# Each breaks a copy of the tiny phantom (labelled patients: patient001-002; val: patient005) and returns the
# config overrides it needs and the text its one problem line must hold (the file name is checked separately).
def _missing_slice(root: Path) -> tuple[dict, str, str]:
    (root / "data" / "patient002_frame01_slice_1.h5").unlink()
    return {}, "patient002_frame01_slice_1.h5", "file not found (listed in train_slices.list)"


def _corrupt_h5(root: Path) -> tuple[dict, str, str]:
    path = root / "data" / "patient003_frame02_slice_0.h5"  # unlabelled pool: its image is still read
    path.write_bytes(path.read_bytes()[:200])
    return {}, path.name, "cannot read h5 file"


def _shape_mismatch(root: Path) -> tuple[dict, str, str]:
    path = root / "data" / "patient001_frame01_slice_2.h5"
    arrays = _read(path)
    _h5(path, image=arrays["image"], label=arrays["label"][:-3])
    return {}, path.name, "does not match label shape"


def _label_outside_classes(root: Path) -> tuple[dict, str, str]:
    path = root / "data" / "patient005_frame01.h5"
    arrays = _read(path)
    arrays["label"][0, 0, 0] = 7
    _h5(path, **arrays)
    return {}, path.name, "label values [0, 1, 2, 3, 7] outside the configured classes 0..3"


def _nan_intensity(root: Path) -> tuple[dict, str, str]:
    path = root / "data" / "patient004_frame01_slice_0.h5"
    arrays = _read(path)
    arrays["image"][3, 4] = np.nan
    arrays["image"][5, 6] = np.inf
    _h5(path, **arrays)
    return {}, path.name, "image contains 2 NaN or Inf value(s)"


def _three_channel_slice(root: Path) -> tuple[dict, str, str]:
    path = root / "data" / "patient002_frame02_slice_1.h5"
    arrays = _read(path)
    _h5(path, image=np.stack([arrays["image"]] * 3), label=arrays["label"])
    return {}, path.name, "image has 3 channel(s) but the config's in_channels is 1"


def _no_label_in_labelled_slice(root: Path) -> tuple[dict, str, str]:
    path = root / "data" / "patient001_frame02_slice_0.h5"
    _h5(path, image=_read(path)["image"])
    return {}, path.name, "no 'label' dataset but the case is labelled"


def _too_many_labelled(root: Path) -> tuple[dict, str, str]:
    return {"labeled_patients": 9}, "train_slices.list", "9 labelled patients requested but the list has only 4"


def _patient_in_two_splits(root: Path) -> tuple[dict, str, str]:
    shutil.copy(root / "data" / "patient005_frame01.h5", root / "data" / "patient003_frame01.h5")
    with (root / "val.list").open("a") as f:
        f.write("patient003_frame01\n")
    return {}, "val.list", "patient patient003 is also in train_slices.list"


def _missing_list(root: Path) -> tuple[dict, str, str]:
    (root / "val.list").unlink()
    return {}, "val.list", "list file not found"


PROBLEMS: list[Callable[[Path], tuple[dict, str, str]]] = [
    _missing_slice, _corrupt_h5, _shape_mismatch, _label_outside_classes, _nan_intensity, _three_channel_slice,
    _no_label_in_labelled_slice, _too_many_labelled, _patient_in_two_splits, _missing_list,
]


@pytest.fixture
def phantom_copy(phantom_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(phantom_root, tmp_path / "phantom"))


def test_the_intact_phantom_has_no_problems(tiny_cfg):
    assert check_data(tiny_cfg()) == []


@pytest.mark.parametrize("breaks", PROBLEMS, ids=lambda f: f.__name__.strip("_"))
def test_each_problem_is_one_line_naming_the_file(breaks, phantom_copy: Path, tiny_cfg):
    overrides, file_name, text = breaks(phantom_copy)
    problems = check_data(tiny_cfg(data_dir=str(phantom_copy), **overrides))
    assert len(problems) == 1, problems
    assert file_name in problems[0] and text in problems[0] and "\n" not in problems[0]


def test_every_problem_is_reported_and_training_never_starts(phantom_copy: Path, tiny_cfg, tmp_path: Path, capsys):
    expected = [breaks(phantom_copy) for breaks in (_missing_slice, _corrupt_h5, _patient_in_two_splits,
                                                    _label_outside_classes, _nan_intensity)]
    cfg = tiny_cfg(data_dir=str(phantom_copy))
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump({k: cfg[k] for k in ("data_dir", "labeled_patients", "run_dir")}))

    assert main(["check-data", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == len(expected) + 1 and "5 problem(s)" in lines[-1]
    for _, file_name, text in expected:
        assert any(file_name in line and text in line for line in lines), (file_name, lines)

    with pytest.raises(DataError, match="5 problem"):
        train(cfg)
    assert not Path(cfg["run_dir"]).exists()  # refused before the run directory was made


def test_check_data_passes_on_a_usable_dataset(phantom_root: Path, tmp_path: Path, capsys):
    config = tmp_path / "ok.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(phantom_root), "labeled_patients": 2}))
    assert main(["check-data", "--config", str(config)]) == 0
    assert "usable" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- kill -9
# A method that is plain supervised training, except that when $KILL_DURING_CHECKPOINT names an iteration its
# checkpoint state holds an object that SIGKILLs the process while torch.save serialises it: a kill that lands
# inside a checkpoint write, after the temp file exists and before the rename.
KILLABLE = '''
import os
import signal

from dust.methods.supervised import Supervised


def _killed_instead(fd):
    os.kill(os.getpid(), signal.SIGKILL)


class KillableSupervised(Supervised):
    def train_step(self, batch, iteration):
        self.completed = iteration + 1
        return super().train_step(batch, iteration)

    def extra_state(self):
        # the checkpoint being built is serialised, then written; the process dies before its data is synced
        if os.environ.get("KILL_DURING_CHECKPOINT") == str(getattr(self, "completed", 0)):
            os.fsync = _killed_instead
        return {}
'''


def _tiny_config(tmp_path: Path, phantom_root: Path, run_dir: Path, **overrides) -> Path:
    cfg = {
        "method": "killable_method:KillableSupervised", "data_dir": str(phantom_root.resolve()),
        "labeled_patients": 2, "patch_size": [32, 32], "channels": [4, 8, 16, 32, 64], "batch_size": 4,
        "iterations": 24, "val_every": 4, "keep_checkpoints": 2, "threads": 1, "tensorboard": False,
        "progress": False, "run_dir": str(run_dir), **overrides,
    }
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _dust(args: list[str], tmp_path: Path, **env: str) -> subprocess.Popen:
    """``python -m dust ARGS`` in a child process that can import the test's method module; output to a file."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), **env}
    with (tmp_path / "child.log").open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "dust", *args], env=env, stdout=out, stderr=out)


def _networks(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    return {f"{net}.{k}": v for net, sd in state["networks"].items() for k, v in sd.items()}


def test_sigkill_at_any_point_then_resume_equals_the_uninterrupted_run(tmp_path: Path, phantom_root: Path,
                                                                        monkeypatch):
    (tmp_path / "killable_method.py").write_text(textwrap.dedent(KILLABLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "killed"
    ckpt = run / "checkpoints"
    config = _tiny_config(tmp_path, phantom_root, run)

    # 1. SIGKILL from outside as soon as the first checkpoint is on disk
    proc = _dust(["train", "--config", str(config)], tmp_path)
    deadline = time.monotonic() + 300
    while not list(ckpt.glob("iter_*.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = iteration_checkpoints(ckpt)[0]
    killed_at = load_checkpoint(newest)["iteration"]
    assert proc.returncode == -signal.SIGKILL and killed_at < 20, (tmp_path / "child.log").read_text()

    # 2. resume; this time the process dies inside the write of iteration 20's checkpoint
    # (a run's own method class is named again on resume: its config.yaml alone imports no code)
    own_method = ["--set", "method=killable_method:KillableSupervised"]
    proc = _dust(["train", "--resume", str(run), *own_method], tmp_path, KILL_DURING_CHECKPOINT="20")
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "child.log").read_text()
    assert list(ckpt.glob(".iter_0000020.pt.*.tmp")), "the kill should have landed inside the write"
    assert [p.name for p in iteration_checkpoints(ckpt)] == ["iter_0000016.pt", "iter_0000012.pt"]
    assert load_latest(ckpt)[0]["iteration"] == 16  # the last good checkpoint is whole

    # 3. resume again to the end
    proc = _dust(["train", "--resume", str(run), *own_method], tmp_path)
    proc.wait(timeout=300)
    assert proc.returncode == 0, (tmp_path / "child.log").read_text()
    assert not list(ckpt.glob(".*.tmp"))  # leftovers of the cut write are cleaned up

    # the same config trained without interruption (in this process: same build, same single thread)
    reference = _tiny_config(tmp_path, phantom_root, tmp_path / "reference")
    assert main(["train", "--config", str(reference)]) == 0
    ref_ckpt = tmp_path / "reference" / "checkpoints"
    for name in ("iter_0000024.pt", "best.pt"):
        got, want = _networks(ckpt / name), _networks(ref_ckpt / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert load_checkpoint(ckpt / "iter_0000024.pt")["history"] == load_checkpoint(
        ref_ckpt / "iter_0000024.pt")["history"]
    sys.modules.pop("killable_method", None)


def test_dust_resumed_before_its_stage_boundaries_matches_the_uninterrupted_run(tiny_cfg, tmp_path: Path):
    # 20 iterations: pretrain 0-8 (snapshots after 3, 5, 8), stage1 8-14, stage2 14-20; checkpoints every 6
    kw = dict(method="dust", val_every=6, keep_checkpoints=10)
    full = Trainer(tiny_cfg(run_dir=str(tmp_path / "full"), **kw))
    full.fit()
    # what a kill at iteration 7 leaves: checkpoint 6 and the snapshots k=1, 2; nothing of the later stages
    cut = tmp_path / "cut" / "checkpoints"
    cut.mkdir(parents=True)
    for name in ("iter_0000006.pt", "pretrain_k1.pt", "pretrain_k2.pt"):
        shutil.copy(full.ckpt_dir / name, cut / name)
    state = load_checkpoint(cut / "iter_0000006.pt")
    assert state["started_stage"] == 0 and state["method_state"]["pseudo_labels"] is None

    resumed = Trainer(tiny_cfg(run_dir=str(tmp_path / "cut"), **kw))
    assert resumed.resume() and resumed.iteration == 6 and resumed.current_span().stage.name == "pretrain"
    resumed.fit()  # crosses pretrain -> stage1 -> stage2
    assert resumed.history == full.history
    assert torch.equal(resumed.method.order, full.method.order)
    for a, b in zip(resumed.method.networks["model"].state_dict().values(),
                    full.method.networks["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(full.method.pseudo_labels,
                                                  resumed.sampler.pseudo_labels, strict=True))
    assert (resumed.run_dir / "sample_uncertainty.csv").read_text() == (
        full.run_dir / "sample_uncertainty.csv").read_text()


# ---------------------------------------------------------------------------------------------- NaN guard
NAN_AT_15 = '''
from dust.methods.supervised import Supervised


class AuxTermTurnsNaN(Supervised):
    def train_step(self, batch, iteration):
        losses = super().train_step(batch, iteration)
        losses["aux"] = 0.1 * losses["sup"] * (float("nan") if iteration == 15 else 1.0)
        return losses
'''


def test_a_nan_stops_the_run_naming_iteration_and_term_and_keeps_the_last_checkpoint(tiny_cfg, tmp_path: Path,
                                                                                       monkeypatch):
    (tmp_path / "nan_at_15.py").write_text(textwrap.dedent(NAN_AT_15))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_cfg(method="nan_at_15:AuxTermTurnsNaN", iterations=30, val_every=10)
    trainer = Trainer(cfg)
    with pytest.raises(NonFiniteLossError, match=r"iteration 15: loss term\(s\) \['aux'\] are not finite"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.method.parameters())  # the bad step never ran
    assert [p.name for p in iteration_checkpoints(trainer.ckpt_dir)] == ["iter_0000010.pt"]
    state, _ = load_latest(trainer.ckpt_dir)
    assert state["iteration"] == 10
    assert all(torch.isfinite(v).all() for v in state["networks"]["model"].values() if v.is_floating_point())
    again = Trainer(cfg)  # and a resumed run starts from it
    assert again.resume() and again.iteration == 10
    sys.modules.pop("nan_at_15", None)


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("setting, message", [
    ("val_every=0", "val_every: 0 is out of range"), ("batch_size=0", "batch_size: 0 is out of range"),
    ("patch_size=abc", "patch_size 'abc'"), ("lr=-1", "lr: -1.0 is out of range"),
    ("iterations=10.5", "iterations: expected a whole number, got 10.5"), ("momentum=2", "momentum: 2.0 is out"),
    ("unlabeled_batch_size=-2", "unlabeled_batch_size: -2 is out of range"),
    ("labeled_patients=0", "labeled_patients: 0 is out of range"),  # an empty labelled set
])
def test_a_bad_setting_is_one_line_naming_the_key_and_no_run_directory_is_made(setting, message, tmp_path: Path,
                                                                                 capsys):
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"generate_phantom": True, "data_dir": str(tmp_path / "data"),
                                      "run_dir": str(run_dir)}))
    code = main(["train", "--config", str(config), "--set", setting])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------------- one writer per run
def test_a_second_process_on_a_busy_run_directory_is_refused_and_the_first_files_stay(tmp_path: Path,
                                                                                       phantom_root: Path, capsys):
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(phantom_root.resolve()), "run_dir": str(run_dir),
                                      "patch_size": [32, 32], "channels": [4, 8, 16, 32, 64], "iterations": 2,
                                      "val_every": 2, "batch_size": 2, "unlabeled_batch_size": 2, "threads": 1,
                                      "tensorboard": False, "progress": False, "labeled_patients": 2}))
    assert main(["train", "--config", str(config)]) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"}
    holder = subprocess.Popen(  # another process holding the run directory, as a live `dust train` does
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from dust.engine.run_lock import "
         "lock_run_directory; h = lock_run_directory(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
         str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["train", "--resume", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(run_dir) in err[0] and f"pid {holder.pid}" in err[0], err
    finally:
        holder.kill()
        holder.wait()
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"} == before
    assert main(["train", "--resume", str(run_dir)]) == 0  # the lock died with its process: no stale lock


@pytest.mark.parametrize(("user_env", "expected"), [({}, "unset 10000"),
                                                    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE unset"),
                                                    ({"GOMP_SPINCOUNT": "1000"}, "unset 1000")])
def test_the_dust_command_spins_briefly_unless_the_user_chose_a_policy(user_env: dict, expected: str):
    """Long-spinning OpenMP threads crawl when another process holds a core (docs/results/speed/wait_policy.md)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | user_env
    code = ("import dust.cli.main, os; print(os.environ.get('OMP_WAIT_POLICY', 'unset'), "
            "os.environ.get('GOMP_SPINCOUNT', 'unset'), 'torch' in __import__('sys').modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"{expected} True"


def test_importing_dust_leaves_the_environment_alone():
    code = ("import os; before = dict(os.environ); import dust, dust.engine, dust.methods, dust.data; "
            "print(dict(os.environ) == before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
