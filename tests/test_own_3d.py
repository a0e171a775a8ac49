"""A user's own 3D scans end to end: ``dust prepare --dims 3`` -> ``dust train`` -> ``dust predict``, on the real
samples in ``$DUST_DATA/samples`` (an abdominal CT in HU, a 4-modality BraTS case) where they are, and on phantoms."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from dust.cli.main import main
from dust.data.plan import plan_patch, target_spacing
from dust.data.transforms import augment_crop, resample_label_to, resample_to, separate_axis
from dust.data.types import StoredArray
from tests.conftest import ACDC_DIR

SAMPLES = ACDC_DIR.parent / "samples"
CT = SAMPLES / "ct_abdomen" / "example_ct_sm.nii.gz"
CT_SEG = SAMPLES / "ct_abdomen" / "example_seg.nii.gz"
BRATS = SAMPLES / "brats_toy"
needs_samples = pytest.mark.skipif(not CT.is_file() or not BRATS.is_dir(), reason="$DUST_DATA/samples not present")
PANCREAS = 7
TINY = ["iterations=2", "val_every=2", "threads=1", "channels=[4,8,16,32,64]", "progress=false"]


def _nnunet_ct(root: Path) -> Path:
    """Four CT cases from the sample: as is, with a metal block (3000 HU), and two cut at other x ranges."""
    ct, seg = nib.load(CT), nib.load(CT_SEG)
    hu, labels = np.asarray(ct.dataobj).astype(np.int16), np.asarray(seg.dataobj).astype(np.uint8)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, cut in enumerate((slice(None), slice(None), slice(6, None), slice(0, -9))):
        image = hu.copy()
        if i == 1:
            image[8:12, 8:12, 4:7] = 3000
        nib.save(nib.Nifti1Image(image[cut], ct.affine), root / "imagesTr" / f"ct{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels[cut], seg.affine), root / "labelsTr" / f"ct{i}.nii.gz")
    labels_json = {"background": 0, **{f"structure{v}": v for v in range(1, int(labels.max()) + 1)}}
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels_json,
                                                   "file_ending": ".nii.gz"}))
    return root


def _prepare(source: Path, out: Path, *args: str) -> dict:
    assert main(["prepare", "--source", str(source), "--out", str(out), "--dims", "3", *args]) == 0
    return yaml.safe_load((out / "dust.yaml").read_text())


def _train(config: Path, run: Path, *sets: str) -> Path:
    args = ["train", "--config", str(config), "--set", f"run_dir={run}"]
    for item in [*TINY, *sets]:
        args += ["--set", item]
    assert main(args) == 0
    return run / "checkpoints" / "best.pt"


def _hu_and_values(out: Path, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """(HU, stored value) of every voxel of every prepared case (the CT cases are kept at their 3 mm)."""
    record = json.loads((out / "dust_dataset.json").read_text())
    pairs_hu, pairs_value = [], []
    for case_id, case in record["cases"].items():
        hu = np.asarray(nib.load(source / "imagesTr" / f"{case_id}_0000.nii.gz").dataobj).transpose(2, 1, 0)
        box = tuple(slice(a, b) for a, b in case["crop_box"])
        with h5py.File(out / "cases" / f"{case_id}.h5") as f:
            stored = np.asarray(f["image"][0])
        assert stored.shape == hu[box].shape
        pairs_hu.append(hu[box].ravel())
        pairs_value.append(stored.ravel())
    return np.concatenate(pairs_hu), np.concatenate(pairs_value)


@needs_samples
@pytest.mark.parametrize("window", [None, (-125, 275)])
def test_ct_norm_gives_one_value_to_one_hounsfield_value_in_every_case(tmp_path: Path, window):
    source = _nnunet_ct(tmp_path / "ct")
    extra = ["--window", *map(str, window)] if window else []
    cfg = _prepare(source, tmp_path / "out", "--norm", "ct", *extra, "--label-map", f"{PANCREAS}=1", "--val", "1")
    stats = cfg["intensity_stats"][0]
    if window:
        assert (stats["low"], stats["high"]) == window
    hu, value = _hu_and_values(tmp_path / "out", source)
    for level in (-125, -50, 0, 40, 100, 275):  # the same HU gives the same value in every case (metal or not)
        at = value[hu == level]
        assert len(at) > 0 and np.ptp(at) < 1e-5, level
    expected = (np.clip(hu, stats["low"], stats["high"]) - stats["mean"]) / stats["std"]
    np.testing.assert_allclose(value, expected, atol=1e-5)
    # per-case min-max, which the ct norm replaces, gives one tissue a different value in the scan with metal
    assert cfg["class_names"] == ["background", f"structure{PANCREAS}"] and cfg["dataset"] == "prepared_3d"


def _lps_rotated_copy(path: Path, out: Path) -> Path:
    """The same scan stored LPS (x and y flipped) with its first two voxel axes swapped: other array, same world."""
    img = nib.load(path)
    data = np.asarray(img.dataobj)[::-1, ::-1].transpose(1, 0, 2)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(data.shape[1::-1][::-1]) - 1  # index i -> n - 1 - i on both flipped axes
    swap = np.eye(4)[[1, 0, 2, 3]]
    affine = img.affine @ np.array([[-1, 0, 0, data.shape[1] - 1], [0, -1, 0, data.shape[0] - 1], [0, 0, 1, 0],
                                    [0, 0, 0, 1]]) @ swap
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), out)
    return out


@needs_samples
def test_a_ct_prediction_keeps_the_shape_affine_and_zooms_of_each_input(tmp_path: Path):
    source = _nnunet_ct(tmp_path / "ct")
    _prepare(source, tmp_path / "out", "--norm", "ct", "--window", "-125", "275", "--label-map", f"{PANCREAS}=1",
             "--val", "1", "--spacing", "4.5", "--patch", "16", "32", "32")
    best = _train(tmp_path / "out" / "dust.yaml", tmp_path / "run")
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "ct.nii.gz").write_bytes(CT.read_bytes())
    _lps_rotated_copy(CT, scans / "ct_lps.nii.gz")
    assert main(["predict", "--checkpoint", str(best), "--input", str(scans), "--output", str(tmp_path / "pred"),
                 "--uncertainty"]) == 0
    for name in ("ct.nii.gz", "ct_lps.nii.gz"):
        scan, pred = nib.load(scans / name), nib.load(tmp_path / "pred" / name)
        unc = nib.load(tmp_path / "pred" / "uncertainty" / name)
        for out in (pred, unc):
            assert out.shape == scan.shape
            np.testing.assert_array_equal(out.affine, scan.affine)
            assert out.header.get_zooms() == scan.header.get_zooms()
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def _nnunet_brats(root: Path, cases: int = 3) -> Path:
    modalities = ["flair", "t1", "t1post", "t2"]
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    seg = nib.load(BRATS / "BraTS19_2013_10_1_seg.nii.gz")
    labels = np.clip(np.round(np.asarray(seg.dataobj)), 0, 4).astype(np.uint8)  # interpolated when downsampled
    labels[labels == 3] = 2  # BraTS has no 3
    for i in range(cases):
        for c, name in enumerate(modalities):
            img = nib.load(BRATS / f"BraTS19_2013_10_1_{name}.nii.gz")
            nib.save(img, root / "imagesTr" / f"brats{i}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(labels, seg.affine), root / "labelsTr" / f"brats{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": dict(enumerate(modalities)), "file_ending": ".nii.gz",
        "labels": {"background": 0, "necrosis": 1, "edema": 2, "enhancing": 4}}))
    return root


@needs_samples
def test_brats_four_channels_whole_tumour_train_two_iterations_and_predict(tmp_path: Path):
    source = _nnunet_brats(tmp_path / "brats")
    # region labels are refused without a map
    assert main(["prepare", "--source", str(source), "--out", str(tmp_path / "refused"), "--dims", "3"]) == 2
    cfg = _prepare(source, tmp_path / "out", "--norm", "zscore_nonzero", "--label-map", "1,2,4=1", "--val", "1",
                   "--labeled", "1")
    assert cfg["in_channels"] == 4 and cfg["num_classes"] == 2 and cfg["model"] == "vnet"
    assert cfg["class_names"] == ["background", "necrosis+edema+enhancing"]
    with h5py.File(tmp_path / "out" / "cases" / "brats1.h5") as f:
        assert set(np.unique(f["label"][()])) == {0, 1}
    # the generated config trains a semi-supervised 3D method with no other key
    best = _train(tmp_path / "out" / "dust.yaml", tmp_path / "run", "method=mean_teacher")
    assert main(["predict", "--checkpoint", str(best), "--input", str(source / "imagesTr"),
                 "--output", str(tmp_path / "pred")]) == 0
    pred = nib.load(tmp_path / "pred" / "brats0.nii.gz")
    assert pred.shape == (30, 30, 30)
    np.testing.assert_array_equal(pred.affine, nib.load(source / "imagesTr" / "brats0_0000.nii.gz").affine)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert main(["rank", "--checkpoints", *map(str, checkpoints), "--input", str(source / "imagesTr"),
                 "--out", str(tmp_path / "next.csv")]) == 0
    assert len((tmp_path / "next.csv").read_text().splitlines()) == 1 + 3
    # a case that lost one of its four channel files is refused, naming the file
    (source / "imagesTr" / "brats2_0002.nii.gz").unlink()
    assert main(["prepare", "--source", str(source), "--out", str(tmp_path / "again"), "--dims", "3",
                 "--label-map", "1,2,4=1"]) == 2


@needs_samples
def test_a_label_whose_affine_is_shifted_is_refused_naming_the_file(tmp_path: Path, capsys):
    source = _nnunet_ct(tmp_path / "ct")
    label = source / "labelsTr" / "ct2.nii.gz"
    img = nib.load(label)
    shifted = img.affine.copy()
    shifted[:3, 3] += 50.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), label)
    assert main(["prepare", "--source", str(source), "--out", str(tmp_path / "out"), "--dims", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert str(label) in err[-1] and "affine" in err[-1] and len(err) == 1
    assert not (tmp_path / "out").exists()


def test_a_patch_the_network_cannot_divide_is_refused_naming_the_key(la_phantom_root: Path, tmp_path: Path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "phantom3d" / "supervised.yaml"
    code = main(["train", "--config", str(config), "--set", f"data_dir={la_phantom_root}",
                 "--set", "generate_phantom=false", "--set", "patch_size=[20,64,64]",
                 "--set", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "patch_size [20, 64, 64]" in err and "multiple of 16" in err and "[16, 64, 64]" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()


def test_crops_read_from_disk_equal_crops_of_the_volume_in_memory(tmp_path: Path):
    gen = torch.Generator().manual_seed(0)
    for trial in range(12):
        shape = [int(s) for s in torch.randint(6, 30, (3,), generator=gen)]
        image = torch.randn(2, *shape, generator=gen)
        label = (torch.rand(*shape, generator=gen) > 0.8).to(torch.uint8)
        path = tmp_path / f"case{trial}.h5"
        with h5py.File(path, "w") as f:
            f["image"], f["label"] = image.numpy(), label.numpy()
        stored_image = StoredArray(path, "image", tuple(image.shape), np.float32)
        stored_label = StoredArray(path, "label", tuple(label.shape), np.uint8,
                                   foreground=torch.nonzero(label > 0).numpy())
        patch = tuple(int(p) for p in torch.randint(4, 24, (3,), generator=gen))
        margin = (1, 2, 2) if trial % 2 else None
        for draw in range(4):
            args = (patch, True, 0.0, "bilinear", (0.0, 0.5, 1.0)[trial % 3], margin)
            a = augment_crop(image, label, args[0], torch.Generator().manual_seed(draw), *args[1:])
            b = augment_crop(stored_image, stored_label, args[0], torch.Generator().manual_seed(draw), *args[1:])
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_resampling_keeps_classes_and_treats_thick_slices_apart():
    label = torch.zeros(10, 40, 40, dtype=torch.uint8)
    label[3:7, 10:30, 10:20], label[3:7, 10:30, 20:30] = 1, 3
    for size, separate in (((20, 20, 20), None), ((30, 80, 80), 0)):
        out = resample_label_to(label, size, separate)
        assert out.shape == size and set(out.unique().tolist()) == {0, 1, 3}  # 2 (their mean) never appears
    assert separate_axis((5.0, 0.8, 0.8)) == 0 and separate_axis((1.0, 0.8, 0.8)) is None
    x = torch.zeros(1, 1, 4, 8, 8)
    x[0, 0, 1] = 1.0  # one thick slice: resampled across slices with nearest, it stays one block, never blurred
    out = resample_to(x, (8, 16, 16), separate=0)
    assert set(out.unique().tolist()) == {0.0, 1.0}


def test_the_plan_follows_the_median_and_fits_the_network_and_budget():
    spacing = target_spacing([[5.0, 0.8, 0.8], [5.0, 0.7, 0.7], [2.5, 0.8, 0.8], [5.0, 0.8, 0.8]],
                             [[20, 320, 320]] * 4)
    assert spacing[1:] == [0.8, 0.8] and spacing[0] < 5.0  # anisotropic: the coarse axis at its 10th percentile
    patch = plan_patch([44, 72, 97], step=16, patch_voxels=32 * 64 * 64)
    assert all(p % 16 == 0 for p in patch) and np.prod(patch) <= 32 * 64 * 64


@pytest.fixture
def la_nifti_model(tmp_path: Path, la_phantom_root: Path) -> Path:
    config = Path(__file__).resolve().parents[1] / "configs" / "phantom3d" / "supervised.yaml"
    run = tmp_path / "la_run"
    args = ["train", "--config", str(config), "--set", f"data_dir={la_phantom_root}", "--set", f"run_dir={run}"]
    for item in ["iterations=4", "val_every=4", "threads=1", "channels=[4,8,16,32,64]", "progress=false",
                 "generate_phantom=false"]:  # the session's phantom, never rewritten with the config's own sizes
        args += ["--set", item]
    assert main(args) == 0
    return run / "checkpoints" / "best.pt"


def test_an_la_volume_gets_the_same_labels_from_nifti_and_from_h5(la_nifti_model: Path, la_phantom_root: Path,
                                                                   tmp_path: Path):
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "la" / "supervised.yaml").read_text())
    assert cfg["intensity_norm"] == "none"  # what the h5 volumes hold, so a NIfTI of one is fed the same
    case = sorted((la_phantom_root / "volumes").iterdir())[-1] / "mri_norm2.h5"  # the LA layout, as training reads it
    assert main(["export", "--input", str(case), "--output", str(tmp_path / "nifti_in")]) == 0
    nifti = [p for p in (tmp_path / "nifti_in").glob("*.nii.gz")]
    assert len(nifti) == 1
    for source, out in ((case, "pred_h5"), (nifti[0], "pred_nifti")):
        assert main(["predict", "--checkpoint", str(la_nifti_model), "--input", str(source),
                     "--output", str(tmp_path / out)]) == 0
    from_h5 = np.asarray(nib.load(next((tmp_path / "pred_h5").glob("*.nii.gz"))).dataobj)
    from_nifti = np.asarray(nib.load(next((tmp_path / "pred_nifti").glob("*.nii.gz"))).dataobj)
    np.testing.assert_array_equal(from_h5, from_nifti)


def test_check_data_and_train_agree_on_a_broken_prepared_case(la_phantom_root: Path, tmp_path: Path, capsys):
    """A phantom written as nnU-Net NIfTIs, prepared in 3D; one labelled case loses its label."""
    source = tmp_path / "src"
    (source / "imagesTr").mkdir(parents=True)
    (source / "labelsTr").mkdir()
    for case in sorted((la_phantom_root / "volumes").iterdir())[:6]:
        with h5py.File(case / "mri_norm2.h5") as f:
            image, label = np.asarray(f["image"]), np.asarray(f["label"])
        affine = np.diag([0.625, 0.625, 0.625, 1.0])
        nib.save(nib.Nifti1Image(image, affine), source / "imagesTr" / f"{case.name}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), source / "labelsTr" / f"{case.name}.nii.gz")
    (source / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                     "labels": {"background": 0, "LA": 1}}))
    cfg = _prepare(source, tmp_path / "out", "--val", "1", "--labeled", "2", "--patch", "16", "16", "16")
    assert main(["check-data", "--config", str(tmp_path / "out" / "dust.yaml")]) == 0
    first = (tmp_path / "out" / "train.list").read_text().split()[0]
    with h5py.File(tmp_path / "out" / "cases" / f"{first}.h5", "a") as f:
        del f["label"]
    capsys.readouterr()
    assert main(["check-data", "--config", str(tmp_path / "out" / "dust.yaml")]) == 2
    captured = capsys.readouterr()
    checked = captured.out + captured.err
    assert f"{first}.h5: no 'label' dataset" in checked
    assert main(["train", "--config", str(tmp_path / "out" / "dust.yaml"), "--set", f"run_dir={tmp_path / 'r'}"]) == 2
    assert f"{first}.h5: no 'label' dataset" in capsys.readouterr().err
    assert cfg["labeled_patients"] == 2


def test_a_new_scan_at_another_spacing_is_resampled_to_the_model_and_back(la_phantom_root: Path, tmp_path: Path):
    """Train on the phantom prepared at 1.25 mm; a scan stored at 0.625 mm is predicted on its own grid."""
    source = tmp_path / "src"
    (source / "imagesTr").mkdir(parents=True)
    (source / "labelsTr").mkdir()
    cases = sorted((la_phantom_root / "volumes").iterdir())[:5]
    affine = np.diag([0.625, 0.625, 0.625, 1.0])
    for case in cases:
        with h5py.File(case / "mri_norm2.h5") as f:
            nib.save(nib.Nifti1Image(np.asarray(f["image"]), affine), source / "imagesTr" / f"{case.name}_0000.nii.gz")
            nib.save(nib.Nifti1Image(np.asarray(f["label"]), affine), source / "labelsTr" / f"{case.name}.nii.gz")
    (source / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                     "labels": {"background": 0, "LA": 1}}))
    cfg = _prepare(source, tmp_path / "out", "--val", "1", "--spacing", "1.25", "--patch", "16", "16", "16")
    assert cfg["target_spacing"] == [1.25, 1.25, 1.25]
    with h5py.File(tmp_path / "out" / "cases" / f"{cases[0].name}.h5") as f:
        stored = f["image"].shape[1:]
    x, y, z = nib.load(source / "imagesTr" / f"{cases[0].name}_0000.nii.gz").shape
    assert stored == (z // 2, y // 2, x // 2)  # (S, H, W) = (Z, Y, X) at half the voxels
    best = _train(tmp_path / "out" / "dust.yaml", tmp_path / "run")
    scan = source / "imagesTr" / f"{cases[-1].name}_0000.nii.gz"
    assert main(["predict", "--checkpoint", str(best), "--input", str(scan), "--output", str(tmp_path / "p")]) == 0
    assert nib.load(tmp_path / "p" / f"{cases[-1].name}_0000.nii.gz").shape == nib.load(scan).shape


def test_dust_data_points_at_the_samples():
    assert os.environ.get("DUST_DATA") is None or SAMPLES.parent == Path(os.environ["DUST_DATA"])


def test_thick_slices_come_back_to_their_own_slice_after_a_round_trip():
    """A case at 3.6 mm resampled to a 3 mm model and its probabilities back: every slice returns to itself."""
    for slices, model_slices in ((20, 24), (10, 25), (10, 13)):
        x = torch.arange(float(slices)).view(1, 1, slices, 1, 1).expand(1, 1, slices, 6, 6).contiguous()
        there = resample_to(x, (model_slices, 12, 12), separate=0)
        assert torch.equal(resample_to(there, (slices, 6, 6), separate=0), x), (slices, model_slices)


@needs_samples
def test_a_reversed_window_and_broken_ct_statistics_are_refused(tmp_path: Path, capsys):
    source = _nnunet_ct(tmp_path / "ct")
    assert main(["prepare", "--source", str(source), "--out", str(tmp_path / "out"), "--dims", "3", "--norm", "ct",
                 "--window", "275", "-125", "--label-map", f"{PANCREAS}=1", "--val", "1"]) == 2
    assert "--window [275.0, -125.0]" in capsys.readouterr().err
    cfg = _prepare(source, tmp_path / "out", "--norm", "ct", "--label-map", f"{PANCREAS}=1", "--val", "1")
    stats = cfg["intensity_stats"][0]
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({**cfg, "intensity_stats": [{"low": stats["low"], "high": stats["high"]}]}))
    assert main(["check-data", "--config", str(broken)]) == 2
    assert "intensity_stats entry" in capsys.readouterr().err
