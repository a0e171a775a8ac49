"""A method from a config (networks built, on a device), or trained, from a checkpoint.

Everything that needs a model outside training (evaluation, ``dust predict`` / ``rank``, the report, the
diagnostics under ``benchmarks/``) gets it here, so none of them depends on the training engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dust.config import ConfigError, check_device_name, resolve_config
from dust.methods import Method, get_method, name_user_method, refuse_unnamed_method
from dust.models.layers import memory_format
from dust.storage import (
    CheckpointError,
    check_compatible,
    describe_content,
    load_checkpoint,
    load_network_weights,
)


def full_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config the user wrote (file, ``--set``, a dict in their code) + the engine's and the method's defaults.

    Its ``method``, if ``module:Class``, is the user's own choice and may be imported. A config read back from a
    checkpoint or a run directory goes through :func:`stored_config` instead.
    """
    name_user_method(cfg.get("method", "supervised"))
    return resolve_config(cfg, get_method(cfg.get("method", "supervised")).defaults)


# Keys that configs written before 2026-12 lack, with the value that reproduces what those runs did (the defaults
# changed then so that baselines train as their references do). dust writes every key into a run's config.yaml and
# its checkpoints, so a stored config without one of these predates it: a resumed run continues as it began.
ENGINE_KEYS_OF_OLDER_RUNS = {"supervised_batch": "labeled"}
METHOD_KEYS_OF_OLDER_RUNS = {
    "cps": {"init": "kaiming_xavier", "cross_labeled": True},
    "fixdyn": {"init": "kaiming_xavier"},
    "mc_net": {"sup_loss": "dice_ce"},
    "multicure": {"framework": "as_printed"},
}


def with_keys_of_older_runs(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (a stored config) with each key its run predates set to the value it had before the key existed
    (:data:`ENGINE_KEYS_OF_OLDER_RUNS`, and :data:`METHOD_KEYS_OF_OLDER_RUNS` of its built-in method)."""
    older = {**ENGINE_KEYS_OF_OLDER_RUNS, **METHOD_KEYS_OF_OLDER_RUNS.get(str(cfg.get("method", "supervised")), {})}
    return {**older, **cfg}


def stored_config(cfg: Any, source: Path, how: str = "--method {name}") -> dict[str, Any]:
    """A config dust wrote earlier (in a checkpoint, or a run's ``config.yaml``), resolved for use here.

    It may come from someone else: a ``module:Class`` method it names is imported only when the user named the
    same class in this command (``how``, with ``{name}``, says how), else an error naming ``source``. A device it
    recorded that this machine lacks (a GPU run read on a laptop) becomes ``auto``: where a model ran before is
    no choice of the user's here.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: the stored config is not a mapping of key: value")
    name = str(cfg.get("method", "supervised"))
    refuse_unnamed_method(name, source, how.format(name=name))
    if not _device_available(str(cfg.get("device", "auto"))):
        cfg = {**cfg, "device": "auto"}
    try:
        return resolve_config(with_keys_of_older_runs(cfg), get_method(name).defaults)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _device_available(name: str) -> bool:
    if name.startswith("cuda"):
        index = name.partition(":")[2]
        return torch.cuda.is_available() and int(index or 0) < torch.cuda.device_count()
    if name == "mps":
        return torch.backends.mps.is_available()
    return name in ("auto", "cpu")


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
    """A method with its weights from a checkpoint, and the checkpoint's config. Loading runs no code of the
    checkpoint's: weights only, and its method must be built in or named by the user (:func:`stored_config`).

    The weights go to ``device`` (default ``auto``: CUDA when available, else the CPU), whatever device the run
    trained on; the returned config's ``device`` says where they are (a run's ``device: cuda`` predicts on a CPU).
    """
    state = load_checkpoint(path)  # tensors mapped to the CPU first
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"{path}: not a dust checkpoint: it holds {describe_content(state)}, no config")
    device = device if isinstance(device, torch.device) else pick_device(device or "auto")
    stored = state["config"]
    cfg = stored_config({**stored, "device": str(device)} if isinstance(stored, dict) else stored, path)
    check_compatible(state, path, cfg["method"], cfg["num_classes"])
    method = build_method(cfg, device)
    load_network_weights(method.networks, state, path)
    return method, cfg
