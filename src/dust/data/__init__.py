"""Data: readers, splits by patient, the phantom generator, augmentation and the two-stream sampler."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dust.data.prepare import check_prepared
from dust.data.ssl4mis import DataError, SliceSet, Volume, load_training_slices, load_volumes

__all__ = ["DataError", "SliceSet", "Volume", "TrainingData", "load_training_data"]

log = logging.getLogger("dust")


@dataclass
class TrainingData:
    labeled: SliceSet
    unlabeled: SliceSet
    val: list[Volume]


def load_training_data(cfg: dict[str, Any], root: Path) -> TrainingData:
    """Labelled slices, unlabelled pool and validation volumes for a config, all held in memory."""
    if cfg["generate_phantom"]:
        from dust.data.phantom import generate_phantom

        generate_phantom(root, seed=int(cfg["phantom_seed"]))
    if cfg["dataset"] != "ssl4mis_h5":
        raise DataError(f"dataset {cfg['dataset']!r} is not a known reader (known: ssl4mis_h5)")
    if not root.is_dir():
        raise DataError(
            f"{root}: dataset folder not found (data_dir={cfg['data_dir']!r}; a bare name is looked up under "
            "$DUST_DATA, e.g. DUST_DATA=../shared/data for ACDC)"
        )
    check_prepared(cfg, root)
    labeled, unlabeled = load_training_slices(root, int(cfg["labeled_patients"]), int(cfg["num_classes"]))
    val = load_volumes(root, cfg["val_split"], int(cfg["num_classes"]))
    overlap = (set(labeled.patients) | set(unlabeled.patients)) & {v.patient for v in val}
    if overlap:
        raise DataError(
            f"{root}: patient(s) {sorted(overlap)} are in both train_slices.list and {cfg['val_split']}.list"
        )
    channels = {int(x.shape[0]) for x in labeled.images + unlabeled.images} | {int(v.image.shape[0]) for v in val}
    if channels != {int(cfg["in_channels"])}:
        raise DataError(f"{root}: the images have {sorted(channels)} channel(s) but in_channels is "
                        f"{cfg['in_channels']}")
    log.info("data %s: %d labelled slices (%d patients), %d unlabelled slices, %d %s volumes", root,
             len(labeled), len(set(labeled.patients)), len(unlabeled), len(val), cfg["val_split"])
    return TrainingData(labeled, unlabeled, val)
