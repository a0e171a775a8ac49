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

import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch


class DataError(ValueError):
    """Unusable input data; the message names the file and the problem."""


_FRAME = re.compile(r"^(.*?)_frame\d+")
_SLICE = re.compile(r"^(.*)_slice_\d+$")


def patient_of(case_id: str) -> str:
    """Patient id of a slice or volume name: ``patient028_frame01_slice_3`` -> ``patient028``.

    Splitting by patient (not by slice or frame) keeps both cardiac frames of one patient on one side.
    """
    m = _FRAME.match(case_id)
    if m:
        return m.group(1)
    m = _SLICE.match(case_id)
    return m.group(1) if m else case_id


@dataclass
class SliceSet:
    """2D training slices held in memory. ``labels`` is None for the unlabelled pool."""

    ids: list[str]
    patients: list[str]
    images: list[torch.Tensor]  # each (C, H, W) float32
    labels: list[torch.Tensor] | None = None  # each (H, W) uint8
    # Set by self-training methods: fixed pseudo-labels, augmented together with their image.
    pseudo_labels: list[torch.Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Volume:
    """A whole case for evaluation or prediction."""

    case_id: str
    image: np.ndarray  # (C, S, H, W) float32
    label: np.ndarray | None  # (S, H, W) integer
    spacing: tuple[float, ...] | None = None  # (S, H, W) spacing in mm when known
    affine: np.ndarray | None = None

    @property
    def patient(self) -> str:
        return patient_of(self.case_id)


def read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: list file is empty")
    return names


def _read_h5(path: Path, want_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise DataError(f"{path}: no 'image' dataset (keys: {sorted(f.keys())})")
            image = np.asarray(f["image"][()], dtype=np.float32)
            label = None
            if want_label:
                if "label" not in f:
                    raise DataError(f"{path}: no 'label' dataset but the case is labelled")
                label = np.asarray(f["label"][()])
    except OSError as err:
        raise DataError(f"{path}: cannot read h5 file ({err})") from None
    if not np.isfinite(image).all():
        raise DataError(f"{path}: image contains NaN or Inf values")
    if label is not None and label.shape != image.shape[-label.ndim :]:
        raise DataError(f"{path}: image shape {image.shape} does not match label shape {label.shape}")
    return image, label


def _check_labels(path: Path, label: np.ndarray, num_classes: int) -> None:
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        found = sorted(int(v) for v in np.unique(label))
        raise DataError(f"{path}: label values {found} outside the configured classes 0..{num_classes - 1}")


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


def load_slices(root: Path, names: list[str], with_labels: bool, num_classes: int) -> SliceSet:
    images, labels = [], []
    for name in names:
        path = root / "data" / f"{name}.h5"
        image, label = _read_h5(path, with_labels)
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3:
            raise DataError(f"{path}: expected a 2D slice (H, W) or (C, H, W), got shape {image.shape}")
        images.append(torch.from_numpy(np.ascontiguousarray(image)))
        if with_labels:
            _check_labels(path, label, num_classes)
            labels.append(torch.from_numpy(label.astype(np.uint8)))
    return SliceSet(names, [patient_of(n) for n in names], images, labels if with_labels else None)


def load_training_slices(root: Path, labeled_patients: int, num_classes: int) -> tuple[SliceSet, SliceSet]:
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
        image, label = _read_h5(path, with_labels)
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4:
            raise DataError(f"{path}: expected a volume (S, H, W) or (C, S, H, W), got shape {image.shape}")
        if label is not None:
            _check_labels(path, label, num_classes)
        volumes.append(Volume(name, image, label, *_read_geometry(path)))
    return volumes


def _read_geometry(path: Path) -> tuple[tuple[float, ...] | None, np.ndarray | None]:
    """(S, H, W) spacing in mm and the affine, when the file records them (``dust prepare`` does; SSL4MIS not)."""
    with h5py.File(path, "r") as f:
        spacing, affine = f.attrs.get("spacing"), f.attrs.get("affine")
    return (None if spacing is None else tuple(float(s) for s in spacing),
            None if affine is None else np.asarray(affine, dtype=np.float64))
