"""What dust promises a user who is careless or hostile (docs/safety.md): loading a checkpoint runs no code, no
command replaces a file it did not write or a trained model without being told, a wrong input is one line naming
the file (exit 2), never a silently wrong result."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from dust.cli.main import main
from dust.data.types import write_h5

TINY = {"labeled_patients": 2, "patch_size": [32, 32], "channels": [4, 8, 16, 32, 64], "batch_size": 4,
        "unlabeled_batch_size": 4, "iterations": 4, "val_every": 2, "threads": 1, "tensorboard": False,
        "progress": False}
TINY_3D = {"dataset": "la_h5", "model": "vnet", "upsample": "deconv", "channels": [4, 8, 16, 32, 64],
           "dropout": [0.0, 0.0, 0.0, 0.0, 0.5], "num_classes": 2, "class_names": ["background", "LA"],
           "spacing": [0.625, 0.625, 0.625], "spatial_policy": "crop", "augment_rotate_deg": 0.0,
           "labeled_patients": 3, "holdout_cases": 2, "patch_size": [16, 16, 16], "batch_size": 2,
           "unlabeled_batch_size": 2, "iterations": 2, "val_every": 2, "threads": 1, "tensorboard": False,
           "progress": False}


def _config(path: Path, **keys) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(keys))
    return path


@pytest.fixture(scope="module")
def run_2d(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-iteration 2D run (tests that change it work on a copy)."""
    run = tmp_path_factory.mktemp("safety") / "run"
    config = _config(run.parent / "tiny.yaml", data_dir=str(phantom_root.resolve()), run_dir=str(run), **TINY)
    assert main(["train", "--config", str(config)]) == 0
    return run


@pytest.fixture(scope="module")
def best_3d(la_phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("safety3d") / "run"
    config = _config(run.parent / "tiny3d.yaml", data_dir=str(la_phantom_root.resolve()), run_dir=str(run), **TINY_3D)
    assert main(["train", "--config", str(config)]) == 0
    return run / "checkpoints" / "best.pt"


@pytest.fixture
def run_copy(run_2d: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_2d, tmp_path / "run"))


@pytest.fixture(scope="module")
def scans(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A validation volume of the phantom as NIfTI (scans/<case>.nii.gz) with its label in scans/labels/."""
    folder = tmp_path_factory.mktemp("scans") / "scans"
    assert main(["export", "--input", str(phantom_root / "data" / "patient005_frame01.h5"), "--output",
                 str(folder)]) == 0
    return folder


def _error_line(capsys: pytest.CaptureFixture, command: str, *texts: str) -> str:
    """The one ``dust COMMAND: error: ...`` line of stderr (no traceback), holding every text."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"dust {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in texts:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _edit_checkpoint(source: Path, target: Path, **config) -> Path:
    state = torch.load(source, weights_only=True)
    state["config"].update(config)
    state["method"] = state["config"]["method"]
    torch.save(state, target)
    return target


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its content (gzip files uncompressed: their header holds the time written)."""
    return {p.relative_to(folder).as_posix(): gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- no code runs
EVIL = '''
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("the module ran")

from dust.methods.supervised import Supervised


class X(Supervised):
    pass
'''


@pytest.mark.parametrize("module", ["evilmod", "this"])
def test_a_checkpoint_naming_a_module_runs_no_code_even_with_python_m(module: str, run_2d: Path, scans: Path,
                                                                     tmp_path: Path):
    # `python -m dust` puts the working folder first on the import path: an evilmod.py there would run
    (tmp_path / "evilmod.py").write_text(EVIL)
    bad = _edit_checkpoint(run_2d / "checkpoints" / "best.pt", tmp_path / "downloaded.pt", method=f"{module}:X")
    out = subprocess.run([sys.executable, "-m", "dust", "predict", "--checkpoint", bad.name, "--input", str(scans),
                          "--output", "pred"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert not (tmp_path / "IMPORTED").exists() and "Beautiful is better than ugly" not in out.stdout
    assert out.stderr.count("\n") == 1 and "downloaded.pt" in out.stderr and f"--method {module}:X" in out.stderr
    assert not (tmp_path / "pred").exists()


def test_no_command_imports_a_module_a_run_or_checkpoint_names_unless_the_user_names_it(
        run_copy: Path, scans: Path, tmp_path: Path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "evilmod.py").write_text(EVIL)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))  # what `python -m` does
    best = run_copy / "checkpoints" / "best.pt"
    ckpts = [_edit_checkpoint(p, p, method="evilmod:X") for p in sorted((run_copy / "checkpoints").glob("*.pt"))]
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    (run_copy / "config.yaml").write_text(yaml.safe_dump({**config, "method": "evilmod:X"}))
    commands = {
        "predict": ["--checkpoint", str(best), "--input", str(scans), "--output", str(tmp_path / "p")],
        "evaluate": ["--checkpoint", str(best)],
        "rank": ["--checkpoints", *map(str, ckpts[:2]), "--input", str(scans), "--out", str(tmp_path / "r.csv")],
        "report": [str(run_copy)],
        "results": ["--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"), "--add", str(run_copy)],
        "train": ["--resume", str(run_copy)],
    }
    for command, args in commands.items():
        assert main([command, *args]) == 2, command
        _error_line(capsys, command, "evilmod:X", "dust imports a module only when you name it")
    assert not (work / "IMPORTED").exists() and "evilmod" not in sys.modules

    # named by the user in this command, their own class is used
    assert main(["predict", "--checkpoint", str(best), "--input", str(scans), "--output", str(tmp_path / "p"),
                 "--method", "evilmod:X"]) == 0
    assert (work / "IMPORTED").exists() and (tmp_path / "p" / "patient005_frame01.nii.gz").is_file()
    sys.modules.pop("evilmod", None)


# ---------------------------------------------------------------------------------------------- nothing lost
def test_resume_that_finds_nothing_usable_never_starts_again_over_a_trained_model(run_copy: Path, capsys):
    for path in (run_copy / "checkpoints").glob("iter_*.pt"):
        path.write_bytes(b"damaged")
    before = _tree(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 2  # moves them aside as unreadable
    _error_line(capsys, "train", "all 2 checkpoint(s) are unreadable")
    assert main(["train", "--resume", str(run_copy)]) == 2  # the second try used to start from iteration 0
    _error_line(capsys, "train", "no iteration checkpoint to resume from", "best.pt", "--overwrite")
    after = _tree(run_copy)
    for name in ("checkpoints/best.pt", "config.yaml", "results.json", "metrics_val_best.json", "command.txt"):
        assert after[name] == before[name], name


def test_a_fresh_train_into_a_run_holding_a_trained_model_needs_overwrite(run_2d: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(run_2d / "checkpoints" / "best.pt", run / "checkpoints" / "best.pt")  # only best.pt is left
    config = _config(tmp_path / "again.yaml", **{**yaml.safe_load((run_2d / "config.yaml").read_text()),
                                                  "run_dir": str(run)})
    before = (run / "checkpoints" / "best.pt").read_bytes()
    assert main(["train", "--config", str(config), "--set", "iterations=2"]) == 2
    _error_line(capsys, "train", str(run), "best.pt", "--overwrite")
    assert (run / "checkpoints" / "best.pt").read_bytes() == before and not (run / "config.yaml").exists()

    assert main(["train", "--config", str(config), "--set", "iterations=2", "--overwrite"]) == 0
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert state["config"]["iterations"] == 2 and state["best"]["iteration"] <= 2
    assert main(["train", "--resume", str(run), "--overwrite"]) == 2
    _error_line(capsys, "train", "does not go with --resume")


def test_prepare_again_replaces_only_what_it_wrote(tmp_path: Path, capsys):
    from tests.test_nifti import _nnunet

    out = tmp_path / "OUT"
    source = _nnunet(tmp_path / "source")
    assert main(["prepare", "--source", str(source), "--out", str(out), "--val", "1"]) == 0
    shutil.move(source, out / "raw")  # the user keeps the source and notes beside the prepared dataset
    (out / "notes.txt").write_text("scanner settings")
    kept = {**{f"raw/{k}": v for k, v in _tree(out / "raw").items()}, "notes.txt": b"scanner settings"}

    assert main(["prepare", "--source", str(out / "raw"), "--out", str(out), "--val", "2", "--seed", "3"]) == 0
    after = _tree(out)
    assert all(after.get(name) == data for name, data in kept.items())
    record = json.loads((out / "dust_dataset.json").read_text())
    assert record["splits"]["val"] == 2 and set(after) == set(kept) | set(record["files"])  # no stale file

    # a file the user put where a new one would go is refused before anything moves
    (out / "test.list").write_text("my own list\n")
    before = _tree(out)
    assert main(["prepare", "--source", str(out / "raw"), "--out", str(out), "--val", "1", "--test", "1"]) == 2
    _error_line(capsys, "prepare", str(out / "test.list"), "was not written by dust prepare")
    assert _tree(out) == before and not (tmp_path / ".OUT.preparing").exists()


def test_predict_replaces_only_its_own_files_of_the_same_model(run_2d: Path, scans: Path, tmp_path: Path, capsys):
    best = run_2d / "checkpoints" / "best.pt"
    truth = scans / "labels" / "patient005_frame01.nii.gz"
    before = truth.read_bytes()
    assert main(["predict", "--checkpoint", str(best), "--input", str(scans), "--output", str(scans / "labels")]) == 2
    _error_line(capsys, "predict", str(truth), "was not written by dust predict")
    assert truth.read_bytes() == before and not (scans / "labels" / "dust_predictions.json").exists()

    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(best), "--input", str(scans), "--output", str(out),
                 "--uncertainty"]) == 0
    other = sorted((run_2d / "checkpoints").glob("iter_*.pt"))[0]
    first = _tree(out)
    assert main(["predict", "--checkpoint", str(other), "--input", str(scans), "--output", str(out)]) == 2
    _error_line(capsys, "predict", str(out), "holds predictions of another model")
    assert _tree(out) == first

    # the same model again: its own files are replaced, and what a killed predict left behind is cleaned up
    leftover = out / ".patient005_frame01.nii.gz.k1ll3d.tmp"
    leftover.write_bytes(b"\0" * 1000)
    assert main(["predict", "--checkpoint", str(best), "--input", str(scans), "--output", str(out)]) == 0
    assert not leftover.exists() and _tree(out) == first


# ---------------------------------------------------------------------------------------------- no wrong result
@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_predict_refuses_an_h5_volume_holding_nan(dims: str, run_2d: Path, best_3d: Path, phantom_root: Path,
                                                  la_phantom_root: Path, tmp_path: Path, capsys):
    if dims == "2d":
        best, source = run_2d / "checkpoints" / "best.pt", phantom_root / "data" / "patient005_frame01.h5"
    else:
        case = (la_phantom_root / "train.list").read_text().split()[0]
        best, source = best_3d, la_phantom_root / "volumes" / case / "mri_norm2.h5"
    with h5py.File(source) as f:
        image = f["image"][()]
    image[1, 2, 3] = np.nan
    case = tmp_path / "in" / "case_nan.h5"
    case.parent.mkdir()
    write_h5(case, image)
    assert main(["predict", "--checkpoint", str(best), "--input", str(case), "--output", str(tmp_path / "o")]) == 2
    _error_line(capsys, "predict", str(case), "NaN")
    assert not (tmp_path / "o" / "case_nan.nii.gz").exists()


def _label_nifti(path: Path, label: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), path)
    return path


def test_evaluate_compares_prediction_and_reference_in_world_space(tmp_path: Path, capsys):
    label = np.zeros((20, 16, 6), np.uint8)
    label[3:10, 4:9, 1:4], label[12:17, 2:7, 2:5] = 1, 2  # not symmetric: a flip changes the voxels
    affine = np.array([[0.8, 0, 0, -30.0], [0, 0.9, 0, 12.0], [0, 0, 2.5, 4.0], [0, 0, 0, 1]])
    _label_nifti(tmp_path / "ref" / "c.nii.gz", label, affine)
    flip_x = np.array([[-1.0, 0, 0, label.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    swap_xy = np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    same_place = {"flipped": (label[::-1], affine @ flip_x), "axes_swapped": (label.transpose(1, 0, 2),
                                                                              affine @ swap_xy)}
    for name, (data, moved) in same_place.items():  # stored differently, the same voxels in space
        _label_nifti(tmp_path / name / "c.nii.gz", data, moved)
        assert main(["evaluate", "--pred", str(tmp_path / name), "--ref", str(tmp_path / "ref")]) == 0, name
        summary = json.loads((tmp_path / name / "metrics.json").read_text())
        assert summary["overall"]["dice"]["mean"] == 1.0, name

    shifted = affine.copy()
    shifted[0, 3] += 500.0
    pred = _label_nifti(tmp_path / "shifted" / "c.nii.gz", label, shifted)
    assert main(["evaluate", "--pred", str(pred.parent), "--ref", str(tmp_path / "ref")]) == 2
    _error_line(capsys, "evaluate", str(pred), "lies elsewhere in space", "500 mm")
    assert not (pred.parent / "metrics.json").exists()


def test_a_dangling_or_looping_link_is_named_not_dropped(run_2d: Path, scans: Path, tmp_path: Path, capsys):
    refs, preds = tmp_path / "ref", tmp_path / "pred"
    for folder in (refs, preds):
        folder.mkdir()
        shutil.copy(scans / "labels" / "patient005_frame01.nii.gz", folder / "a.nii.gz")
    (refs / "b.nii.gz").symlink_to(tmp_path / "moved_away.nii.gz")
    shutil.copy(preds / "a.nii.gz", preds / "b.nii.gz")
    assert main(["evaluate", "--pred", str(preds), "--ref", str(refs)]) == 2
    _error_line(capsys, "evaluate", str(refs / "b.nii.gz"), "broken symbolic link")

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        shutil.copy(scans / "patient005_frame01.nii.gz", inputs / f"{name}.nii.gz")
    (inputs / "dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    (inputs / "loop.nii.gz").symlink_to("loop.nii.gz")
    best = run_2d / "checkpoints" / "best.pt"
    assert main(["predict", "--checkpoint", str(best), "--input", str(inputs), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "2 of 4 case(s) could not be predicted" in err and "Traceback" not in err
    assert f"{inputs / 'dangling.nii.gz'}: broken symbolic link" in err and f"{inputs / 'loop.nii.gz'}: broken" in err
    assert (tmp_path / "o" / "a.nii.gz").is_file() and (tmp_path / "o" / "b.nii.gz").is_file()


@pytest.mark.parametrize(("label", "text"), [
    (300, "label values 0..300 do not fit"), (-1, "label values -1..2 do not fit"),
    (1.5, "non-integer values"), (np.nan, "NaN"), ("shape", "does not match"),
])
def test_export_refuses_a_label_it_cannot_write_as_it_is(label, text, tmp_path: Path, capsys):
    image = np.random.default_rng(0).random((3, 8, 10)).astype(np.float32)
    values = np.zeros((3, 8, 10), np.float32)
    values[1, 2:5, 3:6] = 2
    if label == "shape":
        values = values[:, :-1]
    else:
        values[0, 0, 0] = label
    case = tmp_path / "case.h5"
    write_h5(case, image, values)
    assert main(["export", "--input", str(case), "--output", str(tmp_path / "out")]) == 2
    _error_line(capsys, "export", str(case), text)
    assert not (tmp_path / "out" / "labels").exists()


def test_rank_refuses_checkpoints_of_two_runs_that_shared_a_run_directory(run_2d: Path, scans: Path,
                                                                          tmp_path: Path, capsys):
    first = run_2d / "checkpoints" / "best.pt"
    # a second run into the same run_dir with the same seed and method, but another learning rate
    other = _edit_checkpoint(sorted((run_2d / "checkpoints").glob("iter_*.pt"))[0], tmp_path / "other.pt", lr=0.5)
    assert main(["rank", "--checkpoints", str(other), str(first), "--input", str(scans),
                 "--out", str(tmp_path / "r.csv")]) == 2
    _error_line(capsys, "rank", str(other), "lr=0.5")
    assert not (tmp_path / "r.csv").exists()


# ---------------------------------------------------------------------------------------------- one clear line
@pytest.mark.parametrize(("content", "text"), [
    (b"extends: bad.yaml\nlr: 0.1\n", "extends: comes back to itself"),
    (b"run_dir: runs/{nickname}\n", "unknown placeholder {nickname}"),
    (b"lr: 0.01\nclass_names: [\xff\xfe]\n", "not UTF-8"),
    (b"lr: .nan\n", "lr: nan is not a finite number"),
    (b"lr: 0.01\niterations: 10\nlr: 0.1\n", "key 'lr' is given twice (lines 1 and 3)"),
    (b"device: cdua\n", "device: 'cdua' is not one of"),
])
def test_a_bad_config_is_one_line_naming_file_or_key(content: bytes, text: str, phantom_root: Path, tmp_path: Path,
                                                      capsys):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content + f"data_dir: {phantom_root}\n".encode())
    args = ["train", "--config", str(config)]
    if b"run_dir" not in content:
        args += ["--set", f"run_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    _error_line(capsys, "train", text)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line(phantom_root: Path, tmp_path: Path, capsys):
    config = _config(tmp_path / "gpu.yaml", data_dir=str(phantom_root), device="cuda", run_dir=str(tmp_path / "r"))
    assert main(["train", "--config", str(config)]) == 2
    _error_line(capsys, "train", "device 'cuda':", "use --device cpu")


def test_a_checkpoint_that_is_no_dust_checkpoint_is_one_line(run_copy: Path, scans: Path, tmp_path: Path, capsys):
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3, 4), tensor)
    for command in (["predict", "--input", str(scans), "--output", str(tmp_path / "o")], ["evaluate"]):
        assert main([command[0], "--checkpoint", str(tensor), *command[1:]]) == 2
        _error_line(capsys, command[0], str(tensor), "bare tensor of shape (3, 4)")
    # best.pt (weights for inference) where the newest iteration checkpoint should be: no optimiser, no data order
    newest = sorted((run_copy / "checkpoints").glob("iter_*.pt"))[-1]
    shutil.copy(run_copy / "checkpoints" / "best.pt", newest)
    assert main(["train", "--resume", str(run_copy)]) == 2
    _error_line(capsys, "train", str(newest), "cannot resume from it", "optimizer")


def test_bad_cases_in_a_folder_are_each_named_and_the_rest_predicted(run_2d: Path, phantom_root: Path, scans: Path,
                                                                    tmp_path: Path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = phantom_root / "data" / "patient005_frame01.h5"
    shutil.copy(good, inputs / "good.h5")
    with h5py.File(good) as f:
        image = f["image"][()]
    with h5py.File(inputs / "group.h5", "w") as f:
        f.create_group("image")
    with h5py.File(inputs / "text.h5", "w") as f:
        f["image"] = np.array([b"not", b"numbers"])
    write_h5(inputs / "affine3.h5", image, attrs={"affine": np.eye(3)})
    nifti = nib.load(scans / "patient005_frame01.nii.gz")
    data = np.asarray(nifti.dataobj)
    nan_affine = nifti.affine.copy()
    nan_affine[0, 3] = np.nan
    nib.save(nib.Nifti1Image(data, nan_affine), inputs / "nan_sform.nii.gz")
    nib.save(nib.Nifti1Image(data.astype(np.complex64), nifti.affine), inputs / "complex.nii.gz")
    expected = {"group.h5": "'image' is a group, not an array", "text.h5": "'image' holds |S7 values, not numbers",
                "affine3.h5": "attribute 'affine' must be a finite 4x4 matrix",
                "nan_sform.nii.gz": "its affine (sform/qform) holds NaN", "complex.nii.gz": "complex-valued voxels"}
    out = tmp_path / "o"
    assert main(["predict", "--checkpoint", str(run_2d / "checkpoints" / "best.pt"), "--input", str(inputs),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "5 of 6 case(s) could not be predicted" in err and "Traceback" not in err
    for name, text in expected.items():
        assert f"{inputs / name}: {text}" in err, (name, err)
    assert [p.name for p in sorted(out.glob("*.nii.gz"))] == ["good.nii.gz"]


KILLABLE = '''
from dust.methods.supervised import Supervised


class StoppedAt3(Supervised):
    def train_step(self, batch, iteration):
        if iteration == 3:
            raise KeyboardInterrupt
        return super().train_step(batch, iteration)


class NaNAt1(Supervised):
    def train_step(self, batch, iteration):
        losses = super().train_step(batch, iteration)
        return {"sup": losses["sup"] * (float("nan") if iteration == 1 else 1.0)}
'''


def test_ctrl_c_and_an_early_nan_say_what_was_kept(phantom_root: Path, tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "stopping.py").write_text(textwrap.dedent(KILLABLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    config = _config(tmp_path / "c.yaml", data_dir=str(phantom_root.resolve()), run_dir=str(run),
                     **{**TINY, "iterations": 6}, method="stopping:StoppedAt3")
    assert main(["train", "--config", str(config)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"dust train: interrupted; continue from the last checkpoint with `dust " \
                                           f"train --resume {run}`" and "Traceback" not in err
    assert (run / "checkpoints" / "iter_0000002.pt").is_file()

    config = _config(tmp_path / "n.yaml", data_dir=str(phantom_root.resolve()), run_dir=str(tmp_path / "nan"),
                     **TINY, method="stopping:NaNAt1")
    assert main(["train", "--config", str(config)]) == 2
    _error_line(capsys, "train", "iteration 1", "no checkpoint had been written yet")
    sys.modules.pop("stopping", None)


def test_an_unwritable_checkpoint_folder_is_refused_before_training(phantom_root: Path, tmp_path: Path, monkeypatch,
                                                                    capsys):
    from dust import storage

    run = tmp_path / "run"
    real_mkstemp = storage.tempfile.mkstemp

    def read_only_checkpoints(*args, **kwargs):  # as chmod a-w would (the tests may run as root, which ignores it)
        if Path(kwargs["dir"]) == run / "checkpoints":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(storage.tempfile, "mkstemp", read_only_checkpoints)
    config = _config(tmp_path / "c.yaml", data_dir=str(phantom_root.resolve()), run_dir=str(run), **TINY)
    assert main(["train", "--config", str(config)]) == 2
    _error_line(capsys, "train", f"{run / 'checkpoints'}: cannot write it (Permission denied)")
    assert not (run / "train.log").exists() and not list(run.rglob("*.pt"))  # refused before the first step


def test_rank_and_prepare_on_a_full_disk_or_a_wrong_out_are_one_line(run_2d: Path, scans: Path, tmp_path: Path,
                                                                     monkeypatch, capsys):
    from dust import storage
    from dust.data import types
    from tests.test_nifti import _nnunet

    ckpts = sorted(map(str, (run_2d / "checkpoints").glob("*.pt")))
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["rank", "--checkpoints", *ckpts, "--input", str(scans), "--out", str(folder)]) == 2
    _error_line(capsys, "rank", str(folder), "is a folder")

    source = _nnunet(tmp_path / "source")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert main(["prepare", "--source", str(source), "--out", str(a_file)]) == 2
    _error_line(capsys, "prepare", str(a_file), "is not a folder")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", disk_full)
    assert main(["rank", "--checkpoints", *ckpts, "--input", str(scans), "--out", str(tmp_path / "r.csv")]) == 2
    _error_line(capsys, "rank", str(tmp_path / "r.csv"), "no space left on device")

    def hdf5_disk_full(path, mode="r"):  # what h5py raises: HDF5's text, no errno attribute
        raise OSError(f"Unable to synchronously create file (file write failed: time = now, filename = '{path}', "
                      "errno = 28, error message = 'No space left on device')")

    monkeypatch.setattr(types.h5py, "File", hdf5_disk_full)
    assert main(["prepare", "--source", str(source), "--out", str(tmp_path / "prepared")]) == 2
    _error_line(capsys, "prepare", "no space left on device", ".h5")
    assert not (tmp_path / "prepared").exists() and not (tmp_path / ".prepared.preparing").exists()


def test_report_names_a_damaged_metrics_file(run_copy: Path, capsys):
    damaged = run_copy / "metrics_val_best.json"
    damaged.write_text(damaged.read_text()[:40])
    assert main(["report", str(run_copy), "--out", str(run_copy / "r.html")]) == 2
    _error_line(capsys, "report", str(damaged), "not valid JSON")
