"""Data: readers (SSL4MIS h5 slices, LA h5 volumes), splits, phantoms, augmentation and the two-stream sampler.

Every reader gives the same things (:mod:`dust.data.types`): training items ``(C, *spatial)`` (slices for a 2D
model, volumes for a 3D one), the unlabelled pool, and whole volumes (C, S, H, W) to evaluate on. The config's
``dataset`` picks the reader: ``ssl4mis_h5`` (:mod:`dust.data.ssl4mis`, ACDC), ``la_h5`` (:mod:`dust.data.la`) or
``prepared_3d`` (:mod:`dust.data.volumes`, what ``dust prepare --dims 3`` writes; read from disk crop by crop).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dust.data import la, ssl4mis, volumes
from dust.data.prepare import check_prepared
from dust.data.types import DataError, ItemSet, SliceSet, Volume

__all__ = ["DataError", "ItemSet", "SliceSet", "Volume", "TrainingData", "load_training_data", "load_split",
           "write_phantom"]

log = logging.getLogger("dust")
DATASETS = ("ssl4mis_h5", "la_h5", "prepared_3d")


@dataclass
class TrainingData:
    labeled: ItemSet
    unlabeled: ItemSet
    val: list[Volume]


def write_phantom(cfg: dict[str, Any], root: Path) -> None:
    """The synthetic dataset of the config's reader, written into ``root`` unless it is already there."""
    if cfg["dataset"] == "la_h5":
        from dust.data.phantom3d import generate_la_phantom

        generate_la_phantom(root, seed=int(cfg["phantom_seed"]))
    else:
        from dust.data.phantom import generate_phantom

        generate_phantom(root, seed=int(cfg["phantom_seed"]))


def _checked_root(cfg: dict[str, Any], root: Path) -> Path:
    if cfg["dataset"] not in DATASETS:
        raise DataError(f"dataset {cfg['dataset']!r} is not a known reader (known: {', '.join(DATASETS)})")
    if not root.is_dir():
        raise DataError(
            f"{root}: dataset folder not found (data_dir={cfg['data_dir']!r}; a bare name is looked up under "
            "$DUST_DATA, e.g. DUST_DATA=../shared/data for ACDC and LA)"
        )
    return root


def load_split(cfg: dict[str, Any], root: Path, split: str, with_labels: bool = True) -> list[Volume]:
    """Whole volumes of a split (``val``, ``test``...) at their original resolution, for evaluation."""
    _checked_root(cfg, root)
    if cfg["dataset"] == "la_h5":
        return la.load_volumes(cfg, root, split, with_labels)
    if cfg["dataset"] == "prepared_3d":
        return volumes.load_volumes(cfg, root, split, with_labels)
    return ssl4mis.load_volumes(root, split, int(cfg["num_classes"]), with_labels)


def load_training_data(cfg: dict[str, Any], root: Path) -> TrainingData:
    """Labelled items, unlabelled pool and validation volumes for a config (in memory, or on disk for
    ``prepared_3d``)."""
    if cfg["generate_phantom"]:
        write_phantom(cfg, root)
    _checked_root(cfg, root)
    check_prepared(cfg, root)
    if cfg["dataset"] == "la_h5":
        labeled, unlabeled = la.load_training_items(cfg, root)
    elif cfg["dataset"] == "prepared_3d":
        labeled, unlabeled = volumes.load_training_items(cfg, root)
    else:
        labeled, unlabeled = ssl4mis.load_training_slices(root, int(cfg["labeled_patients"]), int(cfg["num_classes"]))
    val = load_split(cfg, root, cfg["val_split"])
    overlap = (set(labeled.patients) | set(unlabeled.patients)) & {v.patient for v in val}
    if overlap:
        raise DataError(f"{root}: patient(s) {sorted(overlap)} are in both the training list and the "
                        f"{cfg['val_split']} split")
    channels = {int(x.shape[0]) for x in labeled.images + unlabeled.images} | {v.channels for v in val}
    if channels != {int(cfg["in_channels"])}:
        raise DataError(f"{root}: the images have {sorted(channels)} channel(s) but in_channels is "
                        f"{cfg['in_channels']}")
    _check_dimensions(cfg, root, labeled)
    log.info("data %s: %d labelled items (%d patients), %d unlabelled items, %d %s volumes", root,
             len(labeled), len(set(labeled.patients)), len(unlabeled), len(val), cfg["val_split"])
    return TrainingData(labeled, unlabeled, val)


def _check_dimensions(cfg: dict[str, Any], root: Path, labeled: ItemSet) -> None:
    """The patch must have as many axes as the items: 2 for slices, 3 for volumes."""
    item_dims = labeled.images[0].dim() - 1
    if len(cfg["patch_size"]) != item_dims:
        kind = "slices (H, W)" if item_dims == 2 else "volumes (S, H, W)"
        raise DataError(f"{root}: the {cfg['dataset']} reader gives training {kind}, but patch_size "
                        f"{cfg['patch_size']} has {len(cfg['patch_size'])} numbers")
