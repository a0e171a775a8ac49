"""NIfTI in and out: a file's voxel grid <-> dust's (C, S, H, W) arrays, and per-case intensity normalisation.

Orientation: dust never resamples or reorients. A 2D model sees slices along one voxel axis of the file as
stored (``slice_axis``, 2 by default: the through-plane axis of short-axis cine MRI and of most prostate and
brain scans); the two in-plane axes follow in reversed order. For ``slice_axis=2`` a NIfTI array (X, Y, Z)
becomes (Z, Y, X), which is what SimpleITK's ``GetArrayFromImage`` returns and therefore what SSL4MIS's ACDC
h5 files hold. :func:`to_stored` and :func:`from_stored` are exact inverses, so a prediction goes back onto
the input's own voxel grid and is written with the input's affine and header.

Normalisation is per case and per channel, over the whole volume: ``minmax`` ((x - min) / (max - min), as
SSL4MIS did for ACDC) or ``zscore`` ((x - mean) / std). ``dust prepare`` applies it and records it in the
training config; ``dust predict`` applies the same to new cases.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from dust.data.types import DataError
from dust.storage import atomic_write

log = logging.getLogger("dust")
NIFTI_ENDINGS = (".nii.gz", ".nii")
INTENSITY_NORMS = ("minmax", "zscore")
CHANNEL_FILE = re.compile(r"^(.+)_(\d{4})$")  # nnU-Net: CASE_0000.nii.gz, CASE_0001.nii.gz, ...
# UA-MT's left-atrium layout (dust.data.la): volumes/<id>/mri_norm2.h5, arrays in the file's voxel order (X, Y, Z)
LA_CASE_FILE = "mri_norm2.h5"


def h5_case_id(path: Path) -> str:
    """A case's name from its h5 file: ``<id>`` for the LA layout's ``<id>/mri_norm2.h5``, else the file's stem."""
    return path.parent.name if path.name == LA_CASE_FILE else path.stem


def nifti_stem(path: Path) -> str | None:
    """``case`` for ``case.nii.gz`` / ``case.nii``; None for anything else."""
    for ending in NIFTI_ENDINGS:
        if path.name.endswith(ending) and len(path.name) > len(ending):
            return path.name[: -len(ending)]
    return None


def nifti_ending(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"


def visible_files(folder: Path) -> list[Path]:
    """Files of a folder, sorted, without hidden ones (e.g. the ``._case.nii.gz`` macOS leaves in MSD tarballs)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- orientation
def stored_axes(slice_axis: int) -> tuple[int, int, int]:
    """Voxel axes of the file in dust's (S, H, W) order: the slice axis, then the other two reversed."""
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2 (a voxel axis of the NIfTI file), got {slice_axis!r}")
    return (slice_axis, *(a for a in (2, 1, 0) if a != slice_axis))


def to_stored(volume: np.ndarray, slice_axis: int) -> np.ndarray:
    """(X, Y, Z) -> (S, H, W); with channels first, (C, X, Y, Z) -> (C, S, H, W)."""
    axes = stored_axes(slice_axis)
    if volume.ndim == 4:
        return np.ascontiguousarray(volume.transpose(0, *(a + 1 for a in axes)))
    return np.ascontiguousarray(volume.transpose(axes))


def from_stored(stored: np.ndarray, slice_axis: int) -> np.ndarray:
    """(S, H, W) -> the file's (X, Y, Z) voxel order; inverse of :func:`to_stored`."""
    return np.ascontiguousarray(stored.transpose(np.argsort(stored_axes(slice_axis))))


def spacing_of(img: nib.spatialimages.SpatialImage) -> tuple[float, float, float]:
    """Voxel size in mm of the three spatial axes, in the file's voxel order."""
    return tuple(float(z) for z in img.header.get_zooms()[:3])


# ---------------------------------------------------------------------------------------------- reading
def load_nifti(path: Path) -> nib.spatialimages.SpatialImage:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for truncated or foreign files
        raise DataError(f"{path}: cannot read NIfTI file ({type(err).__name__}: {err})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{path}: not a NIfTI image ({type(img).__name__})")
    return img


def _voxels(img: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    try:
        data = np.asarray(img.dataobj, dtype=np.float64)  # applies scl_slope / scl_inter
    except Exception as err:
        raise DataError(f"{path}: cannot read the voxel data ({type(err).__name__}: {err})") from None
    if not np.isfinite(data).all():
        raise DataError(f"{path}: image contains NaN or Inf values")
    return data


def read_channels(
    paths: list[Path], modalities: list[int] | None
) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """Image channels (C, X, Y, Z) float64 of one case, and the first file's image (geometry, header).

    ``paths``: one 3D file, one 4D file whose last axis holds the modalities (Medical Segmentation
    Decathlon), or one 3D file per channel (nnU-Net's CASE_0000, CASE_0001, ...). ``modalities`` picks
    channels by index (None: all).
    """
    channels, sources, reference = [], [], None
    for path in paths:
        img = load_nifti(path)
        data = _voxels(img, path)
        if data.ndim == 4:
            parts = [data[..., c] for c in range(data.shape[3])]
        elif data.ndim == 3:
            parts = [data]
        else:
            raise DataError(f"{path}: expected a 3D image or a 4D image with modalities last, got shape {data.shape}")
        if reference is None:
            reference = img
        elif data.shape[:3] != reference.shape[:3]:
            raise DataError(f"{path}: spatial shape {data.shape[:3]} differs from {paths[0].name}'s "
                            f"{reference.shape[:3]}")
        channels += parts
        sources += [path] * len(parts)
    if modalities is not None:
        bad = [m for m in modalities if not 0 <= m < len(channels)]
        if bad:
            raise DataError(f"{paths[0]}: modality index {bad} requested but the case has {len(channels)} "
                            f"channel(s) ({', '.join(p.name for p in paths)})")
        channels = [channels[m] for m in modalities]
    return np.stack(channels), reference


def read_label_map(path: Path) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """An integer label map (int64, the file's voxel order) and its image; non-integer values are refused."""
    img = load_nifti(path)
    data = _voxels(img, path)
    if not np.array_equal(data, np.round(data)):
        raise DataError(f"{path}: label holds non-integer values; a label map needs integer classes")
    return data.astype(np.int64), img


def read_label(path: Path, num_classes: int, shape: tuple[int, ...], image_path: Path) -> np.ndarray:
    """Label map (X, Y, Z) uint8, refused unless integer-valued, inside 0..num_classes-1 and image-shaped."""
    data, _ = read_label_map(path)
    if data.shape != tuple(shape):
        raise DataError(f"{path}: label shape {data.shape} does not match the image shape {tuple(shape)} "
                        f"of {image_path}")
    values = np.unique(data)
    outside = [int(v) for v in values if not 0 <= v < num_classes]
    if outside:
        raise DataError(f"{path}: label values {outside} are outside the declared labels 0..{num_classes - 1}")
    return data.astype(np.uint8)


def normalize(image: np.ndarray, method: str, source: Path | str) -> tuple[np.ndarray, dict[str, list[float]]]:
    """Per-channel normalisation of (C, ...) over the whole case -> float32, and the statistics used."""
    if method not in INTENSITY_NORMS:
        raise ValueError(f"intensity_norm must be one of {INTENSITY_NORMS}, got {method!r}")
    axes = tuple(range(1, image.ndim))
    if method == "minmax":
        lo, hi = image.min(axis=axes, keepdims=True), image.max(axis=axes, keepdims=True)
        if np.any(hi <= lo):
            raise DataError(f"{source}: a channel is constant ({lo.ravel().tolist()}); cannot min-max normalise it")
        out, stats = (image - lo) / (hi - lo), {"min": lo.ravel().tolist(), "max": hi.ravel().tolist()}
    else:
        mean, std = image.mean(axis=axes, keepdims=True), image.std(axis=axes, keepdims=True)
        if np.any(std == 0):
            raise DataError(f"{source}: a channel is constant; cannot z-score normalise it")
        out, stats = (image - mean) / std, {"mean": mean.ravel().tolist(), "std": std.ravel().tolist()}
    return out.astype(np.float32), stats


# ---------------------------------------------------------------------------------------------- new cases
@dataclass
class Grid:
    """Where dust's (S, H, W) arrays lie in the output file: what writing a prediction back needs."""

    slice_axis: int
    affine: np.ndarray
    header: nib.Nifti1Header | nib.Nifti2Header | None  # the input's header (None: h5 input)
    image_class: type = nib.Nifti1Image


@dataclass
class InputCase:
    """A case to predict: one NIfTI file (3D or 4D), one file per channel (nnU-Net), or an h5 volume."""

    case_id: str
    paths: list[Path]
    ending: str  # of the written prediction

    @property
    def is_h5(self) -> bool:
        return self.paths[0].suffix == ".h5"


def find_input_cases(path: Path) -> list[InputCase]:
    """Cases in a file or folder. A folder whose NIfTI files are all named ``CASE_XXXX`` with channels
    0000, 0001, ... per case is read the nnU-Net way (one case, one file per channel); otherwise every
    ``.nii.gz`` / ``.nii`` / ``.h5`` file is one case."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = visible_files(path)
    else:
        raise DataError(f"{path}: input file or folder not found")
    niftis = [(p, nifti_stem(p)) for p in files if nifti_stem(p) is not None]
    h5s = [p for p in files if p.suffix == ".h5"]
    if not niftis and not h5s:
        raise DataError(f"{path}: no .nii.gz, .nii or .h5 files")
    skipped = [p.name for p in files if nifti_stem(p) is None and p.suffix != ".h5"]
    if skipped:  # said, so that a case saved under an unexpected ending is not silently left out
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("%s: skipped %d file(s) that are not .nii.gz, .nii or .h5: %s", path, len(skipped), shown)
    cases = [InputCase(h5_case_id(p), [p], ".nii.gz") for p in h5s]
    groups: dict[str, dict[int, Path]] = {}
    matches = [CHANNEL_FILE.match(stem) for _, stem in niftis]
    if path.is_dir() and niftis and all(matches):
        for (p, _), m in zip(niftis, matches, strict=True):
            groups.setdefault(m.group(1), {})[int(m.group(2))] = p
    if groups and all(sorted(g) == list(range(len(g))) for g in groups.values()):
        cases += [InputCase(cid, [g[i] for i in sorted(g)], nifti_ending(g[0])) for cid, g in groups.items()]
    else:
        cases += [InputCase(stem, [p], nifti_ending(p)) for p, stem in niftis]
    duplicated = sorted(cid for cid, n in Counter(c.case_id for c in cases).items() if n > 1)
    if duplicated:
        raise DataError(f"{path}: case id(s) {duplicated} occur more than once (e.g. as .h5 and as NIfTI)")
    return sorted(cases, key=lambda c: c.case_id)


def read_input_case(
    case: InputCase, modalities: list[int] | None, intensity_norm: str, slice_axis: int
) -> tuple[np.ndarray, Grid]:
    """Model input (C, S, H, W) float32 of a new case, normalised like the training data, and its grid.

    An h5 input is taken as already prepared (``dust prepare`` output or the SSL4MIS layout): it is not
    normalised again. Its geometry comes from the attributes ``dust prepare`` writes; an h5 without them is
    read in the SSL4MIS convention (a (Z, Y, X) array, written back as (X, Y, Z) with an identity affine).
    """
    if case.is_h5:
        return _read_h5_case(case.paths[0])
    channels, reference = read_channels(case.paths, modalities)
    image, _ = normalize(channels, intensity_norm, case.paths[0])
    grid = Grid(slice_axis, reference.affine, reference.header, type(reference))
    return to_stored(image, slice_axis), grid


def _read_h5_case(path: Path) -> tuple[np.ndarray, Grid]:
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise DataError(f"{path}: no 'image' dataset (keys: {sorted(f.keys())})")
            image = np.asarray(f["image"][()], dtype=np.float32)
            attrs = dict(f.attrs)
    except OSError as err:
        raise DataError(f"{path}: cannot read h5 file ({err})") from None
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise DataError(f"{path}: expected a volume (S, H, W) or (C, S, H, W), got shape {image.shape}")
    if _is_la_layout(path, attrs):  # (C, X, Y, Z) as the file stores it -> dust's (C, S, H, W), as dust.data.la
        image = to_stored(image, 2)
    affine = np.asarray(attrs["affine"], dtype=np.float64) if "affine" in attrs else np.eye(4)
    return image, Grid(int(attrs.get("slice_axis", 2)), affine, None)


def _is_la_layout(path: Path, attrs: dict) -> bool:
    """An LA-layout h5 holds its arrays in voxel order (X, Y, Z); dust's own and SSL4MIS's hold (S, H, W)."""
    return path.name == LA_CASE_FILE and "slice_axis" not in attrs


def write_stored(grid: Grid, stored: np.ndarray, dtype: type, path: Path) -> None:
    """Write an (S, H, W) array back on the input's voxel grid, with its affine and (when known) header."""
    data = from_stored(stored, grid.slice_axis).astype(dtype)
    if grid.header is None:
        img = nib.Nifti1Image(data, grid.affine)
    else:
        img = grid.image_class(data, grid.affine, grid.header.copy())
        img.header["cal_min"] = img.header["cal_max"] = 0  # the input's display window means nothing here
    img.set_data_dtype(dtype)
    # serialised in memory, then written atomically: a kill mid-write never leaves a truncated file under the
    # final name, and a full disk is one line naming it
    data = img.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)
    atomic_write(path, "wb", lambda f: f.write(data))


def export_h5_case(path: Path, out_dir: Path, spacing: tuple[float, float, float] | None = None) -> list[Path]:
    """An h5 case (dust's or SSL4MIS's layout) as NIfTI: ``out_dir/<case>.nii.gz`` (``<case>_000k.nii.gz`` per
    channel when there are several, the nnU-Net way) and, when it has one, ``out_dir/labels/<case>.nii.gz``.

    The voxel grid is the one ``dust predict`` writes an h5 case's prediction on: an SSL4MIS or dust h5's (S, H, W)
    arrays with their axes reversed (``(Z, Y, X)`` becomes ``(X, Y, Z)``), an LA-layout h5 (``<id>/mri_norm2.h5``,
    named ``<id>``) in its own (X, Y, Z) order; the affine is the one ``dust prepare`` stored, else a diagonal of
    ``spacing`` (x, y, z in mm; 1 mm when neither is known: the SSL4MIS and LA h5 files keep no geometry).
    """
    image, grid = _read_h5_case(path)
    with h5py.File(path, "r") as f:
        label = np.asarray(f["label"][()], dtype=np.uint8) if "label" in f else None
        if label is not None and _is_la_layout(path, dict(f.attrs)):
            label = to_stored(label, 2)
    if spacing is not None:
        grid = Grid(grid.slice_axis, np.diag([*map(float, spacing), 1.0]), None)
    case = h5_case_id(path)
    names = [f"{case}.nii.gz"] if len(image) == 1 else [f"{case}_{c:04d}.nii.gz" for c in range(len(image))]
    written = [out_dir / name for name in names]
    for channel, target in zip(image, written, strict=True):
        write_stored(grid, channel, np.float32, target)
    if label is not None:
        written.append(out_dir / "labels" / f"{case}.nii.gz")
        write_stored(grid, label, np.uint8, written[-1])
    return written
