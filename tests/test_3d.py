"""3D through the one engine: LA-layout volumes, VNet, crop sampling, sliding-window inference, every method."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from dust.cli.main import main as dust_main
from dust.config import ConfigError, load_config
from dust.data import load_split, load_training_data
from dust.data.la import case_path
from dust.data.sampler import TwoStreamSampler
from dust.data.transforms import augment_crop, resampled_shape, resize_image, resize_label
from dust.engine.trainer import Trainer
from dust.inference import Predictor
from dust.methods import available_methods
from dust.methods.loading import full_config
from dust.models import make_model
from dust.uncertainty import sample_uncertainty
from dust.workflows import train

REPO = Path(__file__).resolve().parents[1]
# staged methods need enough iterations for each of their stages (pre-training, stage 1, stage 2)
ITERATIONS = {"dust": 10, "st_ss": 10, "self_training": 10, "st_plus_plus": 10}


@pytest.mark.parametrize("method", available_methods())
def test_every_method_trains_on_the_3d_phantom_and_is_scored_on_whole_volumes(tiny_cfg_3d, method):
    trainer = Trainer(tiny_cfg_3d(method=method, iterations=ITERATIONS.get(method, 2),
                                  val_every=ITERATIONS.get(method, 2)))
    trainer.fit()
    assert trainer.iteration == trainer.cfg["iterations"]
    assert all(p.dim() == 5 for net in trainer.method.networks.values() for p in net.parameters() if p.dim() > 2)
    assert len(trainer.history) >= 1 and 0.0 <= trainer.history[-1]["dice"] <= 1.0


@pytest.mark.parametrize("method", ["supervised", "mean_teacher", "cps", "dtc", "mc_net", "mcf"])
def test_the_supervised_loss_falls_in_3d(tiny_cfg_3d, method):
    torch.manual_seed(0)
    trainer = Trainer(tiny_cfg_3d(method=method, iterations=30, val_every=30, lr=0.05, augment_rot_flip=False))
    trainer.fit()
    losses = [r["loss_sup"] if "loss_sup" in r else r["loss"] for r in trainer.train_log]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_vnet_is_yu_et_al_s_network_and_a_2d_patch_gives_2d_layers():
    cfg = full_config({"model": "vnet", "patch_size": [80, 112, 112], "num_classes": 2,
                       "class_names": ["bg", "LA"], "channels": [16, 32, 64, 128, 256], "upsample": "deconv"})
    net = make_model(cfg)
    # UA-MT / MC-Net's VNet with 16 base filters and a transposed-conv decoder: 9.45 M parameters
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(9.45e6, rel=0.005)
    assert net(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 2, 16, 32, 32)
    dual = make_model(cfg, "dual_vnet").eval()
    main, aux = dual(torch.zeros(1, 1, 16, 16, 16))
    assert main.shape == aux.shape == (1, 2, 16, 16, 16) and dual.paired_decoders
    flat = make_model({**cfg, "patch_size": [32, 32]}, "vnet")
    assert flat(torch.zeros(2, 1, 32, 32)).shape == (2, 2, 32, 32)
    with pytest.raises(ConfigError, match="patch_size has 3 numbers"):
        make_model(cfg, "unet2d")


def test_sliding_window_equals_one_forward_when_the_volume_is_the_patch():
    torch.manual_seed(0)
    net = make_model(full_config({"model": "vnet", "patch_size": [16, 16, 16], "num_classes": 2,
                                  "class_names": ["bg", "LA"], "channels": [4, 8, 16, 32, 64]})).eval()
    image = torch.randn(1, 16, 16, 16)
    predictor = Predictor((16, 16, 16), torch.device("cpu"), spatial_policy="crop")
    (probs,) = predictor.case(lambda x: (net(x),), image)
    with torch.no_grad():
        expected = torch.softmax(net(image[None]), 1)[0]
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)


def test_sliding_window_covers_a_larger_volume_with_the_papers_stride():
    # a "network" that returns its input as the logit of class 1: blended windows must give back the input
    def heads(x: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.cat([torch.zeros_like(x), x], 1),)

    image = torch.randn(1, 21, 37, 30)
    for predictor in (Predictor((8, 16, 16), torch.device("cpu"), spatial_policy="crop", stride=(4, 6, 6),
                                blend="constant"),
                      Predictor((8, 16, 16), torch.device("cpu"), spatial_policy="crop")):
        (probs,) = predictor.case(heads, image)
        assert probs.shape == (2, 21, 37, 30)
        torch.testing.assert_close(probs[1], torch.sigmoid(image[0]), atol=1e-5, rtol=1e-4)
    assert Predictor((80, 112, 112), torch.device("cpu"), stride=(4, 18, 18)).window_overlap() == pytest.approx(
        (1 - 4.5 / 80, 1 - 18.5 / 112, 1 - 18.5 / 112))


def test_crop_augmentation_keeps_image_and_label_aligned_in_3d():
    gen = torch.Generator().manual_seed(0)
    # a volume whose label is a function of the image: any misalignment between the two breaks it
    image = torch.randn(1, 12, 30, 26)
    label = (image[0] > 0.3).to(torch.uint8)
    for _ in range(20):
        x, y = augment_crop(image, label, (8, 16, 16), gen, rot_flip=True, rotate_deg=0.0)
        assert x.shape == (1, 8, 16, 16) and y.shape == (8, 16, 16)
        assert torch.equal(y, (x[0] > 0.3).to(torch.uint8))
    # smaller than the patch: padded, and the padding is background
    x, y = augment_crop(image[:, :4], label[:4], (8, 16, 16), gen, rot_flip=False, rotate_deg=0.0)
    assert x.shape == (1, 8, 16, 16) and int(y.sum()) == int(((x[0] > 0.3) & (x[0] != 0)).sum())


def test_sampler_crops_3d_items_and_oversamples_foreground(tiny_cfg_3d):
    cfg = tiny_cfg_3d(foreground_oversample=1.0)
    data = load_training_data(cfg, Path(cfg["data_dir"]))
    sampler = TwoStreamSampler.from_config(data.labeled, data.unlabeled, cfg, seed=0)
    batch = sampler.next(with_unlabeled=True)
    assert batch["labeled_image"].shape == (2, 1, 16, 16, 16) and batch["label"].shape == (2, 16, 16, 16)
    assert batch["unlabeled_image"].shape == (2, 1, 16, 16, 16)
    for _ in range(5):  # every labelled crop is centred on foreground, so holds some
        assert all(int(y.sum()) > 0 for y in sampler.next(with_unlabeled=False)["label"])


def test_resampling_round_trip_keeps_the_label_and_the_shape():
    label = torch.zeros(1, 20, 24, 16, dtype=torch.uint8)
    label[0, 4:16, 6:18, 4:12] = 1
    small = resampled_shape((20, 24, 16), 0.5)
    assert small == (10, 12, 8)
    back = resize_label(resize_label(label, small), (20, 24, 16))
    assert back.shape == label.shape and torch.equal(back, label)
    image = torch.rand(1, 1, 20, 24, 16)
    assert resize_image(resize_image(image, small), (20, 24, 16)).shape == image.shape


def test_la_reader_splits_resamples_and_reads_a_test_list(tiny_cfg_3d, la_phantom_root, tmp_path):
    cfg = tiny_cfg_3d(resample_factor=0.5)
    data = load_training_data(cfg, la_phantom_root)
    ids = (la_phantom_root / "train.list").read_text().split()
    assert data.labeled.ids == ids[:3] and data.unlabeled.ids == ids[3:8]
    assert [v.case_id for v in data.val] == ids[8:]
    with h5py.File(case_path(la_phantom_root, ids[0])) as f:
        x, y, z = f["image"].shape
    assert tuple(data.labeled.images[0].shape) == (1, z // 2, y // 2, x // 2)  # (S, H, W) = (Z, Y, X), halved
    assert data.val[0].image.shape[-3:] == (z, y, x)  # evaluation at the original resolution
    # a test.list beside train.list is what --split test reads
    root = tmp_path / "la"
    root.mkdir()
    (root / "volumes").symlink_to(la_phantom_root / "volumes")
    (root / "train.list").write_text("\n".join(ids[:8]) + "\n")
    (root / "test.list").write_text("\n".join(ids[8:]) + "\n")
    assert [v.case_id for v in load_split(cfg, root, "test")] == ids[8:]


def test_check_data_on_la_names_the_bad_file(la_phantom_root, tmp_path, capsys):
    root = tmp_path / "la"
    ids = (la_phantom_root / "train.list").read_text().split()
    for i in ids:
        (root / "volumes" / i).mkdir(parents=True)
        (root / "volumes" / i / "mri_norm2.h5").symlink_to(case_path(la_phantom_root, i))
    (root / "train.list").write_text("\n".join(ids) + "\n")
    config = tmp_path / "la.yaml"
    config.write_text(f"dataset: la_h5\ndata_dir: {root}\nnum_classes: 2\nclass_names: [bg, LA]\n"
                      "patch_size: [16, 16, 16]\nmodel: vnet\nspatial_policy: crop\nlabeled_patients: 3\n"
                      "holdout_cases: 2\n")
    assert dust_main(["check-data", "--config", str(config)]) == 0
    bad = root / "volumes" / ids[1] / "mri_norm2.h5"
    bad.unlink()
    with h5py.File(bad, "w") as f:  # label values outside {0, 1}
        f["image"] = np.zeros((24, 20, 16), np.float32)
        f["label"] = np.full((24, 20, 16), 3, np.uint8)
    assert dust_main(["check-data", "--config", str(config)]) != 0
    out = capsys.readouterr()
    assert str(bad) in out.out + out.err
    bad.unlink()
    bad.write_bytes(b"not an h5 file")
    assert dust_main(["check-data", "--config", str(config)]) != 0
    out = capsys.readouterr()
    assert str(bad) in out.out + out.err
    (root / "volumes" / ids[2] / "mri_norm2.h5").unlink()  # a case listed but missing
    assert dust_main(["check-data", "--config", str(config)]) != 0
    assert ids[2] in (lambda o: o.out + o.err)(capsys.readouterr())


def test_predict_on_a_3d_nifti_writes_label_and_uncertainty_with_its_affine(tiny_cfg_3d, la_phantom_root, tmp_path):
    cfg = tiny_cfg_3d(method="dust", iterations=10, val_every=10)
    Trainer(cfg).fit()
    ids = (la_phantom_root / "train.list").read_text().split()
    with h5py.File(case_path(la_phantom_root, ids[0])) as f:
        image = f["image"][:]
    affine = np.array([[0.0, 0.0, 1.5, -20.0], [0.7, 0.0, 0.0, 10.0], [0.0, -0.7, 0.0, 5.0], [0, 0, 0, 1]])
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(image, affine), inputs / "case_a.nii.gz")
    out = tmp_path / "out"
    checkpoint = Path(cfg["run_dir"]) / "checkpoints" / "best.pt"
    assert dust_main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out),
                      "--uncertainty"]) == 0
    label = nib.load(out / "case_a.nii.gz")
    assert label.shape == image.shape and np.allclose(label.affine, affine)
    assert set(np.unique(np.asanyarray(label.dataobj))) <= {0, 1}
    kl = nib.load(out / "uncertainty" / "case_a.nii.gz")
    assert kl.shape == image.shape and np.allclose(kl.affine, affine)
    values = np.asanyarray(kl.dataobj)
    assert values.dtype.kind == "f" and values.min() >= 0


def test_report_renders_a_3d_run(tiny_cfg_3d):
    cfg = tiny_cfg_3d(method="mean_teacher", iterations=2, val_every=2)
    Trainer(cfg).fit()
    run_dir = Path(cfg["run_dir"])
    assert dust_main(["report", str(run_dir)]) == 0
    html = (run_dir / "report.html").read_text()
    assert "<img" in html and "LA" in html


def test_la_configs_resolve_and_the_full_protocol_extends_the_cpu_one():
    cpu = full_config(load_config(REPO / "configs/la/cps.yaml"))
    assert (cpu["method"], cpu["model"], cpu["patch_size"], cpu["resample_factor"]) == ("cps", "vnet", [32, 64, 64],
                                                                                        0.5)
    full = full_config(load_config(REPO / "configs/la_full/cps.yaml"))
    assert (full["method"], full["patch_size"], full["resample_factor"], full["iterations"]) == (
        "cps", [80, 112, 112], 1.0, 6000)
    assert full["inference_stride"] == [4, 18, 18] and full["dataset"] == cpu["dataset"] == "la_h5"
    for path in sorted((REPO / "configs/la").glob("*.yaml")) + sorted((REPO / "configs/la_full").glob("*.yaml")):
        full_config(load_config(path))


def test_the_full_protocol_runs_a_couple_of_iterations_on_the_phantom(la_phantom_root, tmp_path):
    # the GPU protocol's settings (no resampling, the papers' stride, constant blending) at a phantom-sized patch
    cfg = full_config(load_config(REPO / "configs/la_full/mean_teacher.yaml", [
        f"data_dir={la_phantom_root}", "patch_size=[16,16,16]", "inference_stride=[4,6,6]", "iterations=2",
        "val_every=2", "labeled_patients=3", "holdout_cases=2", "channels=[4,8,16,32,64]", "threads=1",
        "tensorboard=false", "progress=false", f"run_dir={tmp_path / 'run'}"]))
    records = train(cfg)
    assert {r["checkpoint"] for r in records} == {"last", "best"} and records[0]["resize"] == "crop"
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == records


LA_DIR = Path(os.environ.get("DUST_DATA", REPO.parent / "shared" / "data")) / "LA"


@pytest.mark.slow
@pytest.mark.skipif(not (LA_DIR / "train.list").is_file(), reason="the LA data is not here")
def test_the_la_cpu_protocol_reads_the_real_data_and_trains(tmp_path):
    config = REPO / "configs/la/supervised.yaml"
    overrides = [f"data_dir={LA_DIR}", "iterations=2", "val_every=2", f"run_dir={tmp_path / 'run'}",
                 "tensorboard=false", "progress=false"]
    assert dust_main(["check-data", "--config", str(config), *[a for o in overrides for a in ("--set", o)]]) == 0
    cfg = full_config(load_config(config, overrides))
    records = train(cfg)
    assert {r["checkpoint"] for r in records} == {"last", "best"}
    assert all(0.0 <= r["dice"] <= 100.0 and r["resize"] == "crop" for r in records)
    per_case = (tmp_path / "run" / "metrics_val_last.csv").read_text().splitlines()[1:]
    assert len(per_case) == 8  # the last 8 of train.list, scored on the original grid


# ---------------------------------------------------------------------------------------------- DUST in 3D
def test_eq1_gives_one_value_per_volume_the_mean_over_its_voxels():
    """K=3 snapshots of two 2x2x2 volumes, two classes: Eq. 1 by hand."""
    fg = torch.zeros(3, 2, 2, 2, 2)  # (K, N, S, H, W): foreground probability
    fg[0, 0, 0, 0, 0] = 0.9  # volume 0: snapshot 1 disagrees with the reference on one voxel by 0.9
    fg[1, 0] = 0.0
    fg[:, 1] = 0.5  # volume 1: every snapshot agrees everywhere
    fg[0, 1, 1, 1, 1], fg[1, 1, 1, 1, 1] = 0.7, 0.3  # ... except one voxel: 0.7 and 0.3 against 0.5
    probs = torch.stack([1 - fg, fg], 2)  # (K, N, C, S, H, W)
    # volume 0: the pair (1, K) differs by 0.9 in both classes on 1 of 8 voxels, the pair (2, K) nowhere
    expected_0 = (0.9**2 * 2 / (2 * 8) + 0) / 2
    expected_1 = (0.2**2 * 2 / (2 * 8) + 0.2**2 * 2 / (2 * 8)) / 2
    u = sample_uncertainty(probs)
    assert u.shape == (2,) and torch.allclose(u, torch.tensor([expected_0, expected_1]))
    # over the foreground only: volume 1's argmax is background (a 0.5 tie) everywhere but at snapshot 1's 0.7
    # voxel, so its value is that voxel's class-mean squared difference alone
    assert torch.allclose(sample_uncertainty(probs, "foreground")[1], torch.tensor(0.2**2))


def test_dust_in_3d_ranks_every_unlabelled_volume_and_the_report_shows_the_ends(tiny_cfg_3d, capsys):
    cfg = tiny_cfg_3d(method="dust", iterations=12, val_every=4, batchnorm_recalibration_batches=2,
                      snapshot_batchnorm_recalibration=True)
    trainer = Trainer(cfg)
    trainer.fit()
    assert [h["stage"] for h in trainer.history][-1] == "stage2" and trainer.iteration == 12
    pool = trainer.data.unlabeled
    with (trainer.run_dir / "sample_uncertainty.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image_id"] for r in rows) == sorted(pool.ids) and len(pool.ids) == len(set(pool.ids)) > 1
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    values = [float(r["uncertainty"]) for r in rows]
    assert values == sorted(values) and all(np.isfinite(values))
    assert all(y.shape == img.shape[-3:] for y, img in zip(trainer.method.pseudo_labels, pool.images, strict=True))
    assert dust_main(["report", str(trainer.run_dir)]) == 0
    html = (trainer.run_dir / "report.html").read_text()
    assert "Sample uncertainty of the unlabelled pool" in html
    assert "easiest" in html and "hardest" in html and "volumes (middle axial slice)" in html


def test_dust_rank_lists_every_3d_scan_of_a_folder_once_hardest_first(tiny_cfg_3d, la_phantom_root, tmp_path):
    cfg = tiny_cfg_3d(method="dust", iterations=10, val_every=10)
    trainer = Trainer(cfg)
    trainer.fit()
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for case_id in (la_phantom_root / "train.list").read_text().split()[:4]:
        with h5py.File(case_path(la_phantom_root, case_id)) as f:
            nib.save(nib.Nifti1Image(f["image"][:], np.diag([0.625, 0.625, 0.625, 1.0])), inputs / f"{case_id}.nii.gz")
    snapshots = [str(trainer.ckpt_dir / f"pretrain_k{k}.pt") for k in (1, 2, 3)]
    out = tmp_path / "rank.csv"
    assert dust_main(["rank", "--checkpoints", *snapshots, "--input", str(inputs), "--out", str(out)]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case"] for r in rows) == sorted(p.name[: -len(".nii.gz")] for p in inputs.iterdir())
    values = [float(r["uncertainty"]) for r in rows]
    assert values == sorted(values, reverse=True) and [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    assert all(int(r["slices"]) == 16 for r in rows)  # (X, Y, Z) = (24, 20, 16): slices along the last axis
