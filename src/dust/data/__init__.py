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

from dust.config import resolve_data_dir
from dust.data.prepare import check_prepared
from dust.data.readers import DATASETS, reader_of
from dust.data.types import DataError, ItemSet, SliceSet, Volume

__all__ = ["DataError", "ItemSet", "SliceSet", "Volume", "TrainingData", "load_training_data", "load_split",
           "write_phantom", "check_data", "unlabelled_thumbnails", "DATASETS"]

log = logging.getLogger("dust")


@dataclass
class TrainingData:
    labeled: ItemSet
    unlabeled: ItemSet
    val: list[Volume]


def write_phantom(cfg: dict[str, Any], root: Path) -> None:
    """The synthetic dataset of the config's reader, written into ``root`` unless it is already there."""
    write = reader_of(cfg).write_demo
    if write is None:
        raise DataError(f"generate_phantom: the {cfg['dataset']} reader has no demo data; make the dataset with "
                        "`dust prepare` and set generate_phantom: false")
    write(cfg, root)


def _checked_root(cfg: dict[str, Any], root: Path) -> Path:
    reader_of(cfg)  # a known reader
    if not root.is_dir():
        raise DataError(
            f"{root}: dataset folder not found (data_dir={cfg['data_dir']!r}; a bare name is looked up under "
            "$DUST_DATA, e.g. DUST_DATA=../shared/data for ACDC and LA)"
        )
    return root


def load_split(cfg: dict[str, Any], root: Path, split: str, with_labels: bool = True) -> list[Volume]:
    """Whole volumes of a split (``val``, ``test``...) at their original resolution, for evaluation."""
    _checked_root(cfg, root)
    return reader_of(cfg).volumes(cfg, root, split, with_labels)


def load_training_data(cfg: dict[str, Any], root: Path) -> TrainingData:
    """Labelled items, unlabelled pool and validation volumes for a config (in memory, or on disk for
    ``prepared_3d``)."""
    if cfg["generate_phantom"]:
        write_phantom(cfg, root)
    _checked_root(cfg, root)
    check_prepared(cfg, root)
    labeled, unlabeled = reader_of(cfg).training_items(cfg, root)
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


def check_data(cfg: dict[str, Any]) -> list[str]:
    """Problems of the configured dataset, one line each naming the file; an empty list when it is usable
    (``dust check-data``; ``dust train`` runs it first). The checks per layout: :mod:`dust.data.check`."""
    root = resolve_data_dir(cfg["data_dir"])
    if cfg["dataset"] not in DATASETS:
        return [f"dataset {cfg['dataset']!r}: no checker for this reader (known: {', '.join(DATASETS)})"]
    if cfg["generate_phantom"]:  # as training does: the phantom is written on first use
        write_phantom(cfg, root)
    if not root.is_dir():
        return [f"{root}: dataset folder not found (data_dir={cfg['data_dir']!r}; a bare name is looked up "
                "under $DUST_DATA)"]
    try:  # the config must read the data the way dust prepare made it, as training checks
        check_prepared(cfg, root)
    except DataError as err:
        return [str(err)]
    return reader_of(cfg).problems(cfg, root)


def unlabelled_thumbnails(cfg: dict[str, Any], root: Path, ids: list[str]) -> list[Any]:
    """A grey-value image per unlabelled item: the slice itself, or a volume's middle axial slice. Reads just
    these items (loading the training data would read the whole pool), and no label."""
    return reader_of(cfg).thumbnails(cfg, root, ids)
