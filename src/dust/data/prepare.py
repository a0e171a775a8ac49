"""``dust prepare``: a NIfTI dataset -> dust's training layout (the SSL4MIS h5 layout the reader reads).

Sources (``layout``, detected when ``auto``):

- ``msd``: a Medical Segmentation Decathlon folder: ``dataset.json`` ("modality", "labels", "training",
  "test"), ``imagesTr/`` (3D, or 4D with the modalities on the last axis), ``labelsTr/``, ``imagesTs/``;
- ``nnunet``: an nnU-Net v2 folder: ``dataset.json`` ("channel_names", "labels", "file_ending"),
  ``imagesTr/CASE_0000.nii.gz`` (one file per channel), ``labelsTr/CASE.nii.gz``, optional ``imagesTs/``;
- ``acdc``: the ACDC challenge download, ``patientXXX/patientXXX_frameYY.nii.gz`` (+ ``_gt.nii.gz``),
  which prepared with ``minmax`` gives the arrays of SSL4MIS's ACDC h5 files;

plus folders of unlabelled images for the unlabelled pool. Test images without labels (``imagesTs``) join
that pool too. Written under ``out``::

    data/<case>_slice_<n>.h5   training cases (labelled and pool), one file per slice, n from 1 (as SSL4MIS)
    data/<case>.h5             val / test cases as whole volumes
    train_slices.list          labelled patients first (``labeled_patients`` counts them), then the pool
    val.list, test.list        volume names
    splits.json                case ids per split: edit it, then prepare again with ``--splits``
    dust_dataset.json          the record: source, channels, classes, normalisation, per-case geometry
    dust.yaml                  the data keys of a training config for this dataset

Every h5 file carries ``case_id``, ``spacing`` (mm, in the stored (S, H, W) axis order; volumes only),
``affine`` and ``slice_axis`` attributes; a slice also its ``slice_index`` along ``slice_axis``.
Splits are by patient (``patient028_frame01`` and ``_frame12`` stay together) and seeded.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import yaml
from tqdm import tqdm

from dust.data.nifti import (
    CHANNEL_FILE,
    INTENSITY_NORMS,
    NIFTI_ENDINGS,
    check_same_grid,
    find_input_cases,
    load_nifti,
    nifti_stem,
    normalize,
    read_channels,
    read_label,
    read_label_map,
    spacing_of,
    stored_axes,
    to_stored,
    visible_files,
)
from dust.data.plan import (
    DEFAULT_PATCH_VOXELS,
    ct_statistics,
    outlier_spacings,
    plan_patch,
    sample_foreground,
    target_spacing,
)
from dust.data.preprocess import Preprocessing
from dust.data.transforms import ANISOTROPY_RATIO, resample_label_to, resample_to, separate_axis, spacing_grid
from dust.data.types import DataError, patient_of, write_h5
from dust.data.volumes import CASES

log = logging.getLogger("dust")

LAYOUTS = ("msd", "nnunet", "acdc")
SPLITS = ("labeled", "unlabeled", "val", "test")
DATASET_FILE = "dust_dataset.json"
CONFIG_FILE = "dust.yaml"
# config keys that must equal what prepare did, or `dust predict` would feed the model something else
RECORDED_KEYS = ("in_channels", "num_classes", "intensity_norm", "slice_axis", "modalities", "intensity_stats",
                 "crop_nonzero", "target_spacing")
# what a dataset prepared before these keys existed did (for check_prepared)
_RECORDED_BEFORE = {"intensity_stats": None, "crop_nonzero": False, "target_spacing": None}
ACDC_CLASSES = ["background", "RV", "Myo", "LV"]
_ACDC_FRAME = re.compile(r"^patient\d+_frame\d+$")


@dataclass
class SourceCase:
    case_id: str
    images: list[Path]  # one 3D / 4D file, or one file per channel
    label: Path | None

    @property
    def patient(self) -> str:
        return patient_of(self.case_id)


@dataclass
class Source:
    layout: str
    channel_names: list[str]
    class_names: list[str]  # after the label map, when there is one
    cases: list[SourceCase]
    label_map: dict[int, int] | None = None


# ---------------------------------------------------------------------------------------------- sources
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _entry(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise DataError(f"{path}: no {key!r} entry")
    return meta[key]


def _indexed_names(mapping: Any, key: str, path: Path) -> list[str]:
    """``{"0": "T2", "1": "ADC"}`` -> ["T2", "ADC"]; refused unless the keys are 0..n-1."""
    try:
        by_index = {int(k): str(v) for k, v in mapping.items()}
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{path}: {key!r} must map \"0\", \"1\", ... to names") from None
    if sorted(by_index) != list(range(len(by_index))) or not by_index:
        raise DataError(f"{path}: {key!r} values {sorted(by_index)} are not 0..n-1; dust needs consecutive labels "
                        "and channels starting at 0 (label 0 = background)")
    return [by_index[i] for i in range(len(by_index))]


def parse_label_map(items: Sequence[str]) -> dict[int, int]:
    """``["1,2,4=1"]`` or ``["1=1", "2=1", "4=1"]`` -> {1: 1, 2: 1, 4: 1}: source label values -> dust classes.

    Values the map does not name become background (0); targets must be 1..K with none skipped."""
    mapping: dict[int, int] = {}
    for item in items:
        sources, sep, target = str(item).partition("=")
        try:
            values = [int(v) for v in sources.split(",") if v.strip()]
            value = int(target)
        except ValueError:
            values, value = [], -1
        if not sep or not values or value < 0:
            raise ValueError(f"--label-map {item!r}: write SOURCE[,SOURCE...]=CLASS with whole numbers, e.g. 1,2,4=1")
        for v in values:
            if v in mapping and mapping[v] != value:
                raise ValueError(f"--label-map: source label {v} is mapped to both {mapping[v]} and {value}")
            mapping[v] = value
    targets = sorted(set(mapping.values()) - {0})
    if targets != list(range(1, len(targets) + 1)):
        raise ValueError(f"--label-map: the classes {targets} must be 1..K with none skipped")
    return mapping


def _mapped_class_names(label_map: dict[int, int], names: dict[int, str]) -> list[str]:
    """Class names after a label map: each class named by the source labels it gathers (``edema+enhancing``)."""
    out = ["background"]
    for target in range(1, max(label_map.values(), default=0) + 1):
        out.append("+".join(names.get(v, str(v)) for v, t in sorted(label_map.items()) if t == target))
    return out


def _existing(path: Path, why: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file not found ({why})")
    return path


def _msd_source(root: Path, mapped: bool = False) -> Source:
    path = root / "dataset.json"
    meta = _read_json(path)
    channel_names = _indexed_names(_entry(meta, "modality", path), "modality", path)
    labels = _entry(meta, "labels", path)
    class_names = [] if mapped else _indexed_names(labels, "labels", path)  # mapped: named by the map
    cases = []
    for entry in _entry(meta, "training", path):
        if not (isinstance(entry, dict) and "image" in entry and "label" in entry):
            raise DataError(f"{path}: every 'training' entry needs 'image' and 'label', got {entry!r}")
        image = _existing(root / entry["image"], f"listed in {path}")
        cases.append(SourceCase(_case_id(image), [image], _existing(root / entry["label"], f"listed in {path}")))
    for entry in meta.get("test", []):
        image = _existing(root / str(entry), f"listed in {path}")
        cases.append(SourceCase(_case_id(image), [image], None))
    return Source("msd", channel_names, class_names, cases)


def _case_id(path: Path) -> str:
    stem = nifti_stem(path)
    if stem is None:
        raise DataError(f"{path}: not a NIfTI file name (.nii.gz or .nii); dust reads NIfTI only")
    return stem


def _nnunet_source(root: Path, mapped: bool = False) -> Source:
    path = root / "dataset.json"
    meta = _read_json(path)
    channel_names = _indexed_names(_entry(meta, "channel_names", path), "channel_names", path)
    labels = _entry(meta, "labels", path)
    if mapped:
        class_names: list[str] = []  # named by the label map
    elif not isinstance(labels, dict) or not all(isinstance(v, int) for v in labels.values()):
        raise DataError(f"{path}: 'labels' must map names to integer values; for region-based labels (e.g. BraTS "
                        "whole tumour) give --label-map, e.g. 1,2,4=1")
    else:
        class_names = _indexed_names({v: k for k, v in labels.items()}, "labels", path)
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise DataError(f"{path}: file_ending {ending!r}: dust reads NIfTI only ({', '.join(NIFTI_ENDINGS)})")
    n = len(channel_names)
    cases = []
    for label in visible_files(root / "labelsTr"):
        if label.name.endswith(ending):
            cid = label.name[: -len(ending)]
            images = [_existing(root / "imagesTr" / f"{cid}_{i:04d}{ending}",
                                f"{path} declares {n} channel(s); the image of {label}") for i in range(n)]
            cases.append(SourceCase(cid, images, label))
    labelled = {c.case_id for c in cases}
    for image in visible_files(root / "imagesTr"):
        if image.name.endswith(ending):
            m = CHANNEL_FILE.match(image.name[: -len(ending)])
            cid = m.group(1) if m else image.name[: -len(ending)]
            if cid not in labelled:
                raise DataError(f"{root / 'labelsTr' / (cid + ending)}: file not found (the label of {image})")
    if (root / "imagesTs").is_dir():
        cases += _image_folder_cases(root / "imagesTs")
    return Source("nnunet", channel_names, class_names, cases)


def _acdc_source(root: Path, mapped: bool = False) -> Source:
    images = sorted(p for p in root.rglob("patient*_frame*.nii*")
                    if (stem := nifti_stem(p)) is not None and _ACDC_FRAME.match(stem))
    if not images:
        raise DataError(f"{root}: no ACDC frames (patientXXX/patientXXX_frameYY.nii.gz) found")
    cases = []
    for image in images:
        ending = ".nii.gz" if image.name.endswith(".nii.gz") else ".nii"
        label = image.with_name(f"{nifti_stem(image)}_gt{ending}")
        cases.append(SourceCase(nifti_stem(image), [image], label if label.is_file() else None))
    return Source("acdc", ["cine-MRI"], list(ACDC_CLASSES), cases)


def _image_folder_cases(folder: Path) -> list[SourceCase]:
    """Unlabelled cases of a folder: NIfTI files, or nnU-Net channel files (CASE_0000, ...)."""
    cases = []
    for case in find_input_cases(folder):
        if case.is_h5:
            raise DataError(f"{case.paths[0]}: unlabelled folders hold NIfTI images, not h5 files")
        cases.append(SourceCase(case.case_id, case.paths, None))
    return cases


def detect_layout(root: Path) -> str:
    if not root.is_dir():
        raise DataError(f"{root}: source folder not found")
    described = root / "dataset.json"
    if described.is_file():
        meta = _read_json(described)
        if "channel_names" in meta:
            return "nnunet"
        if "modality" in meta:
            return "msd"
        raise DataError(f"{described}: neither nnU-Net v2 ('channel_names') nor Medical Segmentation Decathlon "
                        "('modality')")
    if any(_ACDC_FRAME.match(nifti_stem(p) or "") for p in root.rglob("patient*_frame*.nii*")):
        return "acdc"
    raise DataError(f"{root}: not a known layout; expected dataset.json (Medical Segmentation Decathlon or nnU-Net "
                    "v2) or ACDC's patientXXX/patientXXX_frameYY.nii.gz")


def _source_label_names(root: Path, layout: str) -> dict[int, str]:
    """Source label value -> name, as the dataset describes them (for naming mapped classes)."""
    if layout == "acdc":
        return dict(enumerate(ACDC_CLASSES))
    labels = _read_json(root / "dataset.json").get("labels", {})
    if layout == "msd":
        return {int(k): str(v) for k, v in labels.items() if str(k).lstrip("-").isdigit()}
    return {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}


def read_source(root: Path, layout: str = "auto", label_map: dict[int, int] | None = None) -> Source:
    """The cases of a source dataset; with ``label_map`` its labels need not be 0..K-1 (they are mapped)."""
    layout = detect_layout(root) if layout == "auto" else layout
    readers = {"msd": _msd_source, "nnunet": _nnunet_source, "acdc": _acdc_source}
    if layout not in readers:
        raise ValueError(f"unknown layout {layout!r}; choose auto or one of {LAYOUTS}")
    source = readers[layout](root, bool(label_map))
    if not label_map:
        return source
    source.label_map = dict(label_map)
    source.class_names = _mapped_class_names(label_map, _source_label_names(root, layout))
    return source


def resolve_modalities(spec: Sequence[str] | None, channel_names: list[str]) -> list[int] | None:
    """Modality names or indices -> channel indices; None when every channel is used in file order."""
    if not spec:
        return None
    known = {name.lower(): i for i, name in enumerate(channel_names)}
    picked = []
    for item in spec:
        index = int(item) if str(item).isdigit() else known.get(str(item).lower(), -1)
        if not 0 <= index < len(channel_names):
            raise ValueError(f"modality {item!r} is not one of the dataset's channels "
                             f"{dict(enumerate(channel_names))}")
        picked.append(index)
    if len(set(picked)) != len(picked):
        raise ValueError(f"modalities {list(spec)} name a channel twice")
    return None if picked == list(range(len(channel_names))) else picked


# ---------------------------------------------------------------------------------------------- splits
def _count(spec: float, n: int, name: str) -> int:
    """A fraction (< 1) of ``n`` patients, at least one unless 0, or a whole number of patients."""
    if spec < 0 or (spec >= 1 and spec != int(spec)):
        raise ValueError(f"--{name} {spec}: give a fraction below 1 or a whole number of patients")
    if spec >= 1:
        return int(spec)
    return 0 if spec == 0 else max(1, round(spec * n))


def _by_patient(cases: list[SourceCase]) -> dict[str, list[SourceCase]]:
    groups: dict[str, list[SourceCase]] = {}
    for case in cases:
        groups.setdefault(case.patient, []).append(case)
    return groups


def draw_splits(
    cases: list[SourceCase], val: float, test: float, labeled: int | None, seed: int
) -> dict[str, list[str]]:
    """Seeded split by patient. Patients with labels are shuffled: val, then test, then the training
    patients, of which the first ``labeled`` (default: all) are labelled and the rest join the pool together
    with every unlabelled case."""
    groups = _by_patient(cases)
    with_labels = [p for p, cs in groups.items() if all(c.label is not None for c in cs)]
    without = [p for p in groups if p not in with_labels]
    rng = np.random.default_rng(seed)
    order = [with_labels[i] for i in rng.permutation(len(with_labels))]
    n_val, n_test = _count(val, len(order), "val"), _count(test, len(order), "test")
    train = order[n_val + n_test :]
    if n_val < 1 or not train:
        raise DataError(f"{len(order)} patient(s) with labels, {n_val} for validation and {n_test} for test: need at "
                        "least one validation patient and one labelled training patient")
    n_labeled = len(train) if labeled is None else int(labeled)
    if not 1 <= n_labeled <= len(train):
        raise ValueError(f"--labeled {labeled}: choose 1..{len(train)} (patients with labels left for training)")

    def ids(patients: list[str]) -> list[str]:
        return [c.case_id for p in patients for c in groups[p]]

    return {"labeled": ids(train[:n_labeled]), "unlabeled": ids(train[n_labeled:] + without),
            "val": ids(order[:n_val]), "test": ids(order[n_val : n_val + n_test])}


def read_splits(path: Path, cases: list[SourceCase]) -> dict[str, list[str]]:
    """A user's (edited) splits.json, checked against the source. Cases it does not list are left out."""
    meta = _read_json(path)
    unknown = sorted(set(meta) - set(SPLITS) - {"seed"})
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; a split file has {list(SPLITS)}")
    known = {c.case_id: c for c in cases}
    splits = {k: meta.get(k, []) for k in SPLITS}
    seen: dict[str, str] = {}
    for split, ids in splits.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(f"{path}: {split!r} must be a list of case ids")
        for cid in ids:
            if cid not in known:
                raise DataError(f"{path}: case {cid!r} (in {split!r}) is not in the source dataset")
            if cid in seen:
                raise DataError(f"{path}: case {cid!r} is in both {seen[cid]!r} and {split!r}")
            seen[cid] = split
            if split != "unlabeled" and known[cid].label is None:
                raise DataError(f"{path}: case {cid!r} is in {split!r} but has no label")
    patients = {k: {patient_of(c) for c in ids} for k, ids in splits.items()}
    for a, b in (("labeled", "unlabeled"), ("labeled", "val"), ("labeled", "test"), ("unlabeled", "val"),
                 ("unlabeled", "test"), ("val", "test")):
        shared = sorted(patients[a] & patients[b])
        if shared:
            raise DataError(f"{path}: patient(s) {shared} have cases in both {a!r} and {b!r}; splits are by patient")
    if not splits["labeled"] or not splits["val"]:
        raise DataError(f"{path}: 'labeled' and 'val' each need at least one case")
    return splits


# ---------------------------------------------------------------------------------------------- writing
def _case_channels(case: SourceCase, source: Source, modalities: list[int] | None) -> tuple[np.ndarray, Any]:
    """The case's channels (C, X, Y, Z), checked against the dataset's channel count, and its reference image."""
    channels, reference = read_channels(case.images, None)
    if len(channels) != len(source.channel_names):
        raise DataError(f"{case.images[0]}: {len(channels)} channel(s), but the dataset's images have "
                        f"{len(source.channel_names)} ({', '.join(source.channel_names)})")
    return (channels if modalities is None else channels[modalities]), reference


def _case_label(case: SourceCase, source: Source, reference: Any) -> np.ndarray:
    """The case's label (X, Y, Z) uint8 on its image's voxel grid (refused otherwise), through the label map."""
    assert case.label is not None
    shape = tuple(reference.shape[:3])
    if source.label_map is None:
        label = read_label(case.label, len(source.class_names), shape, case.images[0])
    else:
        raw, _ = read_label_map(case.label)
        if raw.shape != shape:
            raise DataError(f"{case.label}: label shape {raw.shape} does not match the image shape {shape} of "
                            f"{case.images[0]}")
        label = np.zeros(raw.shape, dtype=np.uint8)
        for value, target in source.label_map.items():
            label[raw == value] = target
        unmapped = sorted({int(v) for v in np.unique(raw)} - set(source.label_map) - {0})
        if unmapped:
            log.info("%s: label value(s) %s are not in --label-map and become background", case.label, unmapped)
    check_same_grid(load_nifti(case.label), case.label, reference, case.images[0])
    return label


def _write_case(
    case: SourceCase, split: str, data_dir: Path, source: Source, modalities: list[int] | None,
    intensity_norm: str, slice_axis: int,
) -> dict[str, Any]:
    channels, reference = _case_channels(case, source, modalities)
    label = None if case.label is None else _case_label(case, source, reference)
    image, stats = normalize(channels, intensity_norm, case.images[0])
    image = to_stored(image, slice_axis)  # (C, S, H, W)
    if image.shape[0] == 1:
        image = image[0]  # single channel: exactly the SSL4MIS arrays, (S, H, W) and (H, W)
    label = None if label is None else to_stored(label, slice_axis)
    spacing = spacing_of(reference)
    if max(spacing) > 1.5 * min(spacing) and int(np.argmax(spacing)) != slice_axis:
        log.warning("%s: the coarsest voxel axis is %d (spacing %s) but slices are cut along slice_axis=%d",
                    case.images[0], int(np.argmax(spacing)), spacing, slice_axis)
    axes = stored_axes(slice_axis)
    attrs = {"case_id": case.case_id, "affine": reference.affine, "slice_axis": slice_axis}
    n_slices = image.shape[-3]
    if split in ("val", "test"):
        write_h5(data_dir / f"{case.case_id}.h5", image, label,
                  {**attrs, "spacing": [spacing[a] for a in axes]})
        names = [case.case_id]
    else:
        names = [f"{case.case_id}_slice_{s + 1}" for s in range(n_slices)]
        for s, name in enumerate(names):
            write_h5(data_dir / f"{name}.h5", image[..., s, :, :], None if label is None else label[s],
                      {**attrs, "slice_index": s, "spacing": [spacing[a] for a in axes[1:]]})
    return {
        "patient": case.patient, "split": split, "images": [str(p) for p in case.images],
        "label": None if case.label is None else str(case.label), "shape": list(reference.shape[:3]),
        "spacing": list(spacing), "affine": reference.affine.tolist(), "stored_axes": list(axes),
        "slices": n_slices, "normalisation": stats, "h5": names,
    }


def prepare_dataset(
    source_dir: Path,
    out_dir: Path,
    *,
    layout: str = "auto",
    modalities: Sequence[str] | None = None,
    intensity_norm: str = "minmax",
    slice_axis: int = 2,
    val: float = 0.2,
    test: float = 0.0,
    labeled: int | None = None,
    seed: int = 0,
    splits_file: Path | None = None,
    unlabeled_dirs: Sequence[Path] = (),
    progress: bool = True,
    dims: int = 2,
    volume_options: VolumeOptions | None = None,
    label_map: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Convert ``source_dir`` into dust's layout under ``out_dir``; returns the dataset record.

    ``dims`` 2: training slices (:mod:`dust.data.ssl4mis`'s layout, for a 2D model); 3: one chunked file per case,
    resampled to a planned spacing, with a plan for a 3D model (:mod:`dust.data.volumes`, ``volume_options``).

    Nothing is left behind on error: the dataset is written into a sibling folder and moved into place at
    the end. ``out_dir`` may hold an earlier prepared dataset: the files that preparation wrote (listed in its
    record) are replaced, and anything else there (the source, a user's notes) is kept untouched.
    """
    if intensity_norm not in INTENSITY_NORMS:
        raise ValueError(f"intensity normalisation must be one of {INTENSITY_NORMS}, got {intensity_norm!r}")
    stored_axes(slice_axis)  # validates
    if dims not in (2, 3):
        raise ValueError(f"--dims {dims}: 2 (slices for a 2D model) or 3 (volumes for a 3D model)")
    if dims == 2 and intensity_norm in ("ct", "zscore_nonzero"):
        raise ValueError(f"--norm {intensity_norm} is for --dims 3 (2D slices are normalised per case: minmax or "
                         "zscore)")
    source = read_source(source_dir, layout, label_map)
    for folder in unlabeled_dirs:
        source.cases += _image_folder_cases(Path(folder))
    duplicated = sorted(cid for cid, n in Counter(c.case_id for c in source.cases).items() if n > 1)
    if duplicated:
        raise DataError(f"{source_dir}: case id(s) {duplicated} occur more than once across the source folders")
    picked = resolve_modalities(modalities, source.channel_names)
    splits = read_splits(splits_file, source.cases) if splits_file else draw_splits(
        source.cases, val, test, labeled, seed)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder; choose another --out")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / DATASET_FILE).is_file():
        raise FileExistsError(f"{out_dir}: folder exists, is not empty and is not a dataset dust prepared; "
                              "choose another --out")
    written_before = prepared_files(out_dir)  # read (and refused if unreadable) before any work
    staging = out_dir.parent / f".{out_dir.name}.preparing"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / ("data" if dims == 2 else CASES)).mkdir(parents=True)
    try:
        if dims == 2:
            record = _write_dataset(source, source_dir, out_dir, staging, splits, picked, intensity_norm,
                                    slice_axis, seed, progress)
        else:
            record = _write_dataset_3d(source, source_dir, out_dir, staging, splits, picked, intensity_norm,
                                       slice_axis, seed, progress, volume_options or VolumeOptions())
        _record_written_files(staging, record)
        replace_prepared(staging, out_dir, written_before)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _write_lists(staging: Path, train_name: str, train: list[str], splits: dict[str, list[str]], seed: int) -> None:
    """The training list (labelled patients first), val / test lists and the split file."""
    (staging / train_name).write_text("".join(f"{n}\n" for n in train))
    for split in ("val", "test"):
        if splits[split]:
            (staging / f"{split}.list").write_text("".join(f"{cid}\n" for cid in splits[split]))
    (staging / "splits.json").write_text(json.dumps({"seed": seed, **splits}, indent=1))


def _data_keys(source: Source, out_dir: Path, splits: dict[str, list[str]],
               modalities: list[int] | None) -> dict[str, Any]:
    """The config keys that say where the data is and what it holds."""
    return {"data_dir": str(out_dir.resolve()),
            "in_channels": len(modalities) if modalities is not None else len(source.channel_names),
            "num_classes": len(source.class_names), "class_names": source.class_names,
            "labeled_patients": len({patient_of(c) for c in splits["labeled"]})}


def _write_dataset(
    source: Source, source_dir: Path, out_dir: Path, staging: Path, splits: dict[str, list[str]],
    modalities: list[int] | None, intensity_norm: str, slice_axis: int, seed: int, progress: bool,
) -> dict[str, Any]:
    split_of = {cid: split for split, ids in splits.items() for cid in ids}
    chosen = [c for c in source.cases if c.case_id in split_of]
    left_out = len(source.cases) - len(chosen)
    if left_out:
        log.info("%d case(s) of the source are in no split and are left out", left_out)
    cases = {}
    for case in tqdm(chosen, desc="prepare", unit="case", disable=None if progress else True):  # None: terminal only
        cases[case.case_id] = _write_case(case, split_of[case.case_id], staging / "data", source, modalities,
                                          intensity_norm, slice_axis)
    slices = [name for split in ("labeled", "unlabeled") for cid in splits[split] for name in cases[cid]["h5"]]
    _write_lists(staging, "train_slices.list", slices, splits, seed)
    data_keys = {**_data_keys(source, out_dir, splits, modalities), "intensity_norm": intensity_norm,
                 "slice_axis": slice_axis, "modalities": modalities}
    channel_names = [source.channel_names[i] for i in (modalities or range(len(source.channel_names)))]
    record = {
        "format": "dust-prepared-dataset", "version": 1, "source": str(source_dir.resolve()),
        "layout": source.layout, "channel_names": channel_names,
        **{k: data_keys.get(k, _RECORDED_BEFORE.get(k)) for k in ("class_names", *RECORDED_KEYS)},
        "splits": {k: len(v) for k, v in splits.items()}, "seed": seed, "cases": cases,
    }
    (staging / DATASET_FILE).write_text(json.dumps(record, indent=1))
    (staging / CONFIG_FILE).write_text(
        f"# data keys written by `dust prepare` for {source_dir}; add a method and budget, e.g.\n"
        f"#   dust train --config {out_dir / CONFIG_FILE} --set method=dust --set iterations=4000\n"
        + yaml.safe_dump(data_keys, sort_keys=False))
    log.info("prepared %s (%s): %s cases, %d training slices -> %s", source_dir, source.layout,
             {k: len(v) for k, v in splits.items()}, len(slices), out_dir)
    return record


# ---------------------------------------------------------------------------------------------- 3D datasets
@dataclass
class VolumeOptions:
    """``dust prepare --dims 3``: what is planned and how (:mod:`dust.data.plan`)."""

    spacing: Sequence[float] | None = None  # target spacing in mm, in the file's (x, y, z) order; None: planned
    window: Sequence[float] | None = None  # --norm ct: a fixed clip window in HU instead of the percentiles
    patch_size: Sequence[int] | None = None  # (S, H, W); None: planned from the median shape and patch_voxels
    patch_voxels: int = DEFAULT_PATCH_VOXELS
    crop_nonzero: bool = True
    network_step: int = 16  # the VNet halves each axis 4 times


def _read_case_3d(case: SourceCase, source: Source, modalities: list[int] | None,
                  prep: Preprocessing) -> tuple[np.ndarray, np.ndarray | None, Any, tuple[tuple[int, int], ...]]:
    """(image (C, S, H, W) cropped, unnormalised; label (S, H, W) or None; the reference image; the crop box)."""
    channels, reference = _case_channels(case, source, modalities)
    image, box = prep.crop(channels.astype(np.float32), str(case.images[0]))  # the crop dust predict makes
    box = box or tuple((0, n) for n in image.shape[1:])
    window = tuple(slice(a, b) for a, b in box)
    label = None if case.label is None else to_stored(_case_label(case, source, reference), prep.slice_axis)[window]
    return image, label, reference, box


def _fingerprint(chosen: list[SourceCase], split_of: dict[str, str], source: Source, modalities: list[int] | None,
                 prep: Preprocessing, need_foreground: bool, seed: int, progress: bool) -> dict[str, Any]:
    """Spacing and cropped shape (S, H, W) of every case, and foreground intensity samples of the labelled
    training cases (for ``--norm ct``): a first pass over the data, as nnU-Net's fingerprint."""
    rng = np.random.default_rng(seed)
    spacing, shape, samples = {}, {}, []
    for case in tqdm(chosen, desc="fingerprint", unit="case", disable=None if progress else True):
        image, label, reference, box = _read_case_3d(case, source, modalities, prep)
        zooms = spacing_of(reference)
        spacing[case.case_id] = [float(zooms[a]) for a in stored_axes(prep.slice_axis)]
        shape[case.case_id] = [b - a for a, b in box]
        if need_foreground and label is not None and split_of[case.case_id] == "labeled":
            samples.append(sample_foreground(image, label, rng))
    return {"spacing": spacing, "shape": shape, "samples": samples}


def _write_dataset_3d(
    source: Source, source_dir: Path, out_dir: Path, staging: Path, splits: dict[str, list[str]],
    modalities: list[int] | None, intensity_norm: str, slice_axis: int, seed: int, progress: bool,
    opts: VolumeOptions,
) -> dict[str, Any]:
    split_of = {cid: split for split, ids in splits.items() for cid in ids}
    chosen = [c for c in source.cases if c.case_id in split_of]
    prep = Preprocessing(intensity_norm, None, slice_axis, modalities, opts.crop_nonzero)
    facts = _fingerprint(chosen, split_of, source, modalities, prep, intensity_norm == "ct", seed, progress)
    training = [cid for split in ("labeled", "unlabeled") for cid in splits[split]]
    odd = outlier_spacings(training, [facts["spacing"][c] for c in training])
    if odd:
        log.warning("%d case(s) have a spacing far from the dataset's median and are resampled like the others: %s",
                    len(odd), ", ".join(odd[:5]) + (" ..." if len(odd) > 5 else ""))
    axes = stored_axes(slice_axis)
    if opts.spacing is not None:
        given = [float(v) for v in opts.spacing] * (3 if len(opts.spacing) == 1 else 1)
        if len(given) != 3 or min(given) <= 0:
            raise ValueError(f"--spacing {list(opts.spacing)}: one number (isotropic) or three (x y z, mm), positive")
        target = [given[a] for a in axes]
    else:
        target = target_spacing([facts["spacing"][c] for c in training], [facts["shape"][c] for c in training])
    stats = None
    if opts.window is not None and not float(opts.window[0]) < float(opts.window[1]):
        raise ValueError(f"--window {list(opts.window)}: give LOW HIGH with LOW below HIGH, e.g. -125 275")
    if intensity_norm == "ct":
        stats = ct_statistics(facts["samples"], opts.window)
    elif opts.window is not None:
        raise ValueError("--window is the clip window of --norm ct; give --norm ct with it")
    prep = Preprocessing(intensity_norm, stats, slice_axis, modalities, opts.crop_nonzero)
    if int(np.argmax(target)) != 0 and max(target) > ANISOTROPY_RATIO * min(target):
        log.warning("the coarsest axis of the target spacing %s mm (S, H, W) is not S: training rotates crops in "
                    "the (H, W) plane and would swap it with a fine axis; choose --slice-axis %d", target,
                    axes[int(np.argmax(target))])
    grids = {c: spacing_grid(facts["shape"][c], facts["spacing"][c], target) for c in training}
    median_shape = np.median(np.asarray(list(grids.values()), dtype=np.float64), axis=0)
    patch = list(opts.patch_size) if opts.patch_size else plan_patch(median_shape, opts.network_step,
                                                                      opts.patch_voxels)
    (staging / CASES).mkdir(parents=True, exist_ok=True)
    cases = {}
    for case in tqdm(chosen, desc="prepare", unit="case", disable=None if progress else True):
        split = split_of[case.case_id]
        image, label, reference, box = _read_case_3d(case, source, modalities, prep)
        image, norm_stats = prep.normalize(image, str(case.images[0]))
        spacing = facts["spacing"][case.case_id]
        full_shape = [int(reference.shape[a]) for a in axes]
        attrs: dict[str, Any] = {"case_id": case.case_id, "slice_axis": slice_axis}
        if split in ("labeled", "unlabeled"):  # stored at the target spacing: what training crops
            size, separate = grids[case.case_id], separate_axis(spacing)
            image = resample_to(torch.from_numpy(image)[None], size, separate)[0].numpy()
            if label is not None:
                label = resample_label_to(torch.from_numpy(label), size, separate).numpy()
            attrs["spacing"] = list(target)
        else:  # stored at its own resolution, with the geometry back to the source: what is scored
            attrs.update(spacing=spacing, affine=reference.affine, crop_box=np.asarray(box), full_shape=full_shape)
        _write_volume(staging / CASES / f"{case.case_id}.h5", image, label, attrs, seed)
        cases[case.case_id] = {
            "patient": case.patient, "split": split, "images": [str(p) for p in case.images],
            "label": None if case.label is None else str(case.label), "shape": list(reference.shape[:3]),
            "spacing": list(spacing_of(reference)), "affine": reference.affine.tolist(), "stored_axes": list(axes),
            "crop_box": [list(b) for b in box], "stored_shape": list(image.shape[1:]), "normalisation": norm_stats,
        }
    _write_lists(staging, "train.list", training, splits, seed)
    data_keys = {
        "dataset": "prepared_3d", **_data_keys(source, out_dir, splits, modalities),
        "intensity_norm": intensity_norm, "intensity_stats": stats, "crop_nonzero": opts.crop_nonzero,
        "target_spacing": target, "slice_axis": slice_axis, "modalities": modalities,
    }
    plan_keys = {  # the network and patch of the 3D papers dust carries (Yu et al.'s VNet), sized by the plan
        "model": "vnet", "upsample": "deconv", "dropout": [0.0, 0.0, 0.0, 0.0, 0.5], "patch_size": patch,
        "spatial_policy": "crop", "augment_rotate_deg": 0.0, "foreground_oversample": 0.33,
        "batch_size": 2, "unlabeled_batch_size": 2,
        "run_dir": f"runs/{out_dir.name}/{{method}}_{{labeled_patients}}p_seed{{seed}}",
    }
    channel_names = [source.channel_names[i] for i in (modalities or range(len(source.channel_names)))]
    record = {
        "format": "dust-prepared-dataset", "version": 2, "dims": 3, "source": str(source_dir.resolve()),
        "layout": source.layout, "channel_names": channel_names,
        **{k: data_keys[k] for k in ("class_names", *RECORDED_KEYS)}, "label_map": source.label_map,
        "plan": {"median_shape": [float(m) for m in median_shape], **plan_keys},
        "splits": {k: len(v) for k, v in splits.items()}, "seed": seed, "cases": cases,
    }
    (staging / DATASET_FILE).write_text(json.dumps(record, indent=1))
    (staging / CONFIG_FILE).write_text(
        f"# written by `dust prepare --dims 3` for {source_dir}: the data keys and the plan (network, patch at the\n"
        f"# target spacing, median shape {[round(float(m)) for m in median_shape]}). Add a method and a budget, e.g.\n"
        f"#   dust train --config {out_dir / CONFIG_FILE} --set method=mcf --set iterations=4000\n"
        + yaml.safe_dump({**data_keys, **plan_keys}, sort_keys=False))
    log.info("prepared %s (%s, 3D): %s cases at %s mm (S, H, W), patch %s -> %s", source_dir, source.layout,
           {k: len(v) for k, v in splits.items()}, target, patch, out_dir)
    return record


# Foreground coordinates kept per case for oversampling without reading the label (nnU-Net keeps 10k per class).
MAX_FOREGROUND_VOXELS = 200_000


def _write_volume(path: Path, image: np.ndarray, label: np.ndarray | None, attrs: dict[str, Any], seed: int) -> None:
    """One case in chunks (a training crop reads a few chunks, never the volume); image uncompressed for speed."""
    chunks = (1, *(min(n, c) for n, c in zip(image.shape[1:], (16, 32, 32), strict=True)))
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), chunks=chunks)
        if label is not None:
            f.create_dataset("label", data=label.astype(np.uint8), chunks=chunks[1:], compression="lzf")
            foreground = np.argwhere(label > 0).astype(np.int32)
            if len(foreground) > MAX_FOREGROUND_VOXELS:
                keep = np.random.default_rng(seed).choice(len(foreground), MAX_FOREGROUND_VOXELS, replace=False)
                foreground = foreground[np.sort(keep)]
            f.create_dataset("foreground", data=foreground.reshape(-1, 3))
        f.attrs.update(attrs)



def check_prepared(cfg: dict[str, Any], root: Path) -> None:
    """Refuse a config whose input keys differ from how ``dust prepare`` made the dataset at ``root``."""
    path = root / DATASET_FILE
    if not path.is_file():
        return
    meta = _read_json(path)
    wrong = [f"{k}={cfg[k]!r} (prepared with {meta.get(k, _RECORDED_BEFORE.get(k))!r})" for k in RECORDED_KEYS
             if cfg[k] != meta.get(k, _RECORDED_BEFORE.get(k))]
    if wrong:
        raise DataError(f"{path}: the config does not match how this dataset was prepared: {', '.join(wrong)}; "
                        f"use the data keys of {root / CONFIG_FILE}")
    measured_on = meta.get("labeled_patients")
    if cfg["intensity_norm"] == "ct" and isinstance(measured_on, int) and cfg["labeled_patients"] < measured_on:
        log.warning("%s: the ct intensity statistics were measured on the labels of %d patients, more than the %d "
                    "this run treats as labelled; for a strict protocol prepare with --labeled %d", path,
                    measured_on, cfg["labeled_patients"], cfg["labeled_patients"])


# ---------------------------------------------------------------------------------------------- replacing
def _record_written_files(staging: Path, record: dict[str, Any]) -> None:
    """List every file this preparation wrote in its record, so that preparing again replaces exactly those."""
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    record["files"] = sorted({*files, DATASET_FILE})
    (staging / DATASET_FILE).write_text(json.dumps(record, indent=1))


def prepared_files(out_dir: Path) -> list[str]:
    """The files (relative paths) an earlier ``dust prepare`` wrote into ``out_dir``, from its record; a record
    older than the ``files`` list gives them by its cases' h5 names and the fixed file names."""
    path = out_dir / DATASET_FILE
    if not path.is_file():
        return []
    meta = _read_json(path)
    if isinstance(meta.get("files"), list):  # only names inside out_dir: the record is a file anyone can edit
        return [str(f) for f in meta["files"]
                if isinstance(f, str) and not Path(f).is_absolute() and ".." not in Path(f).parts]
    try:
        h5 = [f"data/{name}.h5" for case in meta["cases"].values() for name in case["h5"]]
    except (KeyError, TypeError, AttributeError):
        raise DataError(f"{path}: cannot tell which files the earlier preparation wrote (no 'files' or 'cases' "
                        "list); move the folder away or choose another --out") from None
    return [*h5, "train_slices.list", "val.list", "test.list", "splits.json", DATASET_FILE, CONFIG_FILE]


def replace_prepared(staging: Path, out_dir: Path, written_before: list[str]) -> None:
    """Move the new dataset from ``staging`` into ``out_dir`` in place of the files the earlier preparation wrote.

    Only those files are removed; anything else in ``out_dir`` stays (the source the user keeps there, notes,
    a folder of their own). A new file whose name is taken by a file that preparation did not write is
    refused before anything moves.
    """
    new = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    ours = set(written_before)
    taken = [name for name in new if (out_dir / name).exists() and name not in ours]
    if taken:
        raise FileExistsError(f"{out_dir / taken[0]}: exists and was not written by dust prepare; it would be "
                              f"replaced ({len(taken)} such file(s)); move it, or choose another --out")
    for name in written_before:  # the earlier preparation's files, and the folders they leave empty
        (out_dir / name).unlink(missing_ok=True)
    for folder in sorted({(out_dir / name).parent for name in written_before}, key=lambda p: -len(p.parts)):
        if folder != out_dir and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for name in new:
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).replace(out_dir / name)
    shutil.rmtree(staging)
