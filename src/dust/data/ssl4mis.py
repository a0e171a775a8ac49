"""Reader for the SSL4MIS h5 layout (ACDC as preprocessed by SSL4MIS, and dust's phantom).

Layout under a dataset root::

    data/<case>_slice_<n>.h5   training slices: image (H, W) float32 in [0, 1], label (H, W) uint8
    data/<case>.h5             validation / test volumes: image (S, H, W), label (S, H, W)
    train_slices.list          training slice names, grouped by patient
    val.list, test.list        volume names

Images may carry a leading channel axis ((C, H, W) slices, (C, S, H, W) volumes) for multi-modality data.
Training slices are read once into memory: ACDC's 1312 slices take ~300 MB, and no h5 file is opened per step.
Labels of the unlabelled pool are never read.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from dust.data.types import (  # noqa: F401  (re-exported: the names code written for the 2D reader imports)
    DataError,
    ItemSet,
    SliceSet,
    Volume,
    check_label_values,
    patient_of,
    read_h5_arrays,
    read_list,
)


def patients_in_order(names: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(patient_of(name), None)
    return list(seen)


def split_by_patients(names: list[str], labeled_patients: int, list_path: Path) -> tuple[list[str], list[str]]:
    """First ``labeled_patients`` patients (in list order) are labelled; the rest form the unlabelled pool."""
    patients = patients_in_order(names)
    if labeled_patients < 1:
        raise DataError(f"{list_path}: labeled_patients must be at least 1, got {labeled_patients}")
    if labeled_patients > len(patients):
        raise DataError(
            f"{list_path}: {labeled_patients} labelled patients requested but the list has only {len(patients)}"
        )
    chosen = set(patients[:labeled_patients])
    labeled = [n for n in names if patient_of(n) in chosen]
    unlabeled = [n for n in names if patient_of(n) not in chosen]
    return labeled, unlabeled


def load_slices(root: Path, names: list[str], with_labels: bool, num_classes: int) -> ItemSet:
    images, labels = [], []
    for name in names:
        path = root / "data" / f"{name}.h5"
        image, label = read_h5_arrays(path, with_labels)
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3:
            raise DataError(f"{path}: expected a 2D slice (H, W) or (C, H, W), got shape {image.shape}")
        images.append(torch.from_numpy(np.ascontiguousarray(image)))
        if with_labels:
            check_label_values(path, label, num_classes)
            labels.append(torch.from_numpy(label.astype(np.uint8)))
    return ItemSet(names, [patient_of(n) for n in names], images, labels if with_labels else None)


def load_training_slices(root: Path, labeled_patients: int, num_classes: int) -> tuple[ItemSet, ItemSet]:
    """Labelled slices of the first N patients and the unlabelled pool (its labels are never read)."""
    list_path = root / "train_slices.list"
    names = read_list(list_path)
    labeled, unlabeled = split_by_patients(names, labeled_patients, list_path)
    return (
        load_slices(root, labeled, True, num_classes),
        load_slices(root, unlabeled, False, num_classes),
    )


def load_volumes(root: Path, split: str, num_classes: int, with_labels: bool = True) -> list[Volume]:
    """Validation / test volumes listed in ``<split>.list``."""
    volumes = []
    for name in read_list(root / f"{split}.list"):
        path = root / "data" / f"{name}.h5"
        image, label = read_h5_arrays(path, with_labels)
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4:
            raise DataError(f"{path}: expected a volume (S, H, W) or (C, S, H, W), got shape {image.shape}")
        if label is not None:
            check_label_values(path, label, num_classes)
        volumes.append(Volume(name, image, label, *_read_geometry(path)))
    return volumes


def _read_geometry(path: Path) -> tuple[tuple[float, ...] | None, np.ndarray | None]:
    """(S, H, W) spacing in mm and the affine, when the file records them (``dust prepare`` does; SSL4MIS not)."""
    with h5py.File(path, "r") as f:
        spacing, affine = f.attrs.get("spacing"), f.attrs.get("affine")
    return (None if spacing is None else tuple(float(s) for s in spacing),
            None if affine is None else np.asarray(affine, dtype=np.float64))
