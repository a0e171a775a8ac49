"""``--device``: auto / cpu / cuda on train, predict, evaluate and rank; an absent device is one line (exit 2) before
anything is written, and a checkpoint trained on a GPU (its config says ``device: cuda``) loads on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from dust.cli.main import main
from dust.config import ConfigError
from dust.methods.loading import load_trained, pick_device

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def _config(tmp_path: Path, phantom_root: Path, **extra) -> Path:
    cfg = {
        "data_dir": str(phantom_root.resolve()), "labeled_patients": 2, "patch_size": [32, 32],
        "channels": [4, 8, 16, 32, 64], "batch_size": 4, "iterations": 4, "val_every": 4, "threads": 1,
        "tensorboard": False, "progress": False, "run_dir": str(tmp_path / "run"), **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pick_device_auto_cpu_and_refusals():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("cdua", "gpu", "cuda:x", 3):
        with pytest.raises(ConfigError, match="is not one of auto, cpu, cuda, cuda:N"):
            pick_device(bad)
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="only .* CUDA device"):
            pick_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ConfigError, match="device 'cuda:0': this PyTorch .* without CUDA"):
            pick_device("cuda:0")


@needs_cpu_only
def test_an_absent_or_misspelt_device_is_one_line_and_leaves_no_run_folder(tmp_path: Path, phantom_root: Path,
                                                                          capsys):
    config = _config(tmp_path, phantom_root)
    for argv, said in ((["--device", "cuda"], "device 'cuda': this PyTorch"),
                       (["--set", "device=cuda:1"], "device 'cuda:1'"),
                       (["--set", "device=cdua"], "device: 'cdua' is not one of auto, cpu, cuda, cuda:N"),
                       (["--nproc", "2", "--device", "cuda"], "device 'cuda'")):
        assert main(["train", "--config", str(config), *argv]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()
    misspelt = _config(tmp_path, phantom_root, device="gpu")  # in the config file: named the same way
    assert main(["train", "--config", str(misspelt)]) == 2
    assert "device: 'gpu' is not one of" in capsys.readouterr().err


def test_a_checkpoint_trained_with_device_cuda_predicts_and_evaluates_on_the_cpu(tmp_path: Path, phantom_root: Path,
                                                                               capsys):
    config = _config(tmp_path, phantom_root)
    assert main(["train", "--config", str(config), "--device", "cpu"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["device"] == "cpu"
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    # what a GPU run writes: its config says cuda (the tensors are saved as they were on the GPU; they load mapped)
    state = torch.load(best, weights_only=True)
    state["config"] = {**state["config"], "device": "cuda"}
    gpu = tmp_path / "gpu_run" / "checkpoints" / "best.pt"
    gpu.parent.mkdir(parents=True)
    torch.save(state, gpu)

    method, cfg = load_trained(gpu, "cpu")
    assert cfg["device"] == "cpu" and all(p.device.type == "cpu" for p in method.networks["model"].parameters())
    case = sorted((phantom_root / "data").glob("*_frame??.h5"))[0]
    out_cpu, out_gpu = tmp_path / "pred_cpu", tmp_path / "pred_gpu"
    assert main(["predict", "--checkpoint", str(best), "--input", str(case), "--output", str(out_cpu)]) == 0
    assert main(["predict", "--checkpoint", str(gpu), "--input", str(case), "--output", str(out_gpu),
                 "--device", "cpu"]) == 0
    name = f"{case.stem}.nii.gz"
    assert np.array_equal(nib.load(out_cpu / name).get_fdata(), nib.load(out_gpu / name).get_fdata())
    assert main(["predict", "--checkpoint", str(gpu), "--input", str(case), "--output", str(tmp_path / "auto")]) == 0
    assert main(["evaluate", "--checkpoint", str(gpu), "--out", str(tmp_path / "ev")]) == 0
    scored = json.loads((tmp_path / "ev" / "metrics_val_best.json").read_text())
    assert scored["n_cases"] >= 1
    capsys.readouterr()
    if not torch.cuda.is_available():  # asked for a GPU that is not here: one line, nothing written
        for argv in (["predict", "--checkpoint", str(gpu), "--input", str(case), "--output", str(tmp_path / "no")],
                     ["evaluate", "--checkpoint", str(gpu), "--out", str(tmp_path / "no")],
                     ["rank", "--checkpoints", str(gpu), str(gpu), "--input", str(case), "--out",
                      str(tmp_path / "no" / "r.csv")]):
            assert main([*argv, "--device", "cuda"]) == 2
            err = capsys.readouterr().err
            assert "device 'cuda': this PyTorch" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "no").exists()
