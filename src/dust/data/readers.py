"""The dataset readers, by the config's ``dataset``: one table of what each layout gives.

A new layout is one :class:`Reader` here: its training items, whole volumes of a split, the problems ``dust
check-data`` reports, thumbnails of unlabelled items for the report, and (optionally) demo data in the layout.
Everything else in dust reaches a dataset through this table, never by comparing the reader's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dust.data import la, ssl4mis, volumes
from dust.data.check import ChannelRule, check_la, check_prepared_3d, check_ssl4mis
from dust.data.phantom import generate_phantom
from dust.data.phantom3d import generate_la_phantom
from dust.data.types import DataError, ItemSet, Volume


@dataclass(frozen=True)
class Reader:
    """What one dataset layout gives; every function takes the resolved config and the dataset folder."""

    training_items: Callable[[dict[str, Any], Path], tuple[ItemSet, ItemSet]]  # (labelled, unlabelled)
    volumes: Callable[[dict[str, Any], Path, str, bool], list[Volume]]  # (cfg, root, split, with_labels)
    problems: Callable[[dict[str, Any], Path], list[str]]  # one line each, naming the file
    thumbnails: Callable[[dict[str, Any], Path, list[str]], list[np.ndarray]]  # a 2D image per unlabelled id
    write_demo: Callable[[dict[str, Any], Path], object] | None = None  # generate_phantom: true writes it


def _channels(cfg: dict[str, Any]) -> ChannelRule:
    return ChannelRule(int(cfg["in_channels"]), cfg.get("modalities"))


READERS: dict[str, Reader] = {
    "ssl4mis_h5": Reader(  # SSL4MIS's ACDC layout: training slices, validation volumes (dust.data.ssl4mis)
        training_items=lambda cfg, root: ssl4mis.load_training_slices(root, int(cfg["labeled_patients"]),
                                                                        int(cfg["num_classes"])),
        volumes=lambda cfg, root, split, with_labels: ssl4mis.load_volumes(root, split, int(cfg["num_classes"]),
                                                                           with_labels),
        problems=lambda cfg, root: check_ssl4mis(root, int(cfg["labeled_patients"]), int(cfg["num_classes"]),
                                                 cfg["val_split"], _channels(cfg)),
        thumbnails=lambda cfg, root, ids: [
            image[0].numpy() for image in ssl4mis.load_slices(root, ids, False, int(cfg["num_classes"])).images],
        write_demo=lambda cfg, root: generate_phantom(root, seed=int(cfg["phantom_seed"])),
    ),
    "la_h5": Reader(  # UA-MT's left-atrium layout: volumes/<id>/mri_norm2.h5 (dust.data.la)
        training_items=la.load_training_items,
        volumes=la.load_volumes,
        problems=lambda cfg, root: check_la(root, int(cfg["labeled_patients"]), int(cfg["num_classes"]),
                                            cfg["val_split"], int(cfg["holdout_cases"]), len(cfg["patch_size"]),
                                            _channels(cfg)),
        thumbnails=lambda cfg, root, ids: [
            image[0, image.shape[1] // 2] for image in (la.read_case(root, i, cfg, with_label=False)[0] for i in ids)],
        write_demo=lambda cfg, root: generate_la_phantom(root, seed=int(cfg["phantom_seed"])),
    ),
    "prepared_3d": Reader(  # what `dust prepare --dims 3` writes, read crop by crop from disk (dust.data.volumes)
        training_items=volumes.load_training_items,
        volumes=volumes.load_volumes,
        problems=lambda cfg, root: check_prepared_3d(root, int(cfg["labeled_patients"]), int(cfg["num_classes"]),
                                                     cfg["val_split"], len(cfg["patch_size"]),
                                                     ChannelRule(int(cfg["in_channels"]))),
        thumbnails=lambda cfg, root, ids: [volumes.middle_slice(root, i) for i in ids],
    ),
}
DATASETS = tuple(READERS)


def reader_of(cfg: dict[str, Any]) -> Reader:
    """The config's reader, or a :class:`DataError` naming the known ones."""
    if cfg["dataset"] not in READERS:
        raise DataError(f"dataset {cfg['dataset']!r} is not a known reader (known: {', '.join(DATASETS)})")
    return READERS[cfg["dataset"]]
