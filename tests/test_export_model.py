"""`dust export-model`: the exported file, loaded with plain torch and driven by its model.json, gives the
probabilities (and labels) `dust predict` gives, for a 2D model (slices resized to the patch) and a 3D two-network
model (sliding window); the ONNX file gives the same numbers in ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dust.cli.main import main
from dust.engine.trainer import Trainer


def _plain_torch_2d(model: torch.jit.ScriptModule, spec: dict, volume: np.ndarray) -> torch.Tensor:
    """model.json's steps for a 2D resize-policy model, in plain torch: (C, S, H, W) -> probabilities (K, S, H, W)."""
    assert spec["inference"]["spatial_policy"] == "resize" and spec["input"]["spatial_dims"] == 2
    slices = torch.from_numpy(volume).float().transpose(0, 1)  # (S, C, H, W): slice by slice
    size = tuple(slices.shape[2:])
    x = F.interpolate(slices, size=spec["input"]["patch_size"], mode="bilinear", align_corners=False)
    with torch.no_grad():
        probs = model(x)
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False).transpose(0, 1)


def test_an_exported_2d_model_reproduces_dust_predict_with_plain_torch(tmp_path: Path, tiny_cfg, phantom_root: Path,
                                                                        capsys):
    from dust.inference import Predictor
    from dust.predict import load_for_inference

    cfg = tiny_cfg(method="dust", iterations=9, val_every=9, bf16=False, patch_size=[32, 32])
    Trainer(cfg).fit()
    best = Path(cfg["run_dir"]) / "checkpoints" / "best.pt"
    out = tmp_path / "exported"
    assert main(["export-model", "--checkpoint", str(best), "--out", str(out)]) == 0
    spec = json.loads((out / "model.json").read_text())
    assert spec["input"] | {"modalities": None} == {
        "shape": "(B, C, H, W)", "channels": 1, "modalities": None, "dtype": "float32", "patch_size": [32, 32],
        "spatial_dims": 2, "batch": {"torchscript": "any", "onnx": None}}
    assert spec["output"]["classes"] == ["background", "RV", "Myo", "LV"] and spec["files"]["onnx"] is None
    assert spec["normalisation"]["intensity_norm"] == "minmax" and len(spec["how_to_run"]) >= 5

    model = torch.jit.load(str(out / spec["files"]["torchscript"]))  # no dust from here on
    case = sorted((phantom_root / "data").glob("*_frame??.h5"))[0]
    with h5py.File(case) as f:
        volume = f["image"][()][None]  # (1, S, H, W): the phantom's h5 is already min-max normalised
    exported = _plain_torch_2d(model, spec, volume)

    method, loaded = load_for_inference(best, "cpu")
    dust_probs = Predictor.from_config(loaded, torch.device("cpu")).case(lambda x: (method.predict(x),), volume)[0]
    assert exported.shape == dust_probs.shape == (4, *volume.shape[1:])
    assert torch.allclose(exported, dust_probs, atol=1e-5), (exported - dust_probs).abs().max()
    assert main(["predict", "--checkpoint", str(best), "--input", str(case), "--output", str(tmp_path / "p")]) == 0
    labels = nib.load(tmp_path / "p" / f"{case.stem}.nii.gz").get_fdata()  # (X, Y, Z) = (W, H, S)
    assert np.array_equal(labels.transpose(2, 1, 0), exported.argmax(0).numpy())


def test_an_exported_3d_two_network_model_reproduces_the_sliding_window_and_onnx(tmp_path: Path, tiny_cfg_3d,
                                                                                 la_phantom_root: Path):
    from monai.inferers import sliding_window_inference

    from dust.data.la import read_case
    from dust.inference import Predictor
    from dust.predict import load_for_inference

    cfg = tiny_cfg_3d(method="mcf", bf16=False, iterations=2)  # MCF predicts with the mean of its two networks
    Trainer(cfg).fit()
    best = Path(cfg["run_dir"]) / "checkpoints" / "best.pt"
    onnx = pytest.importorskip("onnxruntime", reason="pip install 'dust-seg[onnx]'") is not None
    out = tmp_path / "exported"
    assert main(["export-model", "--checkpoint", str(best), "--out", str(out), *(["--onnx"] if onnx else [])]) == 0
    spec = json.loads((out / "model.json").read_text())
    window = spec["inference"]["sliding_window"]
    assert spec["input"]["patch_size"] == window["window"] == [16, 16, 16] and window["blend"] == "gaussian"

    model = torch.jit.load(str(out / spec["files"]["torchscript"]))
    method, loaded = load_for_inference(best, "cpu")
    volume, _ = read_case(la_phantom_root, "case000", loaded, with_label=False)  # (1, S, H, W), as training reads
    x = torch.from_numpy(volume)[None].float()
    with torch.no_grad():
        exported = sliding_window_inference(x, window["window"], 2, model, overlap=window["overlap"],
                                            mode=window["blend"], padding_mode="constant", cval=0.0)[0]
    dust_probs = Predictor.from_config(loaded, torch.device("cpu")).case(lambda t: (method.predict(t),), volume)[0]
    assert torch.allclose(exported, dust_probs, atol=1e-5), (exported - dust_probs).abs().max()

    if onnx:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / spec["files"]["onnx"]))
        batch = torch.rand(3, 1, 16, 16, 16)
        (got,) = session.run(None, {"x": batch.numpy()})
        with torch.no_grad():
            assert np.allclose(got, model(batch).numpy(), atol=1e-4)


@pytest.mark.slow
def test_onnx_keeps_a_dynamic_batch_where_onnx_runtime_runs_it_and_falls_back_to_batch_1(tmp_path: Path,
                                                                                          tiny_cfg_3d):
    pytest.importorskip("onnxruntime", reason="pip install 'dust-seg[onnx]'")
    import onnxruntime

    from dust.engine.export import Probabilities, _export_onnx
    from dust.methods.loading import build_method

    for method, batch in (("supervised", None), ("multicure", 1)):  # deformable sampling: batch 1 only (torch 2.13)
        built = build_method(tiny_cfg_3d(method=method, channels_last=False), torch.device("cpu"))
        module = Probabilities(built).eval()
        path = tmp_path / f"{method}.onnx"
        assert _export_onnx(module, torch.rand(1, 1, 16, 16, 16), path) == batch
        x = torch.rand(batch or 3, 1, 16, 16, 16)
        (got,) = onnxruntime.InferenceSession(str(path)).run(None, {"x": x.numpy()})
        with torch.no_grad():
            assert np.allclose(got, module(x).numpy(), atol=1e-4)
