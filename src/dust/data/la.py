"""Reader for the left-atrium (LA) layout of UA-MT (Yu et al., MICCAI 2019), which the LA papers share.

Layout under a dataset root (``../shared/data/LA``; dust's 3D phantom writes the same)::

    volumes/<id>/mri_norm2.h5   image float32 (X, Y, Z) z-scored, label uint8 {0, 1} (gzip)
    train.list                  case ids
    val.list, test.list         optional: held-out case ids

Splits: labelled = the first ``labeled_patients`` of the training pool (8 / 16: the standard 10% / 20%);
validation = ``val.list`` when present, else the last ``holdout_cases`` of ``train.list`` (taken out of the pool);
unlabelled = the rest of the pool, whose labels are never read. ``val_split: test`` (``dust evaluate --split test``)
reads ``test.list``. Volumes are turned into dust's (S, H, W) order with ``slice_axis`` (2: the axial Z axis first,
as a NIfTI of the same scan would be by :func:`dust.data.nifti.to_stored`); ``spacing`` (mm per (S, H, W) axis)
is taken from the config, the h5 files record none (LA: 0.625 mm isotropic).

Training items are the whole volumes resampled by ``resample_factor`` (image trilinear, label nearest) and held in
memory; validation volumes stay at their original resolution, where evaluation scores them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dust.data.nifti import LA_CASE_FILE, to_stored
from dust.data.transforms import resampled_shape, resize_image, resize_label
from dust.data.types import DataError, ItemSet, Volume, check_label_values, read_h5_arrays, read_list

CASE_FILE = LA_CASE_FILE


def case_path(root: Path, case_id: str) -> Path:
    return root / "volumes" / case_id / CASE_FILE


def split_ids(root: Path, labeled: int, val_split: str, holdout: int) -> dict[str, list[str]]:
    """``{"labeled", "unlabeled", "eval"}`` case ids: the training pool's split and the volumes of ``val_split``."""
    train_list = root / "train.list"
    train = read_list(train_list)
    if (root / "val.list").is_file():
        held_out = read_list(root / "val.list")
        pool = [c for c in train if c not in set(held_out)]
    else:
        if not 0 < holdout < len(train):
            raise DataError(f"{train_list}: holdout_cases={holdout} must leave training cases among its "
                            f"{len(train)} (no val.list: the last holdout_cases are the validation split)")
        held_out, pool = train[-holdout:], train[:-holdout]
    if labeled < 1:
        raise DataError(f"{train_list}: labeled_patients must be at least 1, got {labeled}")
    if labeled > len(pool):
        raise DataError(f"{train_list}: {labeled} labelled cases requested but the training pool has only "
                        f"{len(pool)} (after the {len(held_out)} validation cases)")
    evaluated = held_out if val_split == "val" else read_list(root / f"{val_split}.list")
    return {"labeled": pool[:labeled], "unlabeled": pool[labeled:], "eval": evaluated}


def read_case(root: Path, case_id: str, cfg: dict[str, Any], with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """image (C, S, H, W) float32 and label (S, H, W) uint8 (or None) of one case, in dust's axis order."""
    path = case_path(root, case_id)
    image, label = read_h5_arrays(path, with_label)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise DataError(f"{path}: expected a volume (X, Y, Z) or (C, X, Y, Z), got image shape {image.shape}")
    image = to_stored(image, int(cfg["slice_axis"]))
    if label is None:
        return image, None
    if label.dtype.kind == "f" and not np.array_equal(label, np.round(label)):
        raise DataError(f"{path}: label holds non-integer values")
    check_label_values(path, label, int(cfg["num_classes"]))
    return image, to_stored(label, int(cfg["slice_axis"])).astype(np.uint8)


def _items(root: Path, ids: list[str], cfg: dict[str, Any], with_labels: bool) -> ItemSet:
    images, labels = [], []
    for case_id in ids:
        image, label = read_case(root, case_id, cfg, with_labels)
        size = resampled_shape(image.shape[1:], float(cfg["resample_factor"]))
        images.append(resize_image(torch.from_numpy(image)[None], size, cfg["image_interpolation"])[0])
        if label is not None:
            labels.append(resize_label(torch.from_numpy(label)[None], size)[0].to(torch.uint8))
    return ItemSet(list(ids), list(ids), images, labels if with_labels else None)


def load_training_items(cfg: dict[str, Any], root: Path) -> tuple[ItemSet, ItemSet]:
    """Labelled and unlabelled training volumes (resampled), in memory."""
    ids = split_ids(root, int(cfg["labeled_patients"]), "val", int(cfg["holdout_cases"]))
    return _items(root, ids["labeled"], cfg, True), _items(root, ids["unlabeled"], cfg, False)


def load_volumes(cfg: dict[str, Any], root: Path, split: str, with_labels: bool = True) -> list[Volume]:
    """The volumes of ``split`` (val: ``val.list`` or the held-out end of ``train.list``; else ``<split>.list``)
    at their original resolution."""
    ids = split_ids(root, 1, split, int(cfg["holdout_cases"]))["eval"]
    spacing = None if cfg["spacing"] is None else tuple(float(s) for s in cfg["spacing"])
    volumes = []
    for case_id in ids:
        image, label = read_case(root, case_id, cfg, with_labels)
        if spacing is not None and len(spacing) != image.ndim - 1:
            raise DataError(f"{case_path(root, case_id)}: spacing {list(spacing)} does not fit a volume of shape "
                            f"{image.shape[1:]}")
        volumes.append(Volume(case_id, image, label, spacing))
    return volumes
