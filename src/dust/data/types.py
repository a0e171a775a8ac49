"""What every reader returns, whatever the dataset or dimension: training items, whole volumes, data errors.

dust's arrays put the through-plane axis first, (C, S, H, W) for a volume (as SSL4MIS's ACDC h5 files and
nnU-Net's arrays do); a NIfTI voxel grid maps onto that order through :mod:`dust.data.nifti`. A training item is
``(C, *spatial)``: a slice (C, H, W) for a 2D model, a whole volume (C, S, H, W) for a 3D one.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from dust.storage import write_error


class DataError(ValueError):
    """Unusable input data; the message names the file and the problem."""


_FRAME = re.compile(r"^(.*?)_frame\d+")
_SLICE = re.compile(r"^(.*)_slice_\d+$")


def patient_of(case_id: str) -> str:
    """Patient id of a slice or volume name: ``patient028_frame01_slice_3`` -> ``patient028``; any other name is
    its own patient.

    Splitting by patient (not by slice or frame) keeps both cardiac frames of one patient on one side.
    """
    m = _FRAME.match(case_id)
    if m:
        return m.group(1)
    m = _SLICE.match(case_id)
    return m.group(1) if m else case_id


class StoredArray:
    """An array that stays on disk (one dataset of an h5 file) and is read box by box: a training item of a
    prepared 3D dataset, or its label, so a dataset larger than memory trains (:mod:`dust.data.volumes`).

    It answers what the sampler and the checks ask of an in-memory item (``shape``, ``dim()``); :meth:`read` gives a
    box of it, zero-filled where the box leaves the array (the padding a crop at the border needs), and
    :func:`as_tensor` the whole array. ``foreground`` (label only): (N, ndim) voxel coordinates of labelled
    voxels, recorded by ``dust prepare``, for foreground oversampling without reading the label.
    """

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype,
                 foreground: np.ndarray | None = None) -> None:
        self.path, self.key, self.shape, self.dtype = path, key, tuple(int(s) for s in shape), np.dtype(dtype)
        self.foreground = foreground

    def dim(self) -> int:
        return len(self.shape)

    def read(self, box: tuple[slice, ...]) -> torch.Tensor:
        """The box (one slice per trailing axis, ``start < stop``, any of them beyond the array) as a tensor."""
        lead = len(self.shape) - len(box)
        out = np.zeros([*self.shape[:lead], *(b.stop - b.start for b in box)], dtype=self.dtype)
        inside, target = box_overlap(box, self.shape[lead:])
        if inside is not None:
            try:
                with h5py.File(self.path, "r") as f:
                    out[(Ellipsis, *target)] = f[self.key][(Ellipsis, *inside)]
            except (OSError, KeyError) as err:
                raise DataError(f"{self.path}: cannot read {self.key!r} ({err})") from None
        return torch.from_numpy(out)

    def load(self) -> torch.Tensor:
        return self.read(tuple(slice(0, n) for n in self.shape))


Item = torch.Tensor | StoredArray


def box_overlap(box: tuple[slice, ...] | list[slice], shape: tuple[int, ...]
                ) -> tuple[tuple[slice, ...] | None, tuple[slice, ...] | None]:
    """The part of ``box`` (slices that may leave the array) inside an array of ``shape``, as slices of the array
    and of the box; (None, None) when they do not overlap."""
    inside = tuple(slice(max(b.start, 0), min(b.stop, n)) for b, n in zip(box, shape, strict=True))
    if any(s.start >= s.stop for s in inside):
        return None, None
    return inside, tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(inside, box, strict=True))


def as_tensor(item: Item) -> torch.Tensor:
    """A training item (or label) in memory, reading it from disk when it is a :class:`StoredArray`."""
    return item.load() if isinstance(item, StoredArray) else item


@dataclass
class ItemSet:
    """Training items, each ``(C, *spatial)``: tensors in memory, or :class:`StoredArray` s read crop by crop.
    ``labels`` is None for the unlabelled pool."""

    ids: list[str]
    patients: list[str]
    images: list[Item]  # each (C, *spatial) float32
    labels: list[Item] | None = None  # each (*spatial) uint8

    def __len__(self) -> int:
        return len(self.ids)


SliceSet = ItemSet  # the 2D name, kept for code written before items could be volumes


@dataclass
class Volume:
    """A whole case for evaluation or prediction, at the resolution its label is scored at."""

    case_id: str
    image: np.ndarray  # (C, S, H, W) float32
    label: np.ndarray | None  # (S, H, W) integer
    spacing: tuple[float, ...] | None = None  # (S, H, W) spacing in mm when known
    affine: np.ndarray | None = None

    @property
    def patient(self) -> str:
        return patient_of(self.case_id)

    @property
    def channels(self) -> int:
        return int(self.image.shape[0])


def read_list(path: Path) -> list[str]:
    """The non-empty lines of a list file (``train.list``, ``val.list``...)."""
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: list file is empty")
    return names


def write_h5(path: Path, image: np.ndarray, label: np.ndarray | None = None,
             attrs: dict[str, Any] | None = None) -> None:
    """One case (or slice) in dust's h5 layout: ``image``, optionally ``label``, both gzip-compressed, and
    ``attrs`` (what ``dust prepare`` records: spacing, affine, ...)."""
    try:
        with h5py.File(path, "w") as f:
            f.create_dataset("image", data=image, compression="gzip")
            if label is not None:
                f.create_dataset("label", data=label, compression="gzip")
            f.attrs.update(attrs or {})
    except OSError as err:  # h5py's message is HDF5's, several lines long, with the errno only inside its text
        if err.errno is None and ("errno = 28" in str(err) or "No space left" in str(err)):
            err = OSError(errno.ENOSPC, "No space left on device")
        raise write_error(path, err) from None


def missing_file(path: Path, what: str = "file") -> DataError:
    """The error for a path that is not a readable file: a broken or looping symbolic link is said to be one (a
    link whose target moved is the usual way a case goes missing in a folder of links)."""
    if path.is_symlink():
        try:
            target = str(path.readlink())
        except OSError:
            target = "?"
        return DataError(f"{path}: broken symbolic link (to {target}: missing, or a loop of links)")
    if path.exists():
        return DataError(f"{path}: not a regular {what}")
    return DataError(f"{path}: {what} not found")


def h5_array(f: h5py.File, key: str, path: Path) -> np.ndarray:
    """``f[key]`` as an array, refused (one line naming the file) unless it is a dataset of numbers."""
    item = f[key]
    if not isinstance(item, h5py.Dataset):
        raise DataError(f"{path}: '{key}' is a {type(item).__name__.lower()}, not an array")
    if item.dtype.kind not in "biuf":
        raise DataError(f"{path}: '{key}' holds {item.dtype} values, not numbers")
    return np.asarray(item[()])


def read_h5_arrays(path: Path, want_label: bool, label_if_present: bool = False,
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` (float32) and, when wanted, ``label`` of an h5 case, checked: readable arrays of numbers, a
    finite image, an integer-valued label of the image's (trailing) shape. ``label_if_present``: the label is read
    when the file has one and is no error when it has none."""
    if not path.is_file():
        raise missing_file(path)
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise DataError(f"{path}: no 'image' dataset (keys: {sorted(f.keys())})")
            image = h5_array(f, "image", path).astype(np.float32)
            label = None
            if want_label or (label_if_present and "label" in f):
                if "label" not in f:
                    raise DataError(f"{path}: no 'label' dataset but the case is labelled")
                label = h5_array(f, "label", path)
    except (OSError, KeyError, ValueError, TypeError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: cannot read h5 file ({' '.join(str(err).split())})") from None
    if not np.isfinite(image).all():
        raise DataError(f"{path}: image contains NaN or Inf values")
    if label is not None:
        if label.dtype.kind == "f" and not np.isfinite(label).all():
            raise DataError(f"{path}: label contains NaN or Inf values")
        if label.dtype.kind == "f" and not np.array_equal(label, np.round(label)):
            raise DataError(f"{path}: label holds non-integer values; a label map needs integer classes")
        if label.shape != image.shape[-label.ndim :]:
            raise DataError(f"{path}: image shape {image.shape} does not match label shape {label.shape}")
    return image, label


def read_h5_attrs(path: Path) -> dict[str, Any]:
    """The attributes of an h5 case (what ``dust prepare`` records: spacing, affine, slice_axis...)."""
    try:
        with h5py.File(path, "r") as f:
            return dict(f.attrs)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise DataError(f"{path}: cannot read h5 attributes ({' '.join(str(err).split())})") from None


def check_label_values(path: Path, label: np.ndarray, num_classes: int) -> None:
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        found = sorted(int(v) for v in np.unique(label))
        raise DataError(f"{path}: label values {found} outside the configured classes 0..{num_classes - 1}")
