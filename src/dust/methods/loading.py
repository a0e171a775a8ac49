"""A method from a config (networks built, on a device), or trained, from a checkpoint.

Everything that needs a model outside training (evaluation, ``dust predict`` / ``rank``, the report, the
diagnostics under ``benchmarks/``) gets it here, so none of them depends on the training engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dust.config import ConfigError, check_device_name, resolve_config
from dust.methods import Method, get_method
from dust.models.layers import memory_format
from dust.storage import CheckpointError, check_compatible, load_checkpoint, load_network_weights


def full_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """User config + the engine's and the chosen method's defaults."""
    return resolve_config(cfg, get_method(cfg.get("method", "supervised")).defaults)


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when this PyTorch sees a GPU, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as asked, or a
    ``ConfigError`` (one line) when the asked device is not here."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this PyTorch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise ConfigError(f"device {name!r}: {why}; use --device cpu (or auto: CUDA when available, else CPU)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def build_method(cfg: dict[str, Any], device: torch.device) -> Method:
    """Instantiate the configured method and put its networks on ``device`` in the configured layout."""
    method = get_method(cfg["method"])(cfg)
    method.build()
    if not method.networks:
        raise ValueError(f"method {cfg['method']!r} built no networks in build()")
    layout = memory_format(len(cfg["patch_size"]) + 2)  # channels_last (2D) or channels_last_3d (3D)
    for name, net in method.networks.items():
        net.to(device)
        if cfg["channels_last"]:
            method.networks[name] = net.to(memory_format=layout)
    return method


def load_trained(path: Path, device: torch.device | str | None = None) -> tuple[Method, dict[str, Any]]:
    """A method with its weights from a checkpoint, and the checkpoint's config.

    The weights go to ``device`` (default ``auto``: CUDA when available, else the CPU), whatever device the run
    trained on; the returned config's ``device`` says where they are (a run's ``device: cuda`` predicts on a CPU).
    """
    state = load_checkpoint(path)  # tensors mapped to the CPU first
    if "config" not in state:
        raise CheckpointError(f"{path}: checkpoint holds no config; was it written by dust?")
    device = device if isinstance(device, torch.device) else pick_device(device or "auto")
    cfg = full_config({**state["config"], "device": str(device)})
    check_compatible(state, path, cfg["method"], cfg["num_classes"])
    method = build_method(cfg, device)
    load_network_weights(method.networks, state, path)
    return method, cfg
