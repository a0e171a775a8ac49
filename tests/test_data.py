"""Reader, patient split, augmentation alignment and the two-stream sampler."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dust.data import load_training_data
from dust.data.sampler import TwoStreamSampler
from dust.data.ssl4mis import DataError, load_training_slices, patient_of, read_list
from dust.data.transforms import augment_pair
from tests.conftest import ACDC_DIR


def test_patient_of_handles_slices_and_volumes():
    assert patient_of("patient028_frame01_slice_3") == "patient028"
    assert patient_of("patient028_frame01") == "patient028"
    assert patient_of("case7_slice_12") == "case7"


def test_split_is_by_patient_and_unlabelled_labels_are_never_read(phantom_root: Path):
    labeled, unlabeled = load_training_slices(phantom_root, labeled_patients=2, num_classes=4)
    assert len(set(labeled.patients)) == 2
    assert not set(labeled.patients) & set(unlabeled.patients)
    assert sorted(labeled.ids + unlabeled.ids) == sorted(read_list(phantom_root / "train_slices.list"))
    assert unlabeled.labels is None and labeled.labels is not None
    first_two = list(dict.fromkeys(patient_of(n) for n in read_list(phantom_root / "train_slices.list")))[:2]
    assert set(labeled.patients) == set(first_two)


def test_too_many_labelled_patients_is_a_clear_error(phantom_root: Path):
    with pytest.raises(DataError, match="labelled patients requested but the list has only 4"):
        load_training_slices(phantom_root, labeled_patients=5, num_classes=4)


def test_bad_files_are_named(tmp_path: Path, phantom_root: Path, tiny_cfg):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(phantom_root, root)
    first = read_list(root / "train_slices.list")[0]
    (root / "data" / f"{first}.h5").write_bytes(b"not an h5 file")
    with pytest.raises(DataError, match=rf"{first}\.h5: cannot read h5 file"):
        load_training_data(tiny_cfg(), root)
    with h5py.File(root / "data" / f"{first}.h5", "w") as f:
        f["image"] = np.zeros((8, 8), np.float32)
        f["label"] = np.full((8, 8), 7, np.uint8)
    with pytest.raises(DataError, match=rf"{first}\.h5: label values \[7\] outside"):
        load_training_data(tiny_cfg(), root)


def test_augmentation_keeps_image_and_label_aligned():
    # The image encodes its own label (intensity = label / 3), so any misalignment shows as disagreement.
    label = torch.zeros(60, 44, dtype=torch.uint8)
    label[10:30, 8:20] = 1
    label[35:50, 20:40] = 2
    label[5:15, 25:40] = 3
    image = (label.float() / 3)[None]
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        x, y = augment_pair(image, label, (32, 32), gen, rot_flip=True, rotate_deg=20)
        assert x.shape == (1, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
        agree = (torch.round(x[0] * 3).long() == y).float().mean()
        assert agree > 0.9, f"image and label disagree on {1 - agree:.0%} of pixels"


def test_sampler_yields_both_streams_and_resumes_exactly(phantom_root: Path):
    labeled, unlabeled = load_training_slices(phantom_root, labeled_patients=2, num_classes=4)
    make = lambda: TwoStreamSampler(labeled, unlabeled, 3, 5, (24, 24), seed=1)  # noqa: E731
    a = make()
    batch = a.next(with_unlabeled=True)
    assert batch["labeled_image"].shape == (3, 1, 24, 24) and batch["label"].shape == (3, 24, 24)
    assert batch["unlabeled_image"].shape == (5, 1, 24, 24) and "pseudo_label" not in batch
    state = a.state_dict()
    expected = [a.next(True) for _ in range(4)]
    b = make()
    b.load_state_dict(state)
    for want in expected:
        got = b.next(True)
        assert torch.equal(got["labeled_image"], want["labeled_image"])
        assert torch.equal(got["unlabeled_image"], want["unlabeled_image"])


@pytest.mark.slow
@pytest.mark.skipif(not ACDC_DIR.is_dir(), reason="ACDC data not available")
def test_acdc_labelled_patients_match_the_standard_slice_counts():
    names = read_list(ACDC_DIR / "train_slices.list")
    from dust.data.ssl4mis import split_by_patients

    for patients, n_slices in [(3, 68), (7, 136), (14, 256)]:
        labeled, unlabeled = split_by_patients(names, patients, ACDC_DIR / "train_slices.list")
        assert labeled == names[:n_slices]
        assert len(labeled) + len(unlabeled) == 1312
        assert not {patient_of(n) for n in labeled} & {patient_of(n) for n in unlabeled}


@pytest.mark.slow
@pytest.mark.skipif(not ACDC_DIR.is_dir(), reason="ACDC data not available")
def test_acdc_loads_with_seven_labelled_patients(tiny_cfg):
    data = load_training_data(tiny_cfg(labeled_patients=7), ACDC_DIR)
    assert (len(data.labeled), len(data.unlabeled), len(data.val)) == (136, 1176, 20)
    assert data.unlabeled.labels is None
    for vol in data.val:
        assert vol.image.ndim == 4 and vol.image.shape[1:] == vol.label.shape
        assert set(np.unique(vol.label)) <= {0, 1, 2, 3}


def test_nearest_interpolation_creates_no_new_intensities():
    # SSL4MIS resizes with an order-0 zoom; image_interpolation=nearest must too (values only copied, or 0 padding)
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(1, 50, 70)
    label = (image[0] > 0.5).to(torch.uint8)
    allowed = set(image.flatten().tolist()) | {0.0}
    for _ in range(10):
        x, y = augment_pair(image, label, (32, 32), gen, interpolation="nearest")
        assert set(x.flatten().tolist()) <= allowed
        assert torch.equal((x[0] > 0.5).long(), y)  # nearest on both: image and label stay in lockstep
