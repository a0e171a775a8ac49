"""What a run and the commands around it leave on disk: loss lines in train.log, no folder after a failed start,
`dust evaluate` of a checkpoint outside a run writing under runs/ (never beside a shipped model), and `dust export`
of LA-layout cases named by their id with the h5's own axis order."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import torch
import yaml

from dust.cli.main import main


def _config(tmp_path: Path, phantom_root: Path, run_dir: Path, **extra) -> Path:
    cfg = {
        "data_dir": str(phantom_root.resolve()), "labeled_patients": 2, "patch_size": [32, 32],
        "channels": [4, 8, 16, 32, 64], "batch_size": 4, "iterations": 10, "val_every": 10, "log_every": 5,
        "threads": 1, "tensorboard": False, "progress": False, "run_dir": str(run_dir), **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_log_has_loss_lines_and_evaluating_a_checkpoint_outside_a_run_writes_under_runs(
        tmp_path: Path, phantom_root: Path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path, phantom_root, run))]) == 0
    lines = (run / "train.log").read_text().splitlines()
    losses = [line for line in lines if re.search(r"iteration \d+: loss [\d.]+ \(sup [\d.]+\) lr [\d.]+$", line)]
    assert [re.search(r"iteration (\d+):", line)[1] for line in losses] == ["5", "10"], lines
    assert "iteration 5: loss" not in capsys.readouterr().out  # the console has the progress bar for that

    shipped = tmp_path / "clone" / "models"  # a shipped model in a checkout: evaluating it must leave models/ as is
    shipped.mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "best.pt", shipped / "tiny_model.pt")
    monkeypatch.chdir(tmp_path / "clone")
    assert main(["evaluate", "--checkpoint", "models/tiny_model.pt"]) == 0
    assert sorted(p.name for p in shipped.iterdir()) == ["tiny_model.pt"]
    written = tmp_path / "clone" / "runs" / "evaluate" / "tiny_model"
    assert json.loads((written / "metrics_val_tiny_model.json").read_text())["n_cases"] >= 1
    assert "runs/evaluate/tiny_model/metrics_val_tiny_model.csv" in capsys.readouterr().out
    # a run's own checkpoint still writes into its run directory
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--split", "test"]) == 0
    assert (run / "metrics_test_best.json").is_file()


def test_a_failed_start_leaves_no_run_folder(tmp_path: Path, phantom_root: Path, capsys):
    run = tmp_path / "runs" / "nested" / "run"
    config = _config(tmp_path, phantom_root, run, model="unet9")  # refused once the data is read, at build
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown model 'unet9'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    existing = tmp_path / "mine"
    (existing / "notes").mkdir(parents=True)  # a folder the user made keeps what it had, and exists still
    config = _config(tmp_path, phantom_root, existing, model="unet9")
    assert main(["train", "--config", str(config)]) == 2
    assert sorted(p.name for p in existing.iterdir()) == ["notes"]


def test_export_names_la_cases_by_id_in_the_h5_axis_order_and_predict_agrees(tmp_path: Path, la_phantom_root: Path,
                                                                            phantom_root: Path, tiny_cfg_3d):
    from dust.engine.trainer import Trainer

    out = tmp_path / "nifti"
    assert main(["export", "--input", str(la_phantom_root / "volumes"), "--output", str(out),
                 "--spacing", "0.625", "0.625", "0.625"]) == 0
    ids = sorted(p.name for p in (la_phantom_root / "volumes").iterdir())
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{i}.nii.gz" for i in ids]
    case = la_phantom_root / "volumes" / ids[0] / "mri_norm2.h5"
    with h5py.File(case) as f:
        image, label = f["image"][()], f["label"][()]  # (X, Y, Z)
    exported = nib.load(out / f"{ids[0]}.nii.gz")
    assert np.array_equal(exported.get_fdata(dtype=np.float32), image)
    assert np.array_equal(nib.load(out / "labels" / f"{ids[0]}.nii.gz").get_fdata(), label)
    assert np.allclose(exported.header.get_zooms(), 0.625)

    # an ACDC-style volume (S, H, W) comes out as (X, Y, Z) = (W, H, S), as the scan's own NIfTI is
    volume = sorted((phantom_root / "data").glob("*_frame??.h5"))[0]
    assert main(["export", "--input", str(volume), "--output", str(tmp_path / "acdc")]) == 0
    with h5py.File(volume) as f:
        slices = f["image"][()]
    assert np.array_equal(nib.load(tmp_path / "acdc" / f"{volume.stem}.nii.gz").get_fdata(dtype=np.float32),
                          slices.transpose(2, 1, 0))

    # `dust predict` of an LA h5 gives what evaluation scores (dust.data.la's reading), on the h5's (X, Y, Z) grid
    from dust.data.la import read_case
    from dust.data.nifti import from_stored
    from dust.inference import Predictor
    from dust.predict import load_for_inference

    cfg = tiny_cfg_3d()
    Trainer(cfg).fit()
    best = Path(cfg["run_dir"]) / "checkpoints" / "best.pt"
    assert main(["predict", "--checkpoint", str(best), "--input", str(case), "--output", str(tmp_path / "p")]) == 0
    predicted = nib.load(tmp_path / "p" / f"{ids[0]}.nii.gz").get_fdata()
    method, loaded = load_for_inference(best, "cpu")
    stored, _ = read_case(la_phantom_root, ids[0], loaded, with_label=False)
    expected = Predictor.from_config(loaded, torch.device("cpu")).segment(method, stored).label.numpy()
    assert predicted.shape == image.shape and np.array_equal(predicted, from_stored(expected, 2))
