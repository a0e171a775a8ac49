"""DUST and its ablations: the equations against hand computations, the split, no label leak, stages, resume."""

from __future__ import annotations

import copy
import csv
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dust.config import ConfigError
from dust.data.ssl4mis import read_list, split_by_patients
from dust.data.transforms import resize_image
from dust.engine.checkpoint import iteration_checkpoints
from dust.engine.trainer import Trainer
from dust.losses import dice_loss, uncertainty_rectified_loss
from dust.methods import get_method
from dust.models.batchnorm import recalibrate_batchnorm
from dust.report import write_report
from dust.uncertainty import decoder_kl, predictive_entropy, sample_uncertainty, split_by_uncertainty

LN3 = math.log(3.0)


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.method.networks["model"].state_dict().items()}


# ---------------------------------------------------------------------------------------- equations
def test_sample_uncertainty_matches_eq1_by_hand():
    # K=3 checkpoints, 2 images, 2 classes, 1x2 pixels; probs[k, n, c, 0, w]
    ref = [[0.5, 1.0], [0.5, 0.0]]  # F_3 (the last checkpoint): pixel a = (.5, .5), pixel b = (1, 0)
    f1 = [[0.7, 0.6], [0.3, 0.4]]  # (F1-F3)^2: a (.04, .04), b (.16, .16) -> mean over 4 entries = 0.1
    f2 = [[0.5, 0.9], [0.5, 0.1]]  # (F2-F3)^2: a (0, 0), b (.01, .01) -> mean = 0.005
    probs = torch.tensor([[f1, ref], [f2, ref], [ref, ref]]).unsqueeze(3)  # image 2 agrees everywhere
    assert probs.shape == (3, 2, 2, 1, 2)
    u = sample_uncertainty(probs)
    assert torch.allclose(u, torch.tensor([(0.1 + 0.005) / 2, 0.0]), atol=1e-7)  # Eq. 1: / (K - 1)
    assert torch.allclose(sample_uncertainty(list(probs)), u)  # a list of K tensors works the same
    with pytest.raises(ValueError, match="K >= 2"):
        sample_uncertainty(probs[:1])


def test_sample_uncertainty_over_foreground_is_not_diluted_by_agreeing_background():
    # K=2, 3 images, 2 classes (0 background), 1x4 pixels. Image 1: one foreground pixel where the snapshots
    # disagree by 0.4; image 2: the same disagreement on four foreground pixels; image 3: background everywhere.
    def image(fg_probs: list[float]) -> list[list[list[float]]]:
        return [[[1 - p for p in fg_probs]], [fg_probs]]  # (C=2, H=1, W=4)

    first = torch.tensor([image([0.4, 0, 0, 0]), image([0.4] * 4), image([0.1] * 4)])
    last = torch.tensor([image([0.8, 0, 0, 0]), image([0.8] * 4), image([0.2] * 4)])
    probs = torch.stack([first, last])  # (K=2, N=3, C=2, 1, 4)
    sq = 0.4**2
    assert torch.allclose(sample_uncertainty(probs), torch.tensor([sq / 4, sq, 0.1**2]))  # the paper: all pixels
    region = sample_uncertainty(probs, region="foreground")
    # image 1 ties image 2 once its agreeing background no longer counts; image 3 has no foreground: last
    assert torch.allclose(region[:2], torch.tensor([sq, sq])) and torch.isinf(region[2])
    assert split_by_uncertainty(region, 0.5)[0].tolist()[-1] == 2
    with pytest.raises(ValueError, match="region"):
        sample_uncertainty(probs, region="edges")


def test_decoder_kl_and_unrc_loss_match_eq2_and_eq4_by_hand():
    # 2 classes, 2 pixels. Pixel 1: p_main = (1/2, 1/2), p_aux = (3/4, 1/4); pixel 2: both (3/4, 1/4).
    main = torch.tensor([[0.0, LN3], [0.0, 0.0]]).reshape(1, 2, 1, 2)
    aux = torch.tensor([[LN3, LN3], [0.0, 0.0]]).reshape(1, 2, 1, 2)
    pseudo = torch.tensor([[[0, 1]]])
    kl1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 ln(4/3) = 0.14384
    assert torch.allclose(decoder_kl(main, aux), torch.tensor([[[kl1, 0.0]]]), atol=1e-6)
    # CE: pixel 1 -ln(1/2) = ln 2 with weight exp(-kl1) = sqrt(3)/2; pixel 2 -ln(1/4) = ln 4 with weight 1
    expected = ((math.sqrt(3) / 2 * math.log(2) + kl1) + (math.log(4) + 0.0)) / 2
    assert abs(expected - 1.065209) < 1e-6
    loss, dkl = uncertainty_rectified_loss(main, aux, pseudo)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(dkl, decoder_kl(main, aux))
    assert torch.allclose(predictive_entropy(main)[0, 0, 0], torch.tensor(math.log(2)))


def test_detaching_the_weight_keeps_the_value_but_changes_the_gradient():
    torch.manual_seed(0)
    main, aux, pseudo = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    grads, values = [], []
    for detach in (False, True):
        m = main.clone().requires_grad_()
        loss, _ = uncertainty_rectified_loss(m, aux, pseudo, detach_weight=detach)
        loss.backward()
        grads.append(m.grad)
        values.append(loss.item())
    assert values[0] == pytest.approx(values[1])
    assert not torch.allclose(grads[0], grads[1])


def test_kl_is_finite_for_saturated_bf16_logits():
    main = torch.tensor([[1e4, -1e4]], dtype=torch.bfloat16).reshape(1, 2, 1, 1)
    aux = torch.tensor([[-1e4, 1e4]], dtype=torch.bfloat16).reshape(1, 2, 1, 1)
    assert torch.isfinite(decoder_kl(main, aux)).all() and decoder_kl(main, main).item() == 0.0


# ---------------------------------------------------------------------------------------- split
def test_split_is_ascending_by_uncertainty_and_covers_the_pool_once():
    order, reliable, unreliable = split_by_uncertainty(torch.tensor([0.3, 0.1, 0.4, 0.2, 0.5]), 0.5)
    assert order.tolist() == [1, 3, 0, 2, 4]
    assert reliable.tolist() == [1, 3] and unreliable.tolist() == [0, 2, 4]
    u = torch.rand(101, generator=torch.Generator().manual_seed(1))
    order, reliable, unreliable = split_by_uncertainty(u, 0.5)
    assert sorted(torch.cat([reliable, unreliable]).tolist()) == list(range(101))
    assert len(reliable) == 50 and u[reliable].max() <= u[unreliable].min()
    assert torch.equal(torch.cat([reliable, unreliable]), order)


# ---------------------------------------------------------------------------------------- configuration
def test_keys_and_checkpoint_points_are_checked(tiny_cfg):
    cfg = tiny_cfg(method="dust")
    assert cfg["pretrain_fraction"] == 0.4 and cfg["reliable_fraction"] == 0.5
    assert cfg["checkpoint_points"] == [1 / 3, 2 / 3, 1.0] and cfg["detach_uncertainty_weight"] is False
    with pytest.raises(ConfigError, match="unknown config key.*reliable_fraction"):
        tiny_cfg(method="self_training", reliable_fraction=0.3)  # no sorting: the key would be ignored
    with pytest.raises(ConfigError, match="unknown config key.*detach_uncertainty_weight"):
        tiny_cfg(method="st_ss", detach_uncertainty_weight=True)
    with pytest.raises(ConfigError, match="checkpoint_points"):
        get_method("dust")(tiny_cfg(method="dust", checkpoint_points=[1.0])).build()
    with pytest.raises(ConfigError, match="sample_uncertainty_region 'edges'"):
        get_method("dust")(tiny_cfg(method="dust", sample_uncertainty_region="edges")).build()
    with pytest.raises(ConfigError, match="distinct iterations"):  # 8 pre-training iterations: 0.5, 0.55 -> 4, 4
        get_method("dust")(tiny_cfg(method="dust", checkpoint_points=[0.5, 0.55, 1.0])).build()


# ---------------------------------------------------------------------------------------- training
def _spy_stage_starts(trainer: Trainer, monkeypatch) -> dict[str, dict]:
    """Record, after each stage start, which unlabelled slices the sampler draws and which have pseudo-labels."""
    seen: dict[str, dict] = {}
    original = trainer.method.on_stage_start

    def spy(stage, tr):
        original(stage, tr)
        labels = trainer.sampler.pseudo_labels
        seen[stage.name] = {
            "drawn": sorted(trainer.sampler.unlabeled_stream.indices.tolist()),
            "labelled": None if labels is None else [i for i, y in enumerate(labels) if y.numel()],
            "uses_unlabeled": stage.uses_unlabeled,
        }

    monkeypatch.setattr(trainer.method, "on_stage_start", spy)
    return seen


@pytest.mark.parametrize("method", ["dust", "st_ss", "self_training"])
def test_a_short_run_goes_through_all_stages(tiny_cfg, method, monkeypatch):
    trainer = Trainer(tiny_cfg(method=method, iterations=10, val_every=3))
    pool = trainer.data.unlabeled
    n = len(pool)
    spans = [(s.stage.name, s.stage.iterations, s.stage.restart_schedule) for s in trainer.spans]
    assert spans == [("pretrain", 4, False), ("stage1", 3, True), ("stage2", 3, True)]
    seen = _spy_stage_starts(trainer, monkeypatch)
    trainer.fit()
    assert [h["stage"] for h in trainer.history] == ["pretrain", "stage1", "stage2", "stage2"]  # at 3, 6, 9, 10
    assert seen["pretrain"] == {"drawn": list(range(n)), "labelled": None, "uses_unlabeled": False}
    assert seen["stage2"] == {"drawn": list(range(n)), "labelled": list(range(n)), "uses_unlabeled": True}
    assert all(y.shape == img.shape[-2:] and y.dtype == torch.uint8 for y, img in zip(trainer.method.pseudo_labels,
                                                                                      pool.images, strict=True))
    run = trainer.run_dir
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["stage1_pseudo_labels.png",
                                                                   "stage2_pseudo_labels.png"]
    csv_path = run / "sample_uncertainty.csv"
    if method == "self_training":  # no sorting: stage 1 already takes the whole pool
        assert seen["stage1"]["drawn"] == seen["stage1"]["labelled"] == list(range(n))
        assert not csv_path.exists() and not list(trainer.ckpt_dir.glob("pretrain_k*.pt"))
        return
    reliable = sorted(trainer.method.reliable.tolist())
    assert len(reliable) == round(n / 2)
    assert seen["stage1"]["drawn"] == seen["stage1"]["labelled"] == reliable
    assert sorted(p.name for p in trainer.ckpt_dir.glob("pretrain_k*.pt")) == [f"pretrain_k{k}.pt" for k in (1, 2, 3)]
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and [int(r["rank"]) for r in rows] == list(range(1, n + 1))
    assert sorted(r["image_id"] for r in rows) == sorted(pool.ids)
    values = [float(r["uncertainty"]) for r in rows]
    assert values == sorted(values)
    assert sorted(pool.ids.index(r["image_id"]) for r in rows if r["subset"] == "reliable") == reliable
    assert "sample uncertainty (Eq. 1, K=3)" in (run / "train.log").read_text()


def test_pseudo_labels_never_come_from_unlabelled_ground_truth(phantom_root: Path, tiny_cfg, tmp_path: Path):
    # A copy of the phantom whose unlabelled slices have no label (even) or a checkerboard of classes (odd):
    # reading them would crash, and copying them would give pseudo-labels equal to the checkerboard.
    root = tmp_path / "phantom"
    shutil.copytree(phantom_root, root)
    _, unlabeled = split_by_patients(read_list(root / "train_slices.list"), 2, root / "train_slices.list")
    garbage = {}
    for k, name in enumerate(unlabeled):
        with h5py.File(root / "data" / f"{name}.h5", "r+") as f:
            shape = f["label"].shape
            del f["label"]
            if k % 2:
                garbage[name] = torch.from_numpy(np.indices(shape).sum(0) % 4).to(torch.uint8)
                f["label"] = garbage[name].numpy()
    trainer = Trainer(tiny_cfg(method="dust", data_dir=str(root), iterations=10, val_every=10))
    pool = trainer.data.unlabeled
    assert pool.labels is None and pool.ids == unlabeled
    trainer.fit()
    assert trainer.history[-1]["stage"] == "stage2"
    for name, fake in garbage.items():
        pseudo = trainer.method.pseudo_labels[pool.ids.index(name)]
        assert pseudo.shape == fake.shape and (pseudo == fake).float().mean() < 0.5


def test_batchnorm_recalibration_inside_stage1_draws_only_pseudo_labelled_slices(tiny_cfg):
    # a validation inside stage 1, where only the reliable half of the pool has pseudo-labels
    trainer = Trainer(tiny_cfg(method="dust", iterations=20, val_every=2, batchnorm_recalibration_batches=4))
    trainer.fit()
    assert {"pretrain", "stage1", "stage2"} <= {h["stage"] for h in trainer.history}


def test_snapshot_batchnorm_recalibration_ranks_the_pool_with_test_time_statistics(tiny_cfg, tmp_path: Path):
    kw = dict(method="st_ss", iterations=10, val_every=10, batchnorm_recalibration_batches=3)
    plain = Trainer(tiny_cfg(run_dir=str(tmp_path / "plain"), **kw))
    plain.fit()
    recal = Trainer(tiny_cfg(run_dir=str(tmp_path / "recal"), snapshot_batchnorm_recalibration=True, **kw))
    recal.fit()
    # pre-training and its snapshot files are the same; only the ranking's statistics differ
    for k in (1, 2, 3):
        saved = [torch.load(t.ckpt_dir / f"pretrain_k{k}.pt") for t in (plain, recal)]
        assert all(torch.equal(saved[0][n], saved[1][n]) for n in saved[0])
    assert not torch.equal(plain.method.uncertainty, recal.method.uncertainty)
    # Eq. 1 by hand from the snapshots, each recalibrated over labelled batches as at the start of stage 1
    recal.iteration, recal.started_stage = recal.method.stages()[0].iterations, 0  # stage 1 about to start
    batches = recal.recalibration_batches()
    assert len(batches) == 3 and all(len(b) == 8 for b in batches)  # labelled only, as pre-training draws them
    probs = []
    for k in (1, 2, 3):
        net = copy.deepcopy(recal.method.networks["model"])
        net.load_state_dict(torch.load(recal.ckpt_dir / f"pretrain_k{k}.pt"))
        recalibrate_batchnorm({"model": net}, net, batches, recal.autocast())
        with torch.inference_mode(), recal.autocast():
            probs.append(torch.softmax(net.forward_main(_pool_at_patch(recal)).float(), 1))
    assert torch.allclose(recal.method.uncertainty, sample_uncertainty(probs), rtol=1e-5, atol=0)


def test_snapshot_batchnorm_recalibration_needs_recalibration_batches(tiny_cfg):
    with pytest.raises(ConfigError, match="batchnorm_recalibration_batches"):
        Trainer(tiny_cfg(method="dust", snapshot_batchnorm_recalibration=True))


def _pool_at_patch(trainer: Trainer) -> torch.Tensor:
    pool, size = trainer.data.unlabeled, tuple(trainer.cfg["patch_size"])
    return torch.cat([resize_image(image[None], size, trainer.cfg["image_interpolation"]) for image in pool.images])


@pytest.mark.parametrize("recalibration", [0, 2])
def test_resume_inside_stage2_matches_the_uninterrupted_run(tiny_cfg, tmp_path: Path, recalibration: int):
    # 20 iterations: pretrain 0-8, stage1 8-14, stage2 14-20; checkpoints at 8, 16, 20 (the last two kept)
    # (with BatchNorm recalibration, the pseudo-labels of stage 1 come from the recalibrated teacher)
    kw = dict(method="dust", val_every=8, batchnorm_recalibration_batches=recalibration)
    full = Trainer(tiny_cfg(run_dir=str(tmp_path / "full"), **kw))
    full.fit()
    cut = Trainer(tiny_cfg(run_dir=str(tmp_path / "cut"), **kw))
    cut.fit()
    newest = iteration_checkpoints(cut.ckpt_dir)[0]
    assert newest.name == "iter_0000020.pt"
    newest.unlink()  # as if killed after iteration 16
    resumed = Trainer(tiny_cfg(run_dir=str(tmp_path / "cut"), **kw))
    assert resumed.resume() and resumed.iteration == 16 and resumed.current_span().stage.name == "stage2"
    assert resumed.current_span().stage.uses_unlabeled and torch.equal(resumed.method.order, full.method.order)
    resumed.fit()
    assert resumed.iteration == 20 and resumed.history == full.history
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert all(torch.equal(a, b) for a, b in zip(full.method.pseudo_labels,
                                                  resumed.sampler.pseudo_labels, strict=True))


def test_output_decoder_mean_averages_both_decoders_everywhere_the_output_is_used(tiny_cfg):
    with pytest.raises(ConfigError, match="output_decoder 'both'"):
        get_method("dust")(tiny_cfg(method="dust", output_decoder="both")).build()
    trainer = Trainer(tiny_cfg(method="dust", iterations=10, val_every=5, output_decoder="mean"))
    trainer.fit()
    method, net = trainer.method, trainer.method.networks["model"].eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        main, aux = net(x)
        probs = torch.softmax(method.predict(x), 1)
    torch.testing.assert_close(probs, (torch.softmax(main, 1) + torch.softmax(aux, 1)) / 2)
    # pseudo-labels are the averaged output's argmax too (labelled here by the final network)
    pool, size = trainer.data.unlabeled, tuple(trainer.cfg["patch_size"])
    method._pseudo_label(torch.arange(len(pool)), "check", method.run)
    img = pool.images[0]
    with torch.inference_mode(), trainer.autocast():
        expected = method.predict(resize_image(img[None], size).to(memory_format=torch.channels_last)).argmax(1)[0]
    assert torch.equal(method.pseudo_labels[0], method.label_on_item_grid(expected, img))


@pytest.mark.parametrize("method", ["dust", "self_training"])
def test_pseudo_label_dice_adds_a_dice_term_to_the_unlabelled_loss(tiny_cfg, method):
    torch.manual_seed(0)
    x_l, x_u = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    y_l, y_u = torch.randint(0, 4, (2, 32, 32)), torch.randint(0, 4, (2, 32, 32))
    batch = {"labeled_image": x_l, "label": y_l, "unlabeled_image": x_u, "pseudo_label": y_u}
    losses = {}
    for dice in (False, True):
        m = get_method(method)(tiny_cfg(method=method, pseudo_label_dice=dice))
        torch.manual_seed(1)  # the same initial weights for both
        m.build()
        m.networks["model"].eval()  # no dropout: the two forwards see the same network function
        losses[dice] = m.train_step(batch, 0)["unsup"]
        main_u = m.networks["model"](torch.cat([x_l, x_u]))[0][2:]
    torch.testing.assert_close(losses[True] - losses[False], dice_loss(main_u, y_u))


def test_skip_empty_pseudo_labels_leaves_background_only_slices_out_of_the_stage(tiny_cfg, monkeypatch):
    trainer = Trainer(tiny_cfg(method="self_training", iterations=10, val_every=10, skip_empty_pseudo_labels=True))
    pool = trainer.data.unlabeled
    real_pseudo_label = trainer.method._pseudo_label

    def blank_even_slices(indices, stage, tr):  # as if the teacher saw no heart on every even pool slice
        real_pseudo_label(indices, stage, tr)
        for i in indices.tolist():
            if i % 2 == 0:
                trainer.method.pseudo_labels[i] = torch.zeros_like(trainer.method.pseudo_labels[i])
            else:
                trainer.method.pseudo_labels[i][0, 0] = 1  # at least one foreground pixel

    monkeypatch.setattr(trainer.method, "_pseudo_label", blank_even_slices)
    trainer.fit()
    assert trainer.sampler.unlabeled_stream.indices.tolist() == list(range(1, len(pool), 2))


def test_foreground_region_ranks_the_pool_and_a_slice_without_foreground_goes_last(tiny_cfg, monkeypatch):
    import dust.methods.dust as dust_module

    trainer = Trainer(tiny_cfg(method="st_ss", iterations=10, val_every=10, sample_uncertainty_region="foreground"))
    used_regions = []

    def with_the_pools_first_slice_unlabelled(probs, region="image"):
        used_regions.append(region)
        probs = [p.clone() for p in probs]
        for p in probs:
            p[1:, :, 0, 0] = 0  # every other slice: foreground at one pixel, for every snapshot
            p[1:, 1, 0, 0] = 1
            p[0] = 0  # the first slice: background everywhere, as if no snapshot saw a heart on it
            p[0, 0] = 1
        return sample_uncertainty(probs, region)

    monkeypatch.setattr(dust_module, "sample_uncertainty", with_the_pools_first_slice_unlabelled)
    trainer.fit()
    assert used_regions and set(used_regions) == {"foreground"}
    with (trainer.run_dir / "sample_uncertainty.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["image_id"] == trainer.data.unlabeled.ids[0] and math.isinf(float(rows[-1]["uncertainty"]))
    assert all(math.isfinite(float(r["uncertainty"])) for r in rows[:-1])
    report = write_report([trainer.run_dir], trainer.run_dir / "report.html")  # the histogram plots an inf
    assert "Sample uncertainty of the unlabelled pool" in report.read_text()
