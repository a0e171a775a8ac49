"""Bring your own data: NIfTI datasets (nnU-Net v2, Medical Segmentation Decathlon, raw ACDC) -> `dust prepare`
-> training -> `dust predict` / `dust rank` / `dust evaluate --pred --ref`, on small synthetic NIfTI files with a
rotated affine and anisotropic voxels (nothing is downloaded)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import yaml

from dust.cli.main import main
from dust.data.nifti import from_stored, to_stored
from dust.data.phantom import phantom_volume
from dust.data.ssl4mis import read_list
from tests.conftest import ACDC_DIR

SPACING = (0.75, 0.9, 3.5)  # anisotropic: slices are 3.5 mm apart
TINY_TRAIN = ["patch_size=[32,32]", "channels=[4,8,16,32,64]", "batch_size=4", "unlabeled_batch_size=4",
              "threads=1", "tensorboard=false", "progress=false", "log_every=3"]


def _affine(spacing=SPACING, angle=0.5) -> np.ndarray:
    """Rotated about the scanner's z axis and shifted: a non-identity affine a wrong writer would not keep."""
    c, s = math.cos(angle), math.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(spacing)
    affine[:3, 3] = [12.5, -40.25, 7.0]
    return affine


def _save(data: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, _affine() if affine is None else affine)
    img.header["descrip"] = b"dust test case"
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def _case(seed: int, slices: int = 5, size=(40, 36), classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A phantom volume in NIfTI voxel order (X, Y, Z): intensities like a scanner's, labels 0..classes-1."""
    image, label = phantom_volume(np.random.default_rng(seed), slices, size)
    label = np.minimum(label, classes - 1)
    return from_stored(image * 900 + 40, 2).astype(np.float32), from_stored(label, 2).astype(np.uint8)


def _nnunet(root: Path, n_labelled: int = 5, n_test: int = 2, bad_label_case: int | None = None) -> Path:
    labels = {"background": 0, "RV": 1, "Myo": 2, "LV": 3}
    (root).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "cine"}, "labels": labels,
                                                   "numTraining": n_labelled, "file_ending": ".nii.gz"}))
    for i in range(n_labelled + n_test):
        image, label = _case(i)
        if i < n_labelled:
            if i == bad_label_case:
                label[0, 0, 0] = 7
            _save(image, root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
            _save(label, root / "labelsTr" / f"case_{i:03d}.nii.gz")
        else:
            _save(image, root / "imagesTs" / f"case_{i:03d}_0000.nii.gz")
    return root


def _msd(root: Path, n_labelled: int = 5, n_test: int = 2) -> Path:
    """Task05-like: 4D images (X, Y, Z, modality) with T2 and ADC, labels 0 background, 1 PZ, 2 TZ."""
    training, test = [], []
    for i in range(n_labelled + n_test):
        t2, label = _case(i, classes=3)
        adc = 3000.0 - 2.0 * t2 + np.random.default_rng(100 + i).normal(0, 20, t2.shape)
        name = f"prostate_{i:02d}.nii.gz"
        folder = "imagesTr" if i < n_labelled else "imagesTs"
        _save(np.stack([t2, adc], -1).astype(np.float32), root / folder / name)
        if i < n_labelled:
            _save(label, root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    (root / "imagesTs" / "._prostate_05.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Prostate", "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"}, "numTraining": n_labelled,
        "training": training, "test": test}))
    return root


def _train(config: Path, run: Path, *extra: str) -> Path:
    sets = [*TINY_TRAIN, f"run_dir={run}", *extra]
    assert main(["train", "--config", str(config), *[a for kv in sets for a in ("--set", kv)]]) == 0
    return run / "checkpoints" / "best.pt"


def _h5(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {**{k: f[k][()] for k in f}, "attrs": dict(f.attrs)}


# ---------------------------------------------------------------------------------------------------------------
def test_nnunet_prepare_train_predict_keeps_the_input_grid(tmp_path: Path, capsys, monkeypatch):
    source = _nnunet(tmp_path / "Dataset001_Heart")
    prepared = tmp_path / "prepared"
    assert main(["prepare", "--source", str(source), "--out", str(prepared), "--val", "1", "--labeled", "2"]) == 0
    keys = yaml.safe_load((prepared / "dust.yaml").read_text())
    assert keys["labeled_patients"] == 2 and keys["in_channels"] == 1 and keys["num_classes"] == 4
    splits = json.loads((prepared / "splits.json").read_text())
    assert len(splits["val"]) == 1 and len(splits["labeled"]) == 2
    assert {"case_005", "case_006"} <= set(splits["unlabeled"])  # imagesTs joins the unlabelled pool
    val_case = splits["val"][0]
    volume = _h5(prepared / "data" / f"{val_case}.h5")
    assert nib.load(str(source / "labelsTr" / f"{val_case}.nii.gz")).shape == (36, 40, 5)
    assert volume["image"].shape == (5, 40, 36)  # (Z, Y, X) of an (X, Y, Z) file
    assert volume["attrs"]["spacing"].tolist() == pytest.approx([3.5, 0.9, 0.75])

    best = _train(prepared / "dust.yaml", tmp_path / "run", "iterations=6", "val_every=6")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(best), "--input", str(source / "imagesTs"), "--output", str(out),
                 "--uncertainty"]) == 0
    for case in ("case_005", "case_006"):
        image = nib.load(str(source / "imagesTs" / f"{case}_0000.nii.gz"))
        pred, unc = nib.load(str(out / f"{case}.nii.gz")), nib.load(str(out / "uncertainty" / f"{case}.nii.gz"))
        assert pred.shape == unc.shape == image.shape
        assert np.array_equal(pred.affine, image.affine) and np.array_equal(unc.affine, image.affine)
        assert pred.header.get_zooms() == image.header.get_zooms()
        assert pred.header["descrip"] == image.header["descrip"]  # the input's header is kept
        assert pred.get_data_dtype() == np.uint8 and set(np.unique(pred.dataobj)) <= {0, 1, 2, 3}
        entropy = np.asarray(unc.dataobj)
        assert unc.get_data_dtype() == np.float32 and entropy.min() >= 0 and entropy.max() <= math.log(4) + 1e-5

    # The same case from its NIfTI and from the prepared h5 volume: the same labels on the same grid, and
    # `dust evaluate --pred --ref` on the NIfTIs agrees with `dust evaluate` on the prepared volumes.
    single = tmp_path / "val_image"
    single.mkdir()
    shutil.copy(source / "imagesTr" / f"{val_case}_0000.nii.gz", single)
    assert main(["predict", "--checkpoint", str(best), "--input", str(single), "--output", str(tmp_path / "a")]) == 0
    assert main(["predict", "--checkpoint", str(best), "--input", str(prepared / "data" / f"{val_case}.h5"),
                 "--output", str(tmp_path / "b")]) == 0
    from_nifti, from_h5 = nib.load(str(tmp_path / "a" / f"{val_case}.nii.gz")), nib.load(
        str(tmp_path / "b" / f"{val_case}.nii.gz"))
    assert np.array_equal(np.asarray(from_nifti.dataobj), np.asarray(from_h5.dataobj))
    assert np.allclose(from_h5.affine, from_nifti.affine)
    assert main(["evaluate", "--checkpoint", str(best), "--split", "val", "--out", str(tmp_path / "h5_metrics")]) == 0
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(source / "labelsTr" / f"{val_case}.nii.gz", ref)
    assert main(["evaluate", "--pred", str(tmp_path / "a"), "--ref", str(ref),
                 "--class-names", "background", "RV", "Myo", "LV"]) == 0
    on_h5 = json.loads((tmp_path / "h5_metrics" / "metrics_val_best.json").read_text())
    on_nifti = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for name in ("RV", "Myo", "LV"):
        for metric in ("dice", "hd95_vox", "hd95_mm", "asd_mm"):
            assert on_nifti["per_class"][name][metric]["mean"] == pytest.approx(
                on_h5["per_class"][name][metric]["mean"], abs=1e-9), (name, metric)

    # A folder with one truncated scan: the others are predicted, the bad one is named, the exit is non-zero.
    mixed = tmp_path / "mixed"
    shutil.copytree(source / "imagesTs", mixed)
    bad = mixed / "case_006_0000.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(best), "--input", str(mixed), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 case(s) could not be predicted" in err and str(bad) in err
    assert (tmp_path / "m" / "case_005.nii.gz").is_file() and not (tmp_path / "m" / "case_006.nii.gz").exists()

    # Ctrl-C mid-write of the label (after the bytes, before they reach the disk): one line, exit 130, and nothing
    # is left under a final name (nor a temp file), only the folder's record of what predict may write there.
    from dust import storage

    real_fsync, synced = storage.os.fsync, []

    def interrupted_while_writing_the_label(fd):
        synced.append(fd)
        if len(synced) == 2:  # the first write is the output record, the second the label
            raise KeyboardInterrupt
        return real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", interrupted_while_writing_the_label)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(best), "--input", str(single), "--output", str(tmp_path / "k")]) == 130
    assert capsys.readouterr().err.strip() == "dust predict: interrupted"
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["dust_predictions.json"]



def test_msd_two_modalities_train_dust_predict_uncertainty_and_rank(tmp_path: Path):
    source = _msd(tmp_path / "Task05_Prostate")
    both = tmp_path / "t2_adc"
    assert main(["prepare", "--source", str(source), "--out", str(both), "--modalities", "T2", "ADC",
                 "--norm", "zscore", "--val", "1", "--labeled", "2"]) == 0
    keys = yaml.safe_load((both / "dust.yaml").read_text())
    assert keys["in_channels"] == 2 and keys["class_names"] == ["background", "PZ", "TZ"]
    assert keys["intensity_norm"] == "zscore" and keys["modalities"] is None
    first_slice = read_list(both / "train_slices.list")[0]
    assert _h5(both / "data" / f"{first_slice}.h5")["image"].shape == (2, 40, 36)
    val = _h5(both / "data" / f"{read_list(both / 'val.list')[0]}.h5")["image"]
    assert val.shape == (2, 5, 40, 36)
    assert np.allclose(val.mean(axis=(1, 2, 3)), 0, atol=1e-5) and np.allclose(val.std(axis=(1, 2, 3)), 1, atol=1e-4)

    t2_only = tmp_path / "t2"
    assert main(["prepare", "--source", str(source), "--out", str(t2_only), "--modalities", "T2", "--val", "1"]) == 0
    assert yaml.safe_load((t2_only / "dust.yaml").read_text())["modalities"] == [0]
    assert _h5(t2_only / "data" / f"{first_slice}.h5")["image"].shape == (40, 36)

    run = tmp_path / "dust_run"
    best = _train(both / "dust.yaml", run, "method=dust", "iterations=9", "val_every=9")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(best), "--input", str(source / "imagesTs"), "--output", str(out),
                 "--uncertainty"]) == 0
    image = nib.load(str(source / "imagesTs" / "prostate_05.nii.gz"))
    pred = nib.load(str(out / "prostate_05.nii.gz"))
    kl = np.asarray(nib.load(str(out / "uncertainty" / "prostate_05.nii.gz")).dataobj)
    assert pred.shape == kl.shape == image.shape[:3] and np.array_equal(pred.affine, image.affine)
    assert kl.min() >= 0 and kl.max() > 0  # the two decoders disagree somewhere after a few steps

    ranking = tmp_path / "ranking.csv"
    snapshots = [str(run / "checkpoints" / f"pretrain_k{k}.pt") for k in (1, 2, 3)]
    assert main(["rank", "--checkpoints", *snapshots, "--input", str(source / "imagesTs"), "--out", str(ranking)]) == 0
    rows = list(csv.DictReader(ranking.open()))
    assert sorted(r["case"] for r in rows) == ["prostate_05", "prostate_06"]
    values = [float(r["uncertainty"]) for r in rows]
    assert values == sorted(values, reverse=True) and values[0] > 0 and [r["rank"] for r in rows] == ["1", "2"]

    # the training config must read the data the way it was prepared (else predict would normalise differently)
    assert main(["train", "--config", str(both / "dust.yaml"), "--set", "intensity_norm=minmax",
                 "--set", f"run_dir={tmp_path / 'bad'}"]) == 2


def _acdc_raw(root: Path) -> dict[str, np.ndarray]:
    """The ACDC download: patientXXX/patientXXX_frameYY.nii.gz (+ _gt), int16, plus files prepare must skip."""
    arrays = {}
    for p, frames in ((1, (1, 12)), (2, (1, 11)), (3, (1, 14))):
        patient = f"patient{p:03d}"
        folder = root / "training" / patient
        for f in frames:
            image, label = _case(10 * p + f, slices=4, size=(30, 26))
            data = np.round(image * 1.7 - 300).astype(np.int16)  # negative and positive values
            case = f"{patient}_frame{f:02d}"
            _save(data, folder / f"{case}.nii.gz", _affine((1.4, 1.4, 10.0)))
            _save(label, folder / f"{case}_gt.nii.gz", _affine((1.4, 1.4, 10.0)))
            arrays[case] = data
        _save(np.zeros((30, 26, 4, 3), np.int16), folder / f"{patient}_4d.nii.gz")
        (folder / "Info.cfg").write_text("ED: 1\nES: 12\n")
    return arrays


def test_raw_acdc_layout_matches_the_ssl4mis_preprocessing(tmp_path: Path):
    arrays = _acdc_raw(tmp_path / "ACDC")
    out = tmp_path / "prepared"
    assert main(["prepare", "--source", str(tmp_path / "ACDC"), "--out", str(out), "--val", "1", "--seed", "3"]) == 0
    assert yaml.safe_load((out / "dust.yaml").read_text())["class_names"] == ["background", "RV", "Myo", "LV"]
    splits = json.loads((out / "splits.json").read_text())
    split_of = {case: split for split, cases in splits.items() if split != "seed" for case in cases}
    assert len(split_of) == 6  # the 4d files are not cases
    for case, data in arrays.items():
        # SSL4MIS: sitk.GetArrayFromImage -> (Z, Y, X), then (x - min) / (max - min) per volume
        sitk_order = data.transpose(2, 1, 0)
        expected = ((sitk_order - sitk_order.min()) / (sitk_order.max() - sitk_order.min())).astype(np.float32)
        if split_of[case] == "val":
            assert np.array_equal(_h5(out / "data" / f"{case}.h5")["image"], expected)
        else:
            for n in range(expected.shape[0]):  # slices numbered from 1, as in SSL4MIS's ACDC files
                assert np.array_equal(_h5(out / "data" / f"{case}_slice_{n + 1}.h5")["image"], expected[n])
    frames = {c[:10]: {s for c2, s in split_of.items() if c2[:10] == c[:10]} for c in split_of}
    assert all(len(s) == 1 for s in frames.values())  # both frames of a patient in one split


def test_splits_are_seeded_and_an_edited_split_file_is_used(tmp_path: Path):
    source = _nnunet(tmp_path / "src", n_labelled=6, n_test=0)
    for name in ("scan_a", "scan_b"):  # a folder of unlabelled images for the pool
        _save(_case(50 + len(name))[0], tmp_path / "unlabelled" / f"{name}.nii.gz")
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main(["prepare", "--source", str(source), "--out", str(out), "--val", "2", "--seed", "7",
                     "--unlabeled", str(tmp_path / "unlabelled")]) == 0
    assert (a / "splits.json").read_text() == (b / "splits.json").read_text()
    splits = json.loads((a / "splits.json").read_text())
    assert {"scan_a", "scan_b"} <= set(splits["unlabeled"]) and len(splits["val"]) == 2
    assert "label" not in _h5(a / "data" / "scan_a_slice_1.h5")
    splits["unlabeled"], splits["labeled"] = splits["labeled"][1:], splits["labeled"][:1]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(splits))
    assert main(["prepare", "--source", str(source), "--out", str(a), "--splits", str(edited)]) == 0
    assert read_list(a / "train_slices.list")[0] == f"{splits['labeled'][0]}_slice_1"
    assert yaml.safe_load((a / "dust.yaml").read_text())["labeled_patients"] == 1
    splits["val"].append(splits["labeled"][0])
    edited.write_text(json.dumps(splits))
    assert main(["prepare", "--source", str(source), "--out", str(a), "--splits", str(edited)]) == 2


def test_bad_input_is_refused_with_one_line_naming_the_file(tmp_path: Path, capsys):
    def refused(source: Path, name: str, words: str) -> None:
        out = tmp_path / f"out_{source.name}"
        assert main(["prepare", "--source", str(source), "--out", str(out), "--val", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err and words in err, err
        assert not out.exists()  # nothing half-written

    refused(_nnunet(tmp_path / "labels", bad_label_case=1), "labelsTr/case_001.nii.gz", "[7] are outside")
    shape = _nnunet(tmp_path / "shape")
    _save(np.zeros((40, 36, 4), np.uint8), shape / "labelsTr" / "case_002.nii.gz")
    refused(shape, "labelsTr/case_002.nii.gz", "does not match the image shape")
    missing = _nnunet(tmp_path / "missing")
    (missing / "imagesTr" / "case_003_0000.nii.gz").unlink()
    refused(missing, "imagesTr/case_003_0000.nii.gz", "file not found")
    no_label = _nnunet(tmp_path / "nolabel")
    (no_label / "labelsTr" / "case_004.nii.gz").unlink()
    refused(no_label, "labelsTr/case_004.nii.gz", "file not found")


def test_evaluate_folders_reports_mm_with_the_header_spacing(tmp_path: Path, capsys):
    spacing = (0.5, 0.7, 3.0)
    ref, pred = np.zeros((12, 10, 6), np.uint8), np.zeros((12, 10, 6), np.uint8)
    ref[2:8, 2:8, 2], pred[2:8, 2:8, 3] = 1, 1  # class 1: a plane one slice (3 mm) off
    ref[9:11, 1:9, 1:5] = pred[9:11, 1:9, 1:5] = 2  # class 2: exact
    _save(ref, tmp_path / "ref" / "case_a.nii.gz", _affine(spacing))
    _save(pred, tmp_path / "pred" / "case_a.nii.gz", _affine(spacing))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "--out", str(tmp_path / "metrics")]) == 0
    summary = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    one, two = summary["per_class"]["1"], summary["per_class"]["2"]
    assert one["hd95_vox"]["mean"] == pytest.approx(1.0) and one["hd95_mm"]["mean"] == pytest.approx(3.0)
    assert one["asd_mm"]["mean"] == pytest.approx(3.0) and one["dice"]["mean"] == 0.0
    assert two["dice"]["mean"] == 1.0 and two["hd95_mm"]["mean"] == 0.0
    rows = list(csv.DictReader((tmp_path / "metrics" / "metrics.csv").open()))
    assert [(r["case"], r["class"]) for r in rows] == [("case_a", "1"), ("case_a", "2")]

    _save(ref, tmp_path / "ref" / "case_b.nii.gz", _affine(spacing))
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]) == 2
    assert "pred/case_b.nii.gz: file not found" in capsys.readouterr().err


def test_stored_order_round_trips_for_every_slice_axis():
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for axis in (0, 1, 2):
        stored = to_stored(volume, axis)
        assert stored.shape[0] == volume.shape[axis]
        assert np.array_equal(from_stored(stored, axis), volume)
    assert to_stored(volume, 2).shape == (4, 3, 2)  # SimpleITK's (Z, Y, X)


@pytest.mark.slow
@pytest.mark.skipif(not ACDC_DIR.is_dir(), reason="ACDC not found under $DUST_DATA")
def test_acdc_volume_as_nifti_gives_the_same_dice_as_the_h5_path(tmp_path: Path, capsys):
    """One ACDC validation volume exported to NIfTI, predicted with `dust predict` and scored with
    `dust evaluate --pred --ref`, equals `dust evaluate` on the h5 volume (tiny model, a few iterations)."""
    val_case = read_list(ACDC_DIR / "val.list")[0]
    train_slices = [n for n in read_list(ACDC_DIR / "train_slices.list")][:40]  # the first two patients
    root = tmp_path / "acdc_subset"
    (root / "data").mkdir(parents=True)
    for name in [*train_slices, val_case]:
        (root / "data" / f"{name}.h5").symlink_to(ACDC_DIR / "data" / f"{name}.h5")
    (root / "train_slices.list").write_text("\n".join(train_slices) + "\n")
    (root / "val.list").write_text(val_case + "\n")
    config = tmp_path / "acdc.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(root), "labeled_patients": 1}))
    # long enough to label some foreground (two empty predictions would agree whatever the paths did); the deconv
    # decoder gets there within this budget, the bilinear default not always. fp32 on every CPU: with `bf16: auto`
    # a CPU with native bf16 trains in bf16, and this tiny run then still predicted background only (2026-12-01)
    best = _train(config, tmp_path / "run", "iterations=300", "val_every=300", "lr=0.05", "patch_size=[64,64]",
                  "upsample=deconv", "bf16=false")
    assert main(["evaluate", "--checkpoint", str(best), "--split", "val", "--out", str(tmp_path / "h5")]) == 0

    volume = _h5(ACDC_DIR / "data" / f"{val_case}.h5")
    affine = _affine((1.5625, 1.5625, 10.0))
    _save(from_stored(volume["image"], 2), tmp_path / "images" / f"{val_case}.nii.gz", affine)
    _save(from_stored(volume["label"], 2), tmp_path / "labels" / f"{val_case}.nii.gz", affine)
    assert main(["predict", "--checkpoint", str(best), "--input", str(tmp_path / "images"),
                 "--output", str(tmp_path / "pred")]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "labels"),
                 "--class-names", "background", "RV", "Myo", "LV"]) == 0
    on_h5 = json.loads((tmp_path / "h5" / "metrics_val_best.json").read_text())
    on_nifti = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert 0 < on_nifti["overall"]["dice"]["mean"] < 1
    for name in ("RV", "Myo", "LV"):
        assert on_nifti["per_class"][name]["dice"]["mean"] == on_h5["per_class"][name]["dice"]["mean"], name
        assert on_nifti["per_class"][name]["hd95_vox"]["mean"] == pytest.approx(
            on_h5["per_class"][name]["hd95_vox"]["mean"])


@pytest.mark.slow
@pytest.mark.skipif(not ACDC_DIR.is_dir(), reason="ACDC not found under $DUST_DATA")
def test_raw_acdc_layout_prepares_back_to_the_shared_h5_files(tmp_path: Path):
    """Two validation patients written out as the ACDC download (NIfTI (X, Y, Z), scanner-like intensities) and
    prepared again give the shared SSL4MIS arrays: same (Z, Y, X) shapes, values, labels and slice names."""
    cases = read_list(ACDC_DIR / "val.list")[:4]  # two patients, both frames
    for case in cases:
        volume = _h5(ACDC_DIR / "data" / f"{case}.h5")
        folder = tmp_path / "ACDC" / "training" / case[:10]
        _save(from_stored(volume["image"] * 1000 + 12, 2).astype(np.float32), folder / f"{case}.nii.gz")
        _save(from_stored(volume["label"], 2), folder / f"{case}_gt.nii.gz")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"labeled": cases[2:], "val": cases[:2]}))
    out = tmp_path / "prepared"
    assert main(["prepare", "--source", str(tmp_path / "ACDC"), "--out", str(out), "--splits", str(splits)]) == 0
    for case in cases:
        shared = _h5(ACDC_DIR / "data" / f"{case}.h5")
        if case in cases[:2]:
            ours = _h5(out / "data" / f"{case}.h5")
        else:
            names = [n for n in read_list(out / "train_slices.list") if n.startswith(case)]
            assert names == [f"{case}_slice_{n}" for n in range(1, len(shared["image"]) + 1)]
            slices = [_h5(out / "data" / f"{n}.h5") for n in names]
            ours = {"image": np.stack([s["image"] for s in slices]), "label": np.stack([s["label"] for s in slices])}
        assert ours["image"].shape == shared["image"].shape
        assert np.allclose(ours["image"], shared["image"], atol=1e-6)
        assert np.array_equal(ours["label"], shared["label"])


def test_files_of_an_input_folder_that_are_not_images_are_named_once_when_skipped(tmp_path: Path, caplog):
    from dust.data.nifti import find_input_cases

    folder = tmp_path / "scans"
    _save(np.zeros((8, 8, 3), np.float32), folder / "case_a.nii.gz")
    (folder / "notes.txt").write_text("scanner protocol")
    (folder / "case_b.nii.bak").write_bytes(b"")
    (folder / ".DS_Store").write_bytes(b"")  # hidden files are not cases and not worth a word
    with caplog.at_level("WARNING", logger="dust"):
        cases = find_input_cases(folder)
    assert [c.case_id for c in cases] == ["case_a"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "skipped 2 file(s)" in warnings[0] and "case_b.nii.bak" in warnings[0] and "notes.txt" in warnings[0]
    assert ".DS_Store" not in warnings[0]
