"""``dust export-model``: a trained checkpoint as a file plain PyTorch (TorchScript) or ONNX Runtime runs, with the
pre- and post-processing contract written beside it.

The exported network is the method's prediction as ``dust predict`` computes it, softmax included: a batch of
patches (B, C, *patch_size) in, class probabilities (B, K, *patch_size) out, in float32 (the networks of a method
that predicts with two, e.g. MCF's mean of both, are exported together). What dust does around it (reading and
normalising a case, resizing slices to the patch or sliding a window over a volume, resampling the probabilities
back, argmax) is the same for every model of a config and is written into ``model.json`` (:func:`contract`), so a
user reproduces ``dust predict`` without dust (docs/deployment.md; ``tests/test_export_model.py`` does it with
plain torch).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dust import __version__
from dust.config import ConfigError
from dust.data.prepare import RECORDED_KEYS
from dust.methods import Method
from dust.methods.loading import load_trained
from dust.storage import atomic_write, atomic_write_text

CONTRACT_FILE = "model.json"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"


class Probabilities(nn.Module):
    """``softmax(method.predict(x))`` as one module: the method's networks are its submodules (traced with it)."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.networks = nn.ModuleDict(method.networks)
        self._predict = method.predict  # reads method.networks: the same module objects as self.networks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._predict(x).float(), 1)


def contract(cfg: dict[str, Any], checkpoint: Path, files: dict[str, str]) -> dict[str, Any]:
    """What a caller does around the exported network to get ``dust predict``'s probabilities and labels."""
    dims = len(cfg["patch_size"])
    resize = cfg["spatial_policy"] == "resize"
    as_stored = cfg["dataset"] == "la_h5"  # LA's h5 volumes were z-scored per volume by UA-MT's preprocessing
    norm = "zscore" if as_stored else cfg["intensity_norm"]
    steps = [
        "read the case as a float array (C, S, H, W): a NIfTI file (X, Y, Z) becomes (S, H, W) by taking voxel axis "
        f"slice_axis={cfg['slice_axis']} first and the other two in reversed order (slice_axis 2: a transpose to "
        "(Z, Y, X)); channels in the order of 'modalities' (null: all, in file order)",
        f"normalise each channel over the whole case: {norm} "
        + ("((x - min) / (max - min))" if norm == "minmax" else "((x - mean) / std)"),
    ]
    if dims == 2:
        steps.append("predict slice by slice: each slice (C, H, W) along S is one 2D input")
    if resize:
        steps += [f"resize each input to patch_size {cfg['patch_size']} ({_interpolation(cfg, dims)}, "
                  "align_corners=False; torch.nn.functional.interpolate)",
                  "run the model on the batch (B, C, *patch_size): class probabilities (B, K, *patch_size)",
                  f"resize the probabilities back to the input's size ({_linear(dims)}, align_corners=False)"]
    else:
        steps += [
            f"resample the case by resample_factor={cfg['resample_factor']} ({_interpolation(cfg, dims)}, "
            "align_corners=False; each axis round(size * factor), at least 1) unless the factor is 1",
            f"slide a window of patch_size {cfg['patch_size']} over it (zero padding where the case is smaller): "
            + (f"stride {cfg['inference_stride']} voxels per axis" if cfg["inference_stride"] is not None
               else f"overlap {cfg['inference_overlap']}")
            + f", {cfg['inference_blend']} blending of the windows' probabilities (MONAI's "
              "sliding_window_inference(inputs, patch_size, sw_batch_size, model, overlap, mode=blend) does exactly "
              "this; dust passes overlap = 1 - (stride + 0.5) / patch per axis for a stride)",
            f"resample the probabilities back to the case's grid ({_linear(dims)}, align_corners=False)",
        ]
    steps.append("label = argmax over the class axis; write it on the input's grid (the inverse axis order, the "
                 "input's affine)")
    return {
        "format": "dust-exported-model",
        "version": 1,
        "dust_version": __version__,
        "checkpoint": str(checkpoint),
        "method": cfg["method"],
        "files": files,
        "input": {
            "shape": "(B, C, " + ", ".join(("S", "H", "W")[3 - dims:]) + ")",
            "channels": cfg["in_channels"],
            "modalities": cfg["modalities"],
            "dtype": "float32",
            "patch_size": list(cfg["patch_size"]),
            "spatial_dims": dims,
        },
        "output": {
            "shape": "(B, K, " + ", ".join(("S", "H", "W")[3 - dims:]) + ")",
            "what": "class probabilities (softmax over axis 1) of the method's prediction",
            "num_classes": cfg["num_classes"],
            "classes": list(cfg["class_names"]),
        },
        "normalisation": {"intensity_norm": norm, "per": "case and channel, over the whole volume",
                          "already_applied_in_training_files": as_stored},
        "geometry": {"slice_axis": cfg["slice_axis"],
                     "spacing_mm_SHW": cfg["spacing"],
                     "resample_factor": cfg["resample_factor"],
                     "note": "dust never resamples to a fixed spacing: a case is used on its own voxel grid"},
        "inference": {
            "spatial_policy": cfg["spatial_policy"],
            "image_interpolation": cfg["image_interpolation"],
            "sliding_window": None if resize else {
                "window": list(cfg["patch_size"]), "stride": cfg["inference_stride"],
                "overlap": cfg["inference_overlap"], "blend": cfg["inference_blend"]},
            "precision_in_dust": "bf16 autocast" if cfg["bf16"] else "float32",
        },
        "recorded_keys": {k: cfg[k] for k in RECORDED_KEYS},
        "how_to_run": steps,
    }


def _linear(dims: int) -> str:
    return "bilinear" if dims == 2 else "trilinear"


def _interpolation(cfg: dict[str, Any], dims: int) -> str:
    return "nearest" if cfg["image_interpolation"] == "nearest" else _linear(dims)


def export_model(checkpoint: Path, out_dir: Path, onnx: bool = False) -> dict[str, Any]:
    """Write ``out_dir/model.torchscript.pt`` (and ``model.onnx``) and ``out_dir/model.json``; returns the contract."""
    method, cfg = load_trained(checkpoint, "cpu")
    for net in method.networks.values():
        net.float().eval().to(memory_format=torch.contiguous_format)
    module = Probabilities(method).eval()
    example = torch.rand(1, cfg["in_channels"], *cfg["patch_size"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice and tracer hints about Python ints
        traced = torch.jit.trace(module, example, check_trace=False)
        scripted = torch.jit.freeze(traced)
        # serialised in memory first, then written atomically, as every file dust writes
        atomic_write(out_dir / TORCHSCRIPT_FILE, "wb", lambda f: torch.jit.save(scripted, f))
    files = {"torchscript": TORCHSCRIPT_FILE, "onnx": None}
    onnx_batch = None
    if onnx:
        onnx_batch = _export_onnx(module, example, out_dir / ONNX_FILE)
        files["onnx"] = ONNX_FILE
    spec = contract(cfg, checkpoint, files)
    spec["input"]["batch"] = {"torchscript": "any", "onnx": (onnx_batch or "any") if onnx else None}
    atomic_write_text(json.dumps(spec, indent=1) + "\n", out_dir / CONTRACT_FILE)
    return spec


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> int | None:
    """Write ``path`` and check it in ONNX Runtime against the module; returns its fixed batch size, or None when
    any batch size works. A batch-dynamic export that ONNX Runtime runs wrongly (MultiCURE's deformable convolution
    at batch 2, torch 2.13) is replaced by one for batches of 1."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise ConfigError("--onnx needs onnx, onnxscript and onnxruntime: pip install 'dust-seg[onnx]'") from None
    for batch in (None, 1):
        proto = _onnx_proto(module, example, path, dynamic_batch=batch is None)
        session = onnxruntime.InferenceSession(proto, providers=["CPUExecutionProvider"])
        x = torch.rand(2 if batch is None else 1, *example.shape[1:])
        try:
            (got,) = session.run(None, {"x": x.numpy()})
        except Exception:  # onnxruntime's own error types: the export is wrong for this batch size
            continue
        with torch.no_grad():
            if torch.allclose(torch.from_numpy(got), module(x), atol=1e-4):
                atomic_write(path, "wb", lambda f, data=proto: f.write(data))
                return batch
    raise ConfigError(f"{path}: ONNX Runtime does not reproduce this model's output; the TorchScript file is "
                      "written (use it)")


def _onnx_proto(module: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool) -> bytes:
    import logging

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = logging.getLogger("torch.onnx")
        level, quiet.level = quiet.level, logging.ERROR
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["x"],
                                        output_names=["probabilities"], verbose=False,
                                        dynamic_shapes={"x": {0: "batch"}} if dynamic_batch else None)
        except Exception as err:  # an op without an ONNX translation: say which, in one line
            first = (str(err).strip().splitlines() or [""])[0]
            raise ConfigError(f"{path}: this model does not export to ONNX ({type(err).__name__}: {first[:300]}); "
                              "the TorchScript file is written (use it)") from None
        finally:
            quiet.level = level
    return program.model_proto.SerializeToString()
