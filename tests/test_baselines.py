"""The semi-supervised baselines: shared pieces against hand computations, each method trains through the real
engine, two-network resume, ST++'s selection, strong augmentation, the ACDC configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dust.config import format_run_dir, load_config
from dust.data.strong_augment import IGNORE_INDEX, strong_augment
from dust.engine.checkpoint import iteration_checkpoints, load_checkpoint
from dust.engine.trainer import Trainer
from dust.methods.consistency import ema_update, ramp, sigmoid_rampup
from dust.methods.dct import fgsm, jensen_shannon
from dust.methods.loading import full_config
from dust.methods.st_plus_plus import checkpoint_stability
from dust.methods.urpc import rectified_pyramid_consistency
from dust.models import DeepSupervisionUNet2D

BASELINES = ["mean_teacher", "ua_mt", "urpc", "dct", "cps", "st_plus_plus"]
UNSUPERVISED_TERMS = {"mean_teacher": {"cons"}, "ua_mt": {"cons"}, "urpc": {"cons"}, "dct": {"cot", "adv"},
                      "cps": {"cps"}, "st_plus_plus": {"unsup"}}
ACDC_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "acdc"


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------- shared pieces
def test_sigmoid_rampup_values_and_its_length_is_a_fraction_of_the_budget():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))  # ~0.007 at the start
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.5**2))
    assert sigmoid_rampup(100, 100) == sigmoid_rampup(250, 100) == 1.0
    assert sigmoid_rampup(7, 0) == 1.0
    short, long = {"iterations": 4000, "rampup_fraction": 0.5}, {"iterations": 8000, "rampup_fraction": 0.5}
    assert ramp(short, 2000) == ramp(long, 4000) == 1.0  # the ramp ends half-way through either budget
    assert ramp(short, 1000) == ramp(long, 2000) == pytest.approx(math.exp(-5 * 0.25))
    assert ramp(long, 2000) > ramp({**long, "rampup_fraction": 1.0}, 2000)


def test_ema_update_matches_a_hand_computation():
    student, teacher = nn.Linear(2, 1), nn.Linear(2, 1)
    s, t = [p.detach().clone() for p in student.parameters()], [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, decay=0.99, iteration=9)  # early: the true average, alpha = 1 - 1/10 = 0.9
    assert all(torch.allclose(p, 0.9 * t0 + 0.1 * s0) for p, t0, s0 in zip(teacher.parameters(), t, s, strict=True))
    t = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, decay=0.99, iteration=1000)  # later: alpha = decay
    assert all(torch.allclose(p, 0.99 * t0 + 0.01 * s0) for p, t0, s0 in zip(teacher.parameters(), t, s, strict=True))
    ema_update(teacher, student, decay=0.99, iteration=0)  # the first step copies the student
    assert all(torch.equal(p, s0) for p, s0 in zip(teacher.parameters(), s, strict=True))


def test_urpc_loss_is_zero_for_agreeing_heads_and_matches_ssl4mis_form():
    torch.manual_seed(0)
    same = torch.randn(2, 4, 5, 5)
    assert float(rectified_pyramid_consistency([same] * 4)) == pytest.approx(0.0, abs=1e-6)
    heads = [torch.randn(2, 4, 5, 5) for _ in range(4)]
    probs = [torch.softmax(z, 1) for z in heads]
    mean = sum(probs) / 4
    expected = 0.0
    for p in probs:  # SSL4MIS: KLDivLoss(log p_s, mean) summed over classes, exp(-var)-weighted squared distance
        var = F.kl_div(torch.log(p), mean, reduction="none").sum(1, keepdim=True)
        expected += ((mean - p) ** 2 * torch.exp(-var)).mean() / (torch.exp(-var).mean() + 1e-8) + var.mean()
    assert float(rectified_pyramid_consistency(heads)) == pytest.approx(float(expected / 4), rel=1e-5)


def test_deep_supervision_unet_gives_four_full_size_heads_and_clean_ones_in_eval():
    net = DeepSupervisionUNet2D(channels=(4, 8, 16, 32, 64)).eval()
    x = torch.randn(2, 1, 32, 32)
    heads = net(x)
    assert len(heads) == 4 and all(h.shape == (2, 4, 32, 32) for h in heads)
    assert torch.equal(heads[0], net.forward_main(x))
    assert all(torch.equal(a, b) for a, b in zip(heads, net(x), strict=True))  # no perturbation in eval mode
    with pytest.raises(ValueError, match="5 levels"):
        DeepSupervisionUNet2D(channels=(4, 8, 16))


def test_jensen_shannon_and_fgsm_by_hand():
    same = torch.randn(1, 3, 2, 2)
    assert float(jensen_shannon(same, same)) == pytest.approx(0.0, abs=1e-6)
    certain_a, certain_b = torch.tensor([[[[20.0]], [[-20.0]]]]), torch.tensor([[[[-20.0]], [[20.0]]]])
    assert float(jensen_shannon(certain_a, certain_b)) == pytest.approx(math.log(2), abs=1e-4)  # opposite: ln 2
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Dropout(0.5)).train()
    x, y = torch.randn(1, 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    x_adv = fgsm(net, x, y, eps=0.05)
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, 0.05)) and net.training
    assert all(p.grad is None for p in net.parameters())  # only the input gradient was taken


def test_checkpoint_stability_is_the_mean_iou_with_the_final_checkpoint():
    final = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [2, 2]]])
    earlier = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [0, 2]]])
    stability = checkpoint_stability(torch.stack([earlier, final, final]), num_classes=3)
    # image 0: identical everywhere -> 1; image 1 vs final: class 0 IoU 2/3, class 1 absent (skipped), class 2 1/2;
    # averaged with the identical second checkpoint: (7/12 + 1) / 2
    assert stability.tolist() == pytest.approx([1.0, (7 / 12 + 1) / 2])


def test_strong_augmentation_ignores_cut_out_pixels_and_keeps_the_intensity_range():
    images = torch.rand(16, 1, 24, 20)
    labels = torch.randint(0, 4, (16, 24, 20))
    out, out_labels = strong_augment(images, labels, torch.Generator().manual_seed(0))
    again, _ = strong_augment(images, labels, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and out.shape == images.shape and out_labels.dtype == torch.long
    cut = out_labels == IGNORE_INDEX
    assert torch.equal(out_labels[~cut], labels[~cut])  # nothing else in a label changes
    assert 0 < int(cut.flatten(1).any(1).sum()) < 16  # some images were cut out (p = 0.5), not all
    for img, orig, mask in zip(out, images, cut, strict=True):
        assert orig.min() - 1e-6 <= img.min() and img.max() <= orig.max() + 1e-6
        if mask.any():  # one rectangle
            rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
            assert int(mask.sum()) == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)


# ---------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", BASELINES)
def test_each_baseline_trains_through_the_engine_and_lowers_its_supervised_loss(tiny_cfg, method):
    trainer = Trainer(tiny_cfg(method=method, iterations=40, val_every=40, lr=0.05))
    student = trainer.method.networks["model"]
    trainer.fit()
    log = trainer.train_log
    assert log[-1]["sup"] < 0.8 * log[0]["sup"], log
    assert UNSUPERVISED_TERMS[method] <= log[-1].keys() and all(math.isfinite(v) for v in log[-1].values())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    if "teacher" in trainer.method.networks:  # an EMA teacher is checkpointed but never optimised
        teacher = trainer.method.networks["teacher"]
        assert optimised == {id(p) for p in student.parameters()}
        assert not _equal(_state(teacher), _state(student))
        state = load_checkpoint(trainer.ckpt_dir / "best.pt")
        assert set(state["networks"]) == {"model", "teacher"}


@pytest.mark.parametrize("method", ["cps", "mcf", "fixdyn"])
def test_two_network_resume_restores_both_networks_and_matches(tiny_cfg, tmp_path: Path, method: str):
    kw = dict(method=method, iterations=20, val_every=10, spatial_policy="crop" if method == "fixdyn" else "resize")
    full = Trainer(tiny_cfg(run_dir=str(tmp_path / "full"), **kw))
    full.fit()
    cut = Trainer(tiny_cfg(run_dir=str(tmp_path / "cut"), **kw))
    cut.fit()
    newest, at_10 = iteration_checkpoints(cut.ckpt_dir)[:2]
    newest.unlink()  # as if killed after iteration 10
    saved = load_checkpoint(at_10)["networks"]
    resumed = Trainer(tiny_cfg(run_dir=str(tmp_path / "cut"), **kw))
    assert resumed.resume() and resumed.iteration == 10
    assert set(saved) == {"model", "model2"} and not _equal(saved["model"], saved["model2"])
    assert all(_equal(_state(resumed.method.networks[k]), saved[k]) for k in saved)
    resumed.fit()
    assert all(_equal(_state(full.method.networks[k]), _state(resumed.method.networks[k])) for k in saved)


def test_st_plus_plus_selects_stable_slices_and_relabels_only_the_rest(tiny_cfg, monkeypatch):
    trainer = Trainer(tiny_cfg(method="st_plus_plus", iterations=20, val_every=20))
    method, pool = trainer.method, trainer.data.unlabeled
    seen: dict[str, dict] = {}
    original = method.on_stage_start

    def spy(stage, tr):
        before = _state(method.networks["model"])
        original(stage, tr)
        labels = method.pseudo_labels
        seen[stage.name] = {
            "drawn": sorted(trainer.sampler.unlabeled_stream.indices.tolist()),
            "labels": None if labels is None else [y.clone() for y in labels],
            "reinitialised": not _equal(before, _state(method.networks["model"])),
        }

    monkeypatch.setattr(method, "on_stage_start", spy)
    trainer.fit()
    n, reliable, order = len(pool), method.reliable, method.order
    rest = order[len(reliable):]
    assert sorted(torch.cat([reliable, rest]).tolist()) == list(range(n))  # reliable + rest = the pool, once each
    assert len(reliable) == round(n / 2)
    stability = 1 - method.uncertainty
    assert float(stability[reliable].min()) >= float(stability[rest].max())  # the most stable half
    assert seen["stage1"]["drawn"] == sorted(reliable.tolist())
    labelled = [i for i, y in enumerate(seen["stage1"]["labels"]) if y.numel()]
    assert labelled == sorted(reliable.tolist())
    assert seen["stage2"]["drawn"] == list(range(n))
    assert all(y.numel() for y in seen["stage2"]["labels"])
    # the reliable slices keep the teacher's labels in stage 2; only the rest is labelled by the student
    assert all(torch.equal(seen["stage1"]["labels"][i], seen["stage2"]["labels"][i]) for i in reliable.tolist())
    assert seen["stage1"]["reinitialised"] and seen["stage2"]["reinitialised"]
    assert sorted(p.name for p in trainer.ckpt_dir.glob("pretrain_k*.pt")) == [f"pretrain_k{k}.pt" for k in (1, 2, 3)]


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("method", BASELINES)
def test_acdc_config_resolves_with_a_labelled_patients_override(method):
    cfg = full_config(load_config(ACDC_CONFIGS / f"{method}.yaml", ["labeled_patients=14"]))
    assert cfg["method"] == method and cfg["iterations"] == 4000 and cfg["unlabeled_batch_size"] == 8
    assert cfg["patch_size"] == [128, 128] and cfg["lr"] == 0.01 and cfg["seed"] == 1337 and cfg["threads"] == 2
    assert format_run_dir(cfg) == Path(f"runs/acdc/{method}_14p_seed1337")
