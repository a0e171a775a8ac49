"""Reader for 3D datasets made by ``dust prepare --dims 3`` (``dataset: prepared_3d``), read from disk crop by crop.

Layout under the dataset root::

    cases/<case>.h5     image (C, S, H, W) float32 in chunks, label (S, H, W) uint8 when labelled, foreground
                        (N, 3) voxel coordinates of the label's foreground; attributes: spacing (mm per S, H, W),
                        and for val / test cases the geometry back to the source (affine, crop_box, full_shape)
    train.list          training cases, the labelled patients' first (``labeled_patients`` counts patients)
    val.list, test.list held-out cases

Training volumes are stored resampled to the planned ``target_spacing``; nothing of them is held in memory: an
item is a :class:`~dust.data.types.StoredArray` and the sampler reads one crop of it per draw, so a dataset far
larger than RAM trains. Validation and test volumes are stored at their own (cropped) resolution and loaded one
at a time when scored; the engine's inference path resamples them to the model's spacing and the probabilities
back, so Dice is measured on the scan's own grid, as ``dust predict`` would segment it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dust.data.types import DataError, ItemSet, StoredArray, Volume, patient_of, read_list

CASES = "cases"


def case_path(root: Path, case_id: str) -> Path:
    return root / CASES / f"{case_id}.h5"


def split_ids(root: Path, labeled_patients: int, val_split: str) -> dict[str, list[str]]:
    """``{"labeled", "unlabeled", "eval"}`` case ids: the first ``labeled_patients`` patients of ``train.list``,
    the rest of it, and the cases of ``<val_split>.list``."""
    train_list = root / "train.list"
    train = read_list(train_list)
    patients = list(dict.fromkeys(patient_of(c) for c in train))
    if not 1 <= labeled_patients <= len(patients):
        raise DataError(f"{train_list}: labeled_patients={labeled_patients}, but the list has {len(patients)} "
                        "patient(s) (choose 1..that)")
    labelled = set(patients[:labeled_patients])
    return {"labeled": [c for c in train if patient_of(c) in labelled],
            "unlabeled": [c for c in train if patient_of(c) not in labelled],
            "eval": read_list(root / f"{val_split}.list")}


def _stored(path: Path, with_label: bool) -> tuple[StoredArray, StoredArray | None, tuple[float, ...] | None]:
    try:
        with h5py.File(path, "r") as f:
            image = f["image"]
            stored = StoredArray(path, "image", image.shape, np.float32)
            label = None
            if with_label:
                if "label" not in f:
                    raise DataError(f"{path}: no 'label' dataset but the case is labelled")
                fg = np.asarray(f["foreground"][()]) if "foreground" in f else None
                label = StoredArray(path, "label", f["label"].shape, np.uint8, foreground=fg)
            spacing = tuple(float(s) for s in f.attrs["spacing"]) if "spacing" in f.attrs else None
    except (OSError, KeyError) as err:
        raise DataError(f"{path}: cannot read the prepared case ({err})") from None
    if stored.dim() != 4:
        raise DataError(f"{path}: expected an image (C, S, H, W), got shape {stored.shape}")
    if label is not None and label.shape != stored.shape[1:]:
        raise DataError(f"{path}: image shape {stored.shape} does not match label shape {label.shape}")
    return stored, label, spacing


def _items(root: Path, ids: list[str], with_labels: bool) -> ItemSet:
    images, labels = [], []
    for case_id in ids:
        image, label, _ = _stored(case_path(root, case_id), with_labels)
        images.append(image)
        labels.append(label)
    return ItemSet(list(ids), [patient_of(c) for c in ids], images, labels if with_labels else None)


def load_training_items(cfg: dict[str, Any], root: Path) -> tuple[ItemSet, ItemSet]:
    """Labelled and unlabelled training volumes, left on disk (read crop by crop by the sampler)."""
    ids = split_ids(root, int(cfg["labeled_patients"]), "val")
    return _items(root, ids["labeled"], True), _items(root, ids["unlabeled"], False)


def middle_slice(root: Path, case_id: str) -> np.ndarray:
    """The first channel's middle slice (H, W) of a stored case (the report's thumbnail), read alone."""
    path = case_path(root, case_id)
    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f["image"][0, f["image"].shape[1] // 2], dtype=np.float32)
    except (OSError, KeyError) as err:
        raise DataError(f"{path}: cannot read the prepared case ({err})") from None


class StoredVolume(Volume):
    """A :class:`Volume` whose image and label are read from its file each time they are asked for, so scoring
    a large validation split holds one case in memory at a time."""

    def __init__(self, case_id: str, path: Path, spacing: tuple[float, ...] | None, with_label: bool,
                 channels: int) -> None:
        self.case_id, self.path, self.spacing, self.affine = case_id, path, spacing, None
        self.with_label, self._channels = with_label, channels

    @property
    def image(self) -> np.ndarray:  # type: ignore[override]
        with h5py.File(self.path, "r") as f:
            return np.asarray(f["image"][()], dtype=np.float32)

    @property
    def label(self) -> np.ndarray | None:  # type: ignore[override]
        if not self.with_label:
            return None
        with h5py.File(self.path, "r") as f:
            return np.asarray(f["label"][()])

    @property
    def channels(self) -> int:
        return self._channels


def load_volumes(cfg: dict[str, Any], root: Path, split: str, with_labels: bool = True) -> list[Volume]:
    """The volumes of ``<split>.list`` at their own resolution, read when scored."""
    volumes: list[Volume] = []
    for case_id in read_list(root / f"{split}.list"):
        path = case_path(root, case_id)
        image, _, spacing = _stored(path, with_labels)
        if spacing is None or len(spacing) != 3:
            raise DataError(f"{path}: no 'spacing' attribute (mm per S, H, W); prepare the dataset again")
        volumes.append(StoredVolume(case_id, path, spacing, with_labels, image.shape[0]))
    return volumes
