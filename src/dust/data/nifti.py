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

import nibabel as nib
import numpy as np

from dust.data.types import DataError, missing_file, read_h5_arrays, read_h5_attrs
from dust.storage import atomic_write

log = logging.getLogger("dust")
NIFTI_ENDINGS = (".nii.gz", ".nii")
INTENSITY_NORMS = ("minmax", "zscore", "zscore_nonzero", "ct", "none")
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
    # a broken or looping symbolic link is kept, so that reading it names it instead of the case vanishing
    return sorted(p for p in folder.iterdir()
                  if (p.is_file() or (p.is_symlink() and not p.is_dir())) and not p.name.startswith("."))


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
        raise missing_file(path)
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for truncated or foreign files
        raise DataError(f"{path}: cannot read NIfTI file ({type(err).__name__}: {err})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{path}: not a NIfTI image ({type(img).__name__})")
    if not np.isfinite(img.affine).all():  # no voxel has a place in space; a prediction would inherit it
        raise DataError(f"{path}: its affine (sform/qform) holds NaN or Inf values")
    return img


def _voxels(img: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    if img.get_data_dtype().kind == "c":  # a cast to real would silently drop the imaginary part
        raise DataError(f"{path}: complex-valued voxels ({img.get_data_dtype()}); dust reads real-valued images")
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
        else:
            check_same_grid(img, path, reference, paths[0])
        channels += parts
        sources += [path] * len(parts)
    if modalities is not None:
        bad = [m for m in modalities if not 0 <= m < len(channels)]
        if bad:
            raise DataError(f"{paths[0]}: modality index {bad} requested but the case has {len(channels)} "
                            f"channel(s) ({', '.join(p.name for p in paths)})")
        channels = [channels[m] for m in modalities]
    return np.stack(channels), reference


# Two files of one case must lie on one voxel grid: the affines may differ by float32 storage noise, no more.
AFFINE_TOLERANCE_MM = 1e-2


def check_same_grid(img: nib.spatialimages.SpatialImage, path: Path, reference: nib.spatialimages.SpatialImage,
                    reference_path: Path) -> None:
    """Refuse ``path`` unless its voxel grid (shape and affine, within AFFINE_TOLERANCE_MM per entry, in mm and
    mm per voxel) is ``reference_path``'s: a label shifted or flipped against its image would train on the wrong
    voxels without a word."""
    if tuple(img.shape[:3]) != tuple(reference.shape[:3]):
        raise DataError(f"{path}: shape {tuple(img.shape[:3])} differs from {reference_path.name}'s "
                        f"{tuple(reference.shape[:3])}; the files of one case must share a voxel grid")
    a, b = np.asarray(img.affine, dtype=np.float64), np.asarray(reference.affine, dtype=np.float64)
    if not np.isfinite(a).all():
        raise DataError(f"{path}: the affine holds NaN or Inf values")
    diff = float(np.abs(a - b).max())
    if diff > AFFINE_TOLERANCE_MM:
        raise DataError(f"{path}: affine differs from {reference_path.name}'s by up to {diff:.3g} mm (origin "
                        f"{np.round(a[:3, 3], 2).tolist()} vs {np.round(b[:3, 3], 2).tolist()}); the label and "
                        "image of a case must share a voxel grid (resample one onto the other first)")


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


def normalize(
    image: np.ndarray, method: str, source: Path | str, stats: list[dict[str, float]] | None = None,
) -> tuple[np.ndarray, dict[str, list[float]]]:
    """Per-channel normalisation of (C, ...) -> float32, and the statistics used.

    ``minmax`` / ``zscore``: per case over the whole volume; ``zscore_nonzero``: per case over the voxels where any
    channel is nonzero, the rest set to 0 (skull-stripped brain MRI, as BraTS pipelines and nnU-Net do); ``ct``:
    the dataset's statistics ``stats`` (per channel ``low``, ``high``, ``mean``, ``std``: clip, then z-score), so
    one Hounsfield value maps to one input value in every scan; ``none``: as stored (data normalised before, e.g.
    the LA h5 volumes, which UA-MT z-scored per case).
    """
    if method not in INTENSITY_NORMS:
        raise ValueError(f"intensity_norm must be one of {INTENSITY_NORMS}, got {method!r}")
    axes = tuple(range(1, image.ndim))
    if method == "none":
        return image.astype(np.float32), {}
    if method == "ct":
        if not stats or len(stats) != len(image):
            raise ValueError(f"{source}: the ct normalisation needs intensity_stats for each of its {len(image)} "
                             f"channel(s) (written by dust prepare), got {stats!r}")
        out = np.empty(image.shape, dtype=np.float32)
        for c, st in enumerate(stats):
            out[c] = (np.clip(image[c], st["low"], st["high"]) - st["mean"]) / st["std"]
        return out, {k: [float(st[k]) for st in stats] for k in ("low", "high", "mean", "std")}
    if method == "minmax":
        lo, hi = image.min(axis=axes, keepdims=True), image.max(axis=axes, keepdims=True)
        if np.any(hi <= lo):
            raise DataError(f"{source}: a channel is constant ({lo.ravel().tolist()}); cannot min-max normalise it")
        out, stats_used = (image - lo) / (hi - lo), {"min": lo.ravel().tolist(), "max": hi.ravel().tolist()}
        return out.astype(np.float32), stats_used
    mask = np.any(image != 0, axis=0) if method == "zscore_nonzero" else np.ones(image.shape[1:], dtype=bool)
    if not mask.any():
        raise DataError(f"{source}: every voxel is zero; cannot z-score normalise it")
    out = np.zeros(image.shape, dtype=np.float32)
    means, stds = [], []
    for c in range(len(image)):
        values = image[c][mask]
        mean, std = float(values.mean()), float(values.std())
        if std == 0:
            raise DataError(f"{source}: channel {c} is constant; cannot z-score normalise it")
        out[c] = np.where(mask, (image[c] - mean) / std, 0.0)
        means.append(mean)
        stds.append(std)
    return out, {"mean": means, "std": stds}


# ---------------------------------------------------------------------------------------------- new cases
@dataclass
class Grid:
    """Where dust's (S, H, W) arrays lie in the output file: what writing a prediction back needs."""

    slice_axis: int
    affine: np.ndarray
    header: nib.Nifti1Header | nib.Nifti2Header | None  # the input's header (None: h5 input)
    image_class: type = nib.Nifti1Image
    box: tuple[tuple[int, int], ...] | None = None  # the model input's crop of the (S, H, W) grid ([start, stop))
    shape: tuple[int, ...] | None = None  # the whole (S, H, W) grid, when the input was cropped
    spacing: tuple[float, ...] | None = None  # mm per (S, H, W) axis, when known

    def uncrop(self, stored: np.ndarray) -> np.ndarray:
        """An (S, H, W) array on the model input's crop -> the whole grid, zero (background) outside the crop."""
        if self.box is None:
            return stored
        full = np.zeros(self.shape, dtype=stored.dtype)
        full[tuple(slice(a, b) for a, b in self.box)] = stored
        return full


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


def read_h5_case(path: Path) -> tuple[np.ndarray, Grid]:
    """An h5 volume as stored (C, S, H, W), taken as already prepared (``dust prepare`` output, the SSL4MIS or LA
    layout: not normalised again), and the grid ``dust prepare`` recorded for it; an h5 without one is read in the
    SSL4MIS convention (a (Z, Y, X) array, written back as (X, Y, Z) with an identity affine)."""
    image, _ = read_h5_arrays(path, want_label=False)  # numbers, finite: what the NIfTI path checks too
    attrs = read_h5_attrs(path)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise DataError(f"{path}: expected a volume (S, H, W) or (C, S, H, W), got shape {image.shape}")
    if _is_la_layout(path, attrs):  # (C, X, Y, Z) as the file stores it -> dust's (C, S, H, W), as dust.data.la
        image = to_stored(image, 2)
    try:
        affine = np.asarray(attrs.get("affine", np.eye(4)), dtype=np.float64)
    except (TypeError, ValueError):
        affine = np.empty(0)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(f"{path}: attribute 'affine' must be a finite 4x4 matrix, got shape {affine.shape}")
    slice_axis = attrs.get("slice_axis", 2)
    if slice_axis not in (0, 1, 2):
        raise DataError(f"{path}: attribute 'slice_axis' must be 0, 1 or 2, got {slice_axis!r}")
    try:  # a 3D dataset's val / test case: cropped, at its own spacing (dust.data.volumes)
        box = tuple((int(a), int(b)) for a, b in np.asarray(attrs["crop_box"])) if "crop_box" in attrs else None
        full = tuple(int(n) for n in attrs["full_shape"]) if "full_shape" in attrs else None
        spacing = tuple(float(v) for v in np.asarray(attrs["spacing"]).ravel()) if "spacing" in attrs else None
    except (TypeError, ValueError):
        raise DataError(f"{path}: attributes 'crop_box', 'full_shape' or 'spacing' are not numbers") from None
    if (box is None) != (full is None) or (box is not None and len(box) != 3):
        raise DataError(f"{path}: attributes 'crop_box' and 'full_shape' must come together, one per (S, H, W) axis")
    return image, Grid(int(slice_axis), affine, None, box=box, shape=full,
                       spacing=spacing if spacing is not None and len(spacing) == 3 else None)


def _is_la_layout(path: Path, attrs: dict) -> bool:
    """An LA-layout h5 holds its arrays in voxel order (X, Y, Z); dust's own and SSL4MIS's hold (S, H, W)."""
    return path.name == LA_CASE_FILE and "slice_axis" not in attrs


def write_stored(grid: Grid, stored: np.ndarray, dtype: type, path: Path) -> None:
    """Write an (S, H, W) array back on the input's voxel grid, with its affine and (when known) header."""
    data = from_stored(grid.uncrop(stored), grid.slice_axis).astype(dtype)
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
    image, grid = read_h5_case(path)
    _, label = read_h5_arrays(path, want_label=False, label_if_present=True)  # integer, finite, image-shaped
    if label is not None:
        if _is_la_layout(path, read_h5_attrs(path)):  # (X, Y, Z) as the image was before read_h5_case
            label = to_stored(label, 2)
        if label.shape != image.shape[1:]:
            raise DataError(f"{path}: label shape {label.shape} does not match the image's {image.shape[1:]}")
        if label.size and (label.min() < 0 or label.max() > 255):
            raise DataError(f"{path}: label values {int(label.min())}..{int(label.max())} do not fit the 0..255 "
                            "of a label NIfTI (uint8)")
        label = label.astype(np.uint8)
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


# ---------------------------------------------------------------------------------------------- comparing grids
def on_reference_grid(label: np.ndarray, img: nib.spatialimages.SpatialImage, path: Path,
                      reference: nib.spatialimages.SpatialImage, reference_path: Path) -> np.ndarray:
    """``label`` (``img``'s voxel order) on the voxel grid of ``reference``, compared in world space (mm).

    A file stored in another axis order or with flipped axes but covering the same voxels in space (an affine
    that says so) is permuted / flipped onto the reference's grid; nothing is interpolated. Anything else (a
    grid shifted, rotated or of another size or voxel size) is refused with one line naming ``path``: scoring
    voxels that lie elsewhere in space gives a number that means nothing.
    """
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                                nib.orientations.io_orientation(reference.affine))
    moved = nib.orientations.apply_orientation(label, transform)
    affine = img.affine @ nib.orientations.inv_ornt_aff(transform, label.shape)
    if moved.shape != tuple(reference.shape[:3]):
        raise DataError(f"{path}: its voxel grid {label.shape} does not match the reference {reference_path} "
                        f"{tuple(reference.shape[:3])} (compared in world space)")
    corners = np.array([[i, j, k, 1.0] for i in (0, moved.shape[0] - 1) for j in (0, moved.shape[1] - 1)
                        for k in (0, moved.shape[2] - 1)]).T
    apart = float(np.abs((affine - reference.affine) @ corners).max())  # mm between the same voxel's centres
    voxel = min(spacing_of(reference))
    if apart > 0.01 * voxel:  # further than 1% of a voxel: another place in space (or another voxel size)
        raise DataError(f"{path}: lies elsewhere in space than the reference {reference_path}: the same voxel is up "
                        f"to {apart:.3g} mm apart under the two affines (voxel size {voxel:.3g} mm); resample it "
                        "onto the reference grid first")
    return np.ascontiguousarray(moved)
