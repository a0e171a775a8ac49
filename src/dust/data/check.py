"""Every problem in a dataset that a training run would trip over, found before training, one line each.

``dust check-data --config F`` prints them and exits 2; ``dust train`` runs the same check first and refuses to
start. Checked for the SSL4MIS h5 layout (``dust.data.ssl4mis``) and the LA volume layout (``dust.data.la``), with
the config's ``labeled_patients``, ``num_classes`` and ``val_split``:

- list files: missing or empty ``train_slices.list`` / ``train.list`` / ``<val_split>.list``;
- the labelled set: ``labeled_patients`` below 1 (nothing to train on) or above the patients listed;
- every listed file: absent, not a readable h5 file, no ``image`` (or, where training reads it, no ``label``)
  dataset, the wrong number of dimensions, NaN/Inf intensities, a label whose shape differs from the image's,
  non-integer label values, label values outside ``0..num_classes-1``;
- splits: a patient listed for training and also in the validation (or ``test.list``) volumes;
- LA: ``holdout_cases`` leaving no training cases; a patch with other than 3 numbers.

Labels of the unlabelled pool are not read (training never reads them either). Each file is opened once, so
ACDC (1312 slices + 20 volumes) takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from dust.data.la import case_path
from dust.data.ssl4mis import patients_in_order
from dust.data.types import DataError, h5_array, missing_file, patient_of, read_list
from dust.data.volumes import case_path as volume_path


class ChannelRule:
    """How many image channels a file must hold: ``in_channels``, or enough for the ``modalities`` picked from it."""

    def __init__(self, in_channels: int = 1, modalities: list[int] | None = None) -> None:
        self.in_channels, self.modalities = in_channels, modalities

    def problem(self, path: Path, channels: int) -> str | None:
        if self.modalities is None and channels != self.in_channels:
            return (f"{path}: image has {channels} channel(s) but the config's in_channels is {self.in_channels}")
        if self.modalities is not None and channels <= max(self.modalities):
            return f"{path}: image has {channels} channel(s); modalities {self.modalities} needs more"
        return None


def check_la(root: Path, labeled: int, num_classes: int, val_split: str, holdout: int, patch_dims: int,
             channels: ChannelRule | None = None) -> list[str]:
    problems: list[str] = []
    train_list = root / "train.list"
    train = _read_list(train_list, problems)
    if patch_dims != 3:
        problems.append(f"{root}: the la_h5 reader gives volumes; patch_size needs 3 numbers, it has {patch_dims}")
    val_list = root / "val.list"
    if val_list.is_file():
        held_out = _read_list(val_list, problems)
        pool = [c for c in train if c not in set(held_out)]
    elif train and not 0 < holdout < len(train):
        problems.append(f"{train_list}: holdout_cases={holdout} leaves no training case among {len(train)} (no "
                        "val.list: the last holdout_cases are the validation split)")
        held_out, pool = [], []
    else:
        held_out, pool = train[len(train) - holdout:], train[: len(train) - holdout]
    if train and pool and labeled < 1:
        problems.append(f"{train_list}: labeled_patients is {labeled}: the labelled set is empty")
    elif train and pool and labeled > len(pool):
        problems.append(f"{train_list}: {labeled} labelled cases requested but the training pool has only "
                        f"{len(pool)} (after the {len(held_out)} validation cases)")
    evaluated = held_out if val_split == "val" else _read_list(root / f"{val_split}.list", problems)
    for i, case in enumerate(pool):
        _check_file(case_path(root, case), train_list.name, (3, 4), i < labeled, num_classes, problems, channels)
    listed_in = val_list.name if val_split == "val" and val_list.is_file() else f"{val_split} split"
    for case in evaluated:
        _check_file(case_path(root, case), listed_in, (3, 4), True, num_classes, problems, channels)
    for name in ("val.list", "test.list"):
        path = root / name
        if path.is_file():
            for case in sorted(set(pool) & set(_read_list(path, problems))):
                problems.append(f"{path}: case {case} is also in the training pool of {train_list.name} (a case "
                                "belongs to one split)")
    return problems


def check_prepared_3d(root: Path, labeled_patients: int, num_classes: int, val_split: str, patch_dims: int,
                      channels: ChannelRule | None = None) -> list[str]:
    """Problems of a ``dust prepare --dims 3`` dataset (:mod:`dust.data.volumes`)."""
    problems: list[str] = []
    train_list = root / "train.list"
    train = _read_list(train_list, problems)
    if patch_dims != 3:
        problems.append(f"{root}: the prepared_3d reader gives volumes; patch_size needs 3 numbers, it has "
                        f"{patch_dims}")
    patients = list(dict.fromkeys(patient_of(c) for c in train))
    if train and not 1 <= labeled_patients <= len(patients):
        problems.append(f"{train_list}: labeled_patients={labeled_patients}, but the list has {len(patients)} "
                        "patient(s)")
    labelled = set(patients[: max(labeled_patients, 0)])
    for case in train:
        _check_file(volume_path(root, case), train_list.name, (3, 4), patient_of(case) in labelled, num_classes,
                    problems, channels)
    evaluated = _read_list(root / f"{val_split}.list", problems)
    for case in evaluated:
        _check_file(volume_path(root, case), f"{val_split}.list", (3, 4), True, num_classes, problems, channels)
    for patient in sorted(set(patients) & {patient_of(c) for c in evaluated}):
        problems.append(f"{root / (val_split + '.list')}: patient {patient} is also in {train_list.name} (a patient "
                        "belongs to one split)")
    return problems


def check_ssl4mis(root: Path, labeled_patients: int, num_classes: int, val_split: str,
                  channels: ChannelRule | None = None) -> list[str]:
    problems: list[str] = []
    train_list, val_list = root / "train_slices.list", root / f"{val_split}.list"
    train_names = _read_list(train_list, problems)
    val_names = _read_list(val_list, problems)

    patients = patients_in_order(train_names)
    if train_names and labeled_patients < 1:
        problems.append(f"{train_list}: labeled_patients is {labeled_patients}: the labelled set is empty")
    elif train_names and labeled_patients > len(patients):
        problems.append(f"{train_list}: {labeled_patients} labelled patients requested but the list has only "
                        f"{len(patients)}")
    labelled = set(patients[: max(labeled_patients, 0)])
    for name in train_names:
        _check_file(root / "data" / f"{name}.h5", train_list.name, (2, 3), patient_of(name) in labelled,
                    num_classes, problems, channels)
    for name in val_names:
        _check_file(root / "data" / f"{name}.h5", val_list.name, (3, 4), True, num_classes, problems, channels)

    other_lists = [val_list] + ([root / "test.list"] if val_split != "test" and (root / "test.list").is_file()
                                else [])
    train_patients = set(patients)
    for held_out in other_lists:
        names = val_names if held_out == val_list else _read_list(held_out, problems)
        for patient in sorted(train_patients & {patient_of(n) for n in names}):
            problems.append(f"{held_out}: patient {patient} is also in {train_list.name} (a patient belongs "
                            "to one split)")
    return problems


def raise_if_problems(problems: list[str]) -> None:
    """One ``DataError`` listing every problem (what ``dust train`` stops with)."""
    if problems:
        raise DataError(f"the data check found {len(problems)} problem(s) (see `dust check-data`):\n  "
                        + "\n  ".join(problems))


def _read_list(path: Path, problems: list[str]) -> list[str]:
    """:func:`read_list`, with its problem added to ``problems`` (and no names) instead of raised."""
    try:
        return read_list(path)
    except DataError as err:
        problems.append(str(err))
        return []


def _check_file(
    path: Path, listed_in: str, ndims: tuple[int, int], labelled: bool, num_classes: int, problems: list[str],
    channels: ChannelRule | None = None,
) -> None:
    """Problems of one h5 file: a slice (ndims 2 or 3: (H, W) or (C, H, W)) or a volume (3 or 4)."""
    if not path.is_file():
        problems.append(f"{missing_file(path)} (listed in {listed_in})")
        return
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                problems.append(f"{path}: no 'image' dataset (keys: {sorted(f.keys())})")
                return
            image = h5_array(f, "image", path)
            label = None
            if labelled:
                if "label" not in f:
                    problems.append(f"{path}: no 'label' dataset but the case is labelled")
                else:
                    label = h5_array(f, "label", path)
    except DataError as err:  # a group or text where an array of numbers belongs
        problems.append(str(err))
        return
    except (OSError, KeyError, ValueError, TypeError) as err:  # truncated, not h5, or a damaged dataset
        problems.append(f"{path}: cannot read h5 file ({' '.join(str(err).split())})")
        return
    what = "slice (H, W) or (C, H, W)" if ndims[0] == 2 else "volume (S, H, W) or (C, S, H, W)"
    if image.ndim not in ndims:
        problems.append(f"{path}: expected a {what}, got image shape {image.shape}")
    elif channels is not None:
        problem = channels.problem(path, image.shape[0] if image.ndim == ndims[1] else 1)
        if problem:
            problems.append(problem)
    if not np.issubdtype(image.dtype, np.number):
        problems.append(f"{path}: image has dtype {image.dtype}, not numbers")
        return
    bad = int(np.count_nonzero(~np.isfinite(image))) if image.dtype.kind == "f" else 0
    if bad:
        problems.append(f"{path}: image contains {bad} NaN or Inf value(s)")
    if label is None:
        return
    if label.shape != image.shape[image.ndim - label.ndim :] or label.ndim != ndims[0]:
        problems.append(f"{path}: image shape {image.shape} does not match label shape {label.shape}")
    if label.dtype.kind == "f" and not np.array_equal(label, np.round(label)):
        problems.append(f"{path}: label holds non-integer values")
    elif label.size and (label.min() < 0 or label.max() >= num_classes):
        found = sorted(int(v) for v in np.unique(label))
        problems.append(f"{path}: label values {found} outside the configured classes 0..{num_classes - 1}")
