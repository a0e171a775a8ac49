"""Run configuration: a flat mapping of keys, loaded from YAML, overridden with ``--set key=value``.

A config file is the full record of a run: the trainer writes the resolved config into the run directory.
Unknown keys are an error (a misspelt key must never be silently ignored), except the keys a method
declares in its own ``defaults``.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from dust.storage import atomic_write_text

# Every key the engine understands, with its default. Methods add their own keys (Method.defaults).
BASE_DEFAULTS: dict[str, Any] = {
    # what to train
    "method": "supervised",
    # unet | dual_unet | unet_ds | vnet | dual_vnet | vnet_ds (dust.models); 2D or 3D as patch_size has 2 or 3 numbers
    "model": "unet2d",
    # decoder upsampling: bilinear / trilinear (linear interpolation, SSL4MIS's U-Net) | deconv (transposed conv)
    "upsample": "bilinear",
    "channels": [16, 32, 64, 128, 256],
    "dropout": [0.05, 0.1, 0.2, 0.3, 0.5],
    # data
    # reader: ssl4mis_h5 (ACDC-style slices + volumes) | la_h5 (UA-MT's left-atrium volumes) | prepared_3d
    # (dust prepare --dims 3: volumes read crop by crop from disk)
    "dataset": "ssl4mis_h5",
    "data_dir": "ACDC",  # a bare name is looked up under $DUST_DATA; ./x or /x are used as given
    "generate_phantom": False,  # write the synthetic phantom into data_dir first if it is missing
    "phantom_seed": 0,
    "in_channels": 1,
    # how a NIfTI case becomes model input: set by `dust prepare` (its dust.yaml), applied again by `dust predict`
    # minmax ((x - min) / (max - min) per case, SSL4MIS) | zscore (per case) | zscore_nonzero (per case, inside the
    # nonzero mask: skull-stripped MRI) | ct (clip + z-score with the dataset's intensity_stats) | none (as stored)
    "intensity_norm": "minmax",
    "intensity_stats": None,  # ct: per channel {low, high, mean, std} over the dataset's foreground (dust prepare)
    "crop_nonzero": False,  # crop each case to where a channel is nonzero (undone at prediction); dust prepare --dims 3
    # mm per (S, H, W) axis the model is trained at: every case is resampled to it for inference and the
    # probabilities back (dust prepare --dims 3 stores the training volumes resampled); null: no resampling
    "target_spacing": None,
    # file voxel axis that comes first in dust's (S, H, W) arrays: the one a 2D model slices along (through-plane)
    "slice_axis": 2,
    "modalities": None,  # channel indices taken from multi-modality input; null: all, in file order
    "num_classes": 4,
    "class_names": ["background", "RV", "Myo", "LV"],
    "labeled_patients": 7,
    "val_split": "val",
    "holdout_cases": 8,  # la_h5 without a val.list: the last N cases of train.list are the validation split
    "spacing": None,  # voxel size in mm per (S, H, W) axis where the files record none (LA: 0.625 isotropic)
    # resample every case by this factor when loading (image linear, label nearest), so a CPU can train 3D;
    # evaluation is always on the original grid (probabilities resampled back, then argmax)
    "resample_factor": 1.0,
    "patch_size": [128, 128],  # 2 numbers: a 2D model on slices; 3 numbers: a 3D model on volumes
    # how a training item becomes a patch (and how inference covers a case): resize (the whole slice resized to
    # patch_size, ACDC as SSL4MIS) | crop (pad if smaller, random crop; inference by a sliding window, as LA papers)
    "spatial_policy": "resize",
    "foreground_oversample": 0.0,  # crop: share of labelled crops centred on a random foreground voxel (nnU-Net 0.33)
    # what a class that is empty in the prediction or the reference scores (docs/metrics.md): dust | nnunet | exclude
    "empty_mask_policy": "dust",
    "augment_rot_flip": True,
    "augment_rotate_deg": 20.0,
    # how slices are resized to patch_size, in training and inference: bilinear | nearest (SSL4MIS's order-0 zoom)
    "image_interpolation": "bilinear",
    # sliding window (spatial_policy crop): window overlap per axis, or a stride in voxels per axis (overrides the
    # overlap; the LA papers' [4, 18, 18] on [80, 112, 112]), blending of overlapping windows (gaussian, as nnU-Net,
    # or constant: the plain average of SSL4MIS's test_single_case), windows per forward
    "inference_overlap": 0.5,
    "inference_stride": None,
    "inference_blend": "gaussian",
    "inference_windows_per_batch": 2,
    # optimisation
    "iterations": 4000,
    "batch_size": 8,
    "unlabeled_batch_size": 8,
    # How many labelled items a step without unlabelled data draws (method supervised, the labelled-only
    # pre-training of DUST / ST++): "ssl" batch_size + unlabeled_batch_size, as many as a semi-supervised step puts
    # through the network, as SSL4MIS's fully supervised scripts and UA-MT's supervised LA script train their
    # baseline (BatchNorm normalises over the same number of crops); "labeled" batch_size only (dust before
    # 2026-12; records made so name it in their options).
    "supervised_batch": "ssl",
    "optimizer": "sgd",  # sgd | adam | adamw (dust.optim; a method may supply its own: Method.configure_optimizer)
    "lr_schedule": "poly",  # poly | constant | cosine, from lr at each stage that restarts the schedule
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "lr_power": 0.9,  # poly schedule: lr * (1 - it / iterations) ** lr_power
    "seed": 1337,
    # engine
    "val_every": 200,
    "log_every": 20,  # mean loss terms into train.log, TensorBoard and the progress bar every N iterations
    "keep_checkpoints": 2,
    # Before each validation (and so before a stage's pseudo-labels are made from that checkpoint), re-estimate
    # the BatchNorm running statistics over this many training batches with dropout off (dust.models.batchnorm).
    # 0: off, eval mode uses the momentum averages kept in training (SSL4MIS, the paper).
    "batchnorm_recalibration_batches": 0,
    # bf16 autocast: auto | true | false. auto = on where the hardware computes bf16 natively (a CUDA GPU with
    # bf16, a CPU with AVX512-BF16/AMX); on other CPUs (e.g. AVX2 only) PyTorch emulates bf16 and a training step
    # is much slower than fp32 (docs/results/analysis.md#bf16-on-a-cpu-that-only-emulates-it). The resolved value is
    # what the run records.
    "bf16": "auto",
    "channels_last": True,  # channels_last memory format (channels_last_3d for a 3D model): faster convolutions on CPU
    "threads": 0,  # torch.set_num_threads; 0 keeps torch's default
    "device": "auto",  # auto (CUDA when available, else CPU) | cpu | cuda | cuda:N; dust train --device sets it
    # several processes (torchrun / dust train --nproc): BatchNorm statistics over all ranks (CUDA only)
    "sync_batchnorm": False,
    "run_dir": "runs/{method}_{labeled_patients}p_seed{seed}",
    "tensorboard": True,
    "progress": True,
}


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key or file."""


def parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (``7`` -> int, ``[1,2]`` -> list, ``off`` -> False)."""
    return yaml.safe_load(text)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the last one
    silently, so a config with ``lr`` twice would train with whichever the user did not look at."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str | int | float | bool | None):
                continue  # an unhashable key: YAML's own constructor reports it
            if key in seen:
                raise ConfigError(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          "save the config as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                _extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and apply ``key=value`` overrides (no defaults merged yet).

    ``extends: other.yaml`` (a path relative to the file) reads that config first and lays this file's keys over
    it, so a protocol variant (e.g. LA at full resolution on a GPU) states only what differs. ``path`` that is not
    a file is looked up among the configs shipped with dust (:func:`find_config`: ``la/mcf`` from any folder).
    """
    cfg: dict[str, Any] = {}
    if path is not None:
        path = find_config(path)
        if path.resolve() in _extended_by:  # a chain of extends: that comes back to a file would never end
            chain = " -> ".join(str(p) for p in (*_extended_by, path.resolve()))
            raise ConfigError(f"{path}: extends: comes back to itself ({chain})")
        loaded = _read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
        loaded = dict(loaded or {})
        base = loaded.pop("extends", None)
        if base is not None:  # a protocol variant: its base config's keys, then this file's
            if not isinstance(base, str):
                raise ConfigError(f"{path}: extends: expected the path of a config file, got {base!r}")
            cfg.update(load_config(path.parent / base, None, (*_extended_by, path.resolve())))
        cfg.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            cfg[key.strip()] = parse_value(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}: not a valid value: {' '.join(str(err).split())}") from None
    return cfg


def shipped_configs() -> Path:
    """The configs shipped with dust: ``dust/configs`` inside an installed wheel, else the repository's ``configs/``
    (a source checkout or an editable install; the wheel's copy is built from that one folder)."""
    here = Path(__file__).resolve().parent
    inside = here / "configs"
    return inside if inside.is_dir() else here.parents[1] / "configs"


def find_config(name: str | Path) -> Path:
    """A config file: ``name`` when it is a file, else a shipped config named like it (``la/mcf``, ``la/mcf.yaml``
    or ``configs/la/mcf.yaml``: the repository's path works from any folder too)."""
    path = Path(name)
    if path.is_file():
        return path
    root = shipped_configs()
    relative = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    if not path.is_absolute():
        for candidate in (root / relative, root / relative.with_name(relative.name + ".yaml")):
            if candidate.is_file():
                return candidate
    groups = ", ".join(sorted(f"{d.name}/*" for d in root.iterdir() if d.is_dir())) if root.is_dir() else "none"
    raise ConfigError(f"config file not found: {path} (nor a config shipped with dust: {groups}; e.g. la/mcf)")


def resolve_config(cfg: dict[str, Any], method_defaults: dict[str, Any]) -> dict[str, Any]:
    """Merge engine and method defaults under the user's values; reject keys nobody reads."""
    allowed = {**BASE_DEFAULTS, **method_defaults}
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown} for method {cfg.get('method', 'supervised')!r}; "
            f"known keys: {sorted(allowed)}"
        )
    resolved = copy.deepcopy(allowed)
    resolved.update({k: _typed(k, v, allowed[k]) for k, v in copy.deepcopy(cfg).items()})
    _check_finite(resolved)
    check_device_name(resolved["device"])
    resolved["bf16"] = resolve_bf16(resolved["bf16"], resolved["device"])
    _check_choices(resolved)
    if len(resolved["class_names"]) != resolved["num_classes"]:
        raise ConfigError(
            f"class_names has {len(resolved['class_names'])} entries but num_classes is {resolved['num_classes']}"
        )
    return resolved


CHOICES = {"spatial_policy": ("resize", "crop"), "empty_mask_policy": ("dust", "nnunet", "exclude"),
           "inference_blend": ("gaussian", "constant"), "supervised_batch": ("ssl", "labeled"),
           "optimizer": ("sgd", "adam", "adamw"), "lr_schedule": ("poly", "constant", "cosine"),
           "dataset": ("ssl4mis_h5", "la_h5", "prepared_3d"),
           "intensity_norm": ("minmax", "zscore", "zscore_nonzero", "ct", "none")}

# Numeric engine keys: (integer?, lowest allowed, highest allowed or None, is the lowest itself allowed?).
# Checked up front so a bad value is one line naming the key, not a ZeroDivisionError or torch's message mid-run.
RANGES: dict[str, tuple[bool, float, float | None, bool]] = {
    **{k: (True, 1, None, True) for k in ("iterations", "batch_size", "val_every", "log_every", "keep_checkpoints",
                                          "labeled_patients", "num_classes", "in_channels",
                                          "inference_windows_per_batch")},
    **{k: (True, 0, None, True) for k in ("unlabeled_batch_size", "batchnorm_recalibration_batches", "threads",
                                          "holdout_cases", "seed", "phantom_seed", "slice_axis")},
    "lr": (False, 0, None, False), "weight_decay": (False, 0, None, True), "momentum": (False, 0, 1, True),
    "lr_power": (False, 0, None, True), "foreground_oversample": (False, 0, 1, True),
    "augment_rotate_deg": (False, 0, 180, True),
}


def _check_finite(cfg: dict[str, Any]) -> None:
    """NaN and infinity pass every range check (every comparison with NaN is false); no key means them."""
    for key, value in cfg.items():
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{key}: {value!r} is not a finite number")


def _check_ranges(cfg: dict[str, Any]) -> None:
    for key, (integer, low, high, low_ok) in RANGES.items():
        value = cfg[key]
        if integer and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if value < low or (value == low and not low_ok) or (high is not None and value > high):
            bound = f"{'>=' if low_ok else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise ConfigError(f"{key}: {value!r} is out of range (expected {bound})")


def _check_choices(cfg: dict[str, Any]) -> None:
    _check_ranges(cfg)
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            raise ConfigError(f"{key}: {cfg[key]!r} is not one of {list(choices)}")
    if not isinstance(cfg["patch_size"], list | tuple):
        raise ConfigError(f"patch_size {cfg['patch_size']!r}: give 2 (a 2D model) or 3 (a 3D model) positive integers")
    dims = len(cfg["patch_size"])
    if dims not in (2, 3) or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0
                                     for p in cfg["patch_size"]):
        raise ConfigError(f"patch_size {cfg['patch_size']}: give 2 (a 2D model) or 3 (a 3D model) positive integers")
    for key in ("inference_stride", "inference_overlap", "spacing"):
        value = cfg[key]
        if isinstance(value, list) and len(value) != dims:
            raise ConfigError(f"{key} {value}: one value per axis of patch_size {cfg['patch_size']}")
    _check_patch_divisible(cfg)
    target = cfg["target_spacing"]
    if target is not None and (not isinstance(target, list | tuple) or len(target) != 3 or dims != 3 or not all(
            isinstance(t, int | float) and not isinstance(t, bool) and t > 0 for t in target)):
        raise ConfigError(f"target_spacing {target!r}: three positive numbers (mm per S, H, W axis), for a 3D "
                          "patch_size")
    if cfg["intensity_norm"] == "ct":
        _check_intensity_stats(cfg["intensity_stats"], int(cfg["in_channels"]))
    factor = cfg["resample_factor"]
    if not (isinstance(factor, int | float) and 0 < factor <= 4):
        raise ConfigError(f"resample_factor {factor!r}: expected a number in (0, 4]")
    format_run_dir(cfg)  # its placeholders are checked here, before anything is read or written


def _check_intensity_stats(stats: Any, channels: int) -> None:
    """``intensity_stats`` for ``ct``: one {low, high, mean, std} per channel, finite, low < high, std > 0."""
    how = ("intensity_norm: ct needs intensity_stats, one {low, high, mean, std} per input channel, as dust "
           "prepare --norm ct writes them into the dataset's dust.yaml")
    if not isinstance(stats, list) or len(stats) != channels:
        raise ConfigError(f"intensity_stats {stats!r}: {how}")
    for st in stats:
        values = [st.get(k) for k in ("low", "high", "mean", "std")] if isinstance(st, dict) else []
        if len(values) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                                       for v in values) or not values[0] < values[1] or not values[3] > 0:
            raise ConfigError(f"intensity_stats entry {st!r}: {how} (finite numbers, low < high, std > 0)")


def _check_patch_divisible(cfg: dict[str, Any]) -> None:
    """Every dust network halves each axis once per level below the top (``channels`` has the levels), so each
    patch size must be a multiple of 2**(levels - 1); otherwise the decoder's sizes do not meet its skips."""
    channels = cfg["channels"]
    if not isinstance(channels, list | tuple) or len(channels) < 1:
        return  # the model refuses it with its own message
    step = 2 ** (len(channels) - 1)
    patch = list(cfg["patch_size"])
    if all(p % step == 0 for p in patch):
        return
    down = [max(step, p // step * step) for p in patch]
    up = [-(-p // step) * step for p in patch]
    raise ConfigError(f"patch_size {patch}: the {cfg['model']} halves each axis {len(channels) - 1} times, so each "
                      f"size must be a multiple of {step}; e.g. {down} or {up}")


DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(device: Any) -> None:
    """Refuse a ``device`` that is none of auto | cpu | cuda | cuda:N (e.g. a misspelt one), naming the key.

    Whether the device exists on this machine is checked where a device is picked
    (:func:`dust.methods.loading.pick_device`), so a checkpoint trained with ``device: cuda`` still loads on a CPU.
    """
    if not isinstance(device, str) or not DEVICE_NAME.match(device):
        raise ConfigError(f"device: {device!r} is not one of auto, cpu, cuda, cuda:N")


def resolve_bf16(value: Any, device: str) -> bool:
    """``bf16: auto`` -> whether ``device`` (auto | cpu | cuda...) computes bf16 natively; true/false pass through."""
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise ConfigError(f"bf16: expected auto, true or false, got {value!r}")
    import torch  # here, not at the top: reading a config should not need torch

    if device != "cpu" and torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    # oneDNN reports bf16 "supported" on any AVX512 CPU, where it is emulated (a 3D step ~10x slower than fp32):
    # the CPU's own flags say whether it computes bf16 natively
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and cpu_has_native_bf16()


_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX512-BF16, AMX) and Arm (FEAT_BF16)


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU's flags name a bf16 instruction set; True where /proc/cpuinfo cannot be read (not Linux),
    leaving the decision to oneDNN's own check."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return True
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return bool(_NATIVE_BF16_FLAGS & set(value.split()))
    return True


def _typed(key: str, value: Any, default: Any) -> Any:
    """A value with the type of its numeric default, or a ConfigError naming the key.

    YAML 1.1 reads ``1e-5`` (no dot) as a string; without this it would reach the optimiser and fail deep inside.
    """
    if isinstance(default, bool) or value is None or not isinstance(default, int | float):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(default, float):
        return float(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def resolve_data_dir(data_dir: str | Path) -> Path:
    """Where the dataset lives: ``./x`` and absolute paths as given, a bare name under ``$DUST_DATA``."""
    text = str(data_dir)
    if os.path.isabs(text) or text.startswith(("./", "../")):
        return Path(text)
    base = os.environ.get("DUST_DATA")
    return Path(base) / text if base else Path(text)


def format_run_dir(cfg: dict[str, Any]) -> Path:
    """The run directory, with ``{method}``-style placeholders filled from the config."""
    method = str(cfg["method"]).rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    try:
        return Path(str(cfg["run_dir"]).format(**{**cfg, "method": method}))
    except KeyError as err:
        raise ConfigError(f"run_dir {cfg['run_dir']!r}: unknown placeholder {{{err.args[0]}}}; placeholders are "
                          "config keys, e.g. {method}, {labeled_patients}, {seed}") from None
    except (ValueError, IndexError, AttributeError) as err:
        raise ConfigError(f"run_dir {cfg['run_dir']!r}: {err}; write a literal brace as {{{{ or }}}}") from None


def dump_config(cfg: dict[str, Any], path: str | Path) -> None:
    # atomic: a run killed while rewriting its config.yaml on resume can still be resumed
    atomic_write_text(yaml.safe_dump(cfg, sort_keys=True), path)
