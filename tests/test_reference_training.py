"""Baselines train as their reference code trains them (issue 45), and what dust did before stays reachable.

The "before" numbers below were computed by dust at commit eaa3c61 (before these defaults changed) on the fixed
batch of :func:`_losses`; the options named beside them must reproduce them.
"""

from __future__ import annotations

import pytest
import torch

from dust.engine.trainer import Trainer
from dust.losses import dice_loss
from dust.methods import get_method
from dust.methods.consistency import mutual_correction
from dust.methods.loading import full_config, stored_config
from dust.models import make_model


def _method(**overrides):
    cfg = full_config({
        "dataset": "la_h5", "data_dir": "/nonexistent", "model": "vnet", "upsample": "deconv",
        "channels": [4, 8, 16, 32, 64], "dropout": [0.0, 0.0, 0.0, 0.0, 0.5], "num_classes": 2,
        "class_names": ["background", "LA"], "spatial_policy": "crop", "patch_size": [16, 16, 16],
        "batch_size": 2, "unlabeled_batch_size": 2, "iterations": 100, "threads": 1, "bf16": False, **overrides})
    torch.manual_seed(0)
    method = get_method(cfg["method"])(cfg)
    method.build()
    return method


def _batch() -> dict[str, torch.Tensor]:
    x = torch.randn(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    return {"labeled_image": x[:2], "label": (x[:2, 0] > 0.5).long(), "unlabeled_image": x[2:]}


def _losses(**overrides) -> dict[str, float]:
    method = _method(**overrides)
    return {k: float(v.detach()) for k, v in method.train_step(_batch(), 30).items()}


@pytest.mark.parametrize("options, before", [
    ({"method": "multicure", "confidence_threshold": 0.9, "framework": "as_printed", "contrastive_schedule": "paper"},
     {"sup": 2.263608455657959, "unsup": 1.6210671663284302, "contrast": 1.1226351261138916}),
    ({"method": "cps", "init": "kaiming_xavier", "cross_labeled": True},
     {"sup": 1.1798404455184937, "cps": 0.03874585032463074}),
    ({"method": "mc_net", "sup_loss": "dice_ce"}, {"sup": 0.6120806336402893, "cons": 0.3218742907047272}),
])
def test_the_options_named_in_old_records_reproduce_the_loss_dust_computed_before(options, before):
    assert _losses(**options) == pytest.approx(before, rel=1e-4)


@pytest.mark.parametrize("method, extra", [("supervised", {}), ("dust", {"iterations": 10})])
def test_a_step_without_unlabelled_data_draws_as_many_labelled_crops_as_a_semi_supervised_step(
        tiny_cfg, method, extra):
    for setting, expected in (("ssl", 8), ("labeled", 4)):  # tiny_cfg: batch 4 + 4 unlabelled
        trainer = Trainer(tiny_cfg(method=method, supervised_batch=setting, **extra))
        first = trainer.spans[0].stage
        drawn = trainer.sampler.next(first.uses_unlabeled, trainer.labeled_batch_size(first))
        assert len(drawn["labeled_image"]) == expected and "unlabeled_image" not in drawn
    if method == "dust":  # the students' stages draw the configured labelled half of the batch
        later = trainer.spans[1].stage
        assert later.uses_unlabeled and trainer.labeled_batch_size(later) == 4


def test_cps_networks_start_at_pytorchs_default_init_unless_configured():
    cps = _method(method="cps")
    torch.manual_seed(0)
    reference = make_model(cps.cfg)
    assert all(torch.equal(a, b) for a, b in zip(cps.networks["model"].state_dict().values(),
                                                  reference.state_dict().values(), strict=True))
    assert not torch.equal(next(cps.networks["model"].parameters()), next(cps.networks["model2"].parameters()))
    kaiming = _method(method="cps", init="kaiming_xavier")
    first = next(m for m in kaiming.networks["model"].modules() if isinstance(m, torch.nn.Conv3d))
    default_first = next(m for m in cps.networks["model"].modules() if isinstance(m, torch.nn.Conv3d))
    assert first.weight.norm() > 2 * default_first.weight.norm()  # kaiming: several times the default's norm


def test_cps_cross_supervises_the_unlabelled_crops_only_unless_configured():
    for cross_labeled in (False, True):
        method = _method(method="cps", cross_labeled=cross_labeled)
        for net in method.networks.values():
            net.eval()  # running statistics: the unlabelled outputs do not depend on the labelled crops
        batch = _batch()
        changed = dict(batch, labeled_image=batch["labeled_image"] + 1.0)
        same = torch.isclose(method.train_step(batch, 30)["cps"], method.train_step(changed, 30)["cps"])
        assert bool(same) != cross_labeled


def test_multicure_trains_both_networks_with_mcfs_teacher_choice_by_default():
    method = _method(method="multicure", confidence_threshold=0.9)
    batch = _batch()
    losses = method.train_step(batch, 30)
    assert set(losses) == {"sup", "cdr", "cons", "contrast"}
    nets = method.networks
    # the correction teaches exactly one network: its gradient reaches the student and not the teacher
    grads = {}
    for net in nets.values():
        net.zero_grad()
    method.train_step(batch, 30)["cons"].backward()
    for name, net in nets.items():
        grads[name] = sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None)
    assert (grads["model"] > 0) != (grads["model2"] > 0)
    # both networks learn from the supervised term
    for net in nets.values():
        net.zero_grad()
    method.train_step(batch, 30)["sup"].backward()
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()) for net in nets.values())


def test_multicures_base_on_the_mcf_framework_computes_mcfs_losses():
    base = _method(method="multicure", multicure_module=False, contrastive=False)
    mcf = _method(method="mcf")  # the same seed: the same two networks
    assert all(torch.equal(a, b) for name in ("model", "model2") for a, b in zip(
        base.networks[name].state_dict().values(), mcf.networks[name].state_dict().values(), strict=True))
    torch.manual_seed(3)
    got = base.train_step(_batch(), 30)
    torch.manual_seed(3)
    expected = mcf.train_step(_batch(), 30)
    assert {k: float(v.detach()) for k, v in got.items()} == pytest.approx(
        {k: float(v.detach()) for k, v in expected.items()})


def test_mc_nets_default_supervised_term_is_its_codes_foreground_dice():
    logits = torch.randn(2, 2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 2, (2, 4, 5, 6), generator=torch.Generator().manual_seed(1))
    p = torch.softmax(logits, 1)[:, 1]
    t = (target == 1).float()
    by_hand = 1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
    torch.testing.assert_close(dice_loss(logits, target, include_background=False, squared=False), by_hand)
    method = _method(method="mc_net")
    torch.manual_seed(2)
    losses = method.train_step(_batch(), 30)
    torch.manual_seed(2)
    outputs = method.networks["model"](torch.cat([_batch()["labeled_image"], _batch()["unlabeled_image"]]))
    y = _batch()["label"]
    expected = 0.5 * sum(dice_loss(o.float()[:2], y, include_background=False, squared=False) for o in outputs)
    torch.testing.assert_close(losses["sup"], expected)


def test_mutual_correction_teaches_the_network_with_the_higher_supervised_loss():
    y = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    good = torch.zeros(2, 2, 4, 4, 4)
    good[:, 0] = 5.0  # confident background: right on the labelled crop
    bad = -good  # confident foreground: wrong
    cfg = {"consistency_weight": 0.1, "rampup_fraction": 1.0, "cdr_weight": 0.5, "iterations": 10}
    _, student = mutual_correction((good, bad), y, cfg, 10, temperature=0.1)
    assert student == 1
    _, student = mutual_correction((bad, good), y, cfg, 10, temperature=0.1)
    assert student == 0


@pytest.mark.parametrize("method, before", [
    ("supervised", {"supervised_batch": "labeled"}),
    ("cps", {"supervised_batch": "labeled", "init": "kaiming_xavier", "cross_labeled": True}),
    ("multicure", {"framework": "as_printed"}), ("mc_net", {"sup_loss": "dice_ce"}),
])
def test_a_config_stored_before_the_defaults_changed_keeps_what_its_run_did(tmp_path, method, before):
    written = {k: v for k, v in _method(method=method).cfg.items() if k not in before}  # as written before
    cfg = stored_config(written, tmp_path / "config.yaml")
    assert {k: cfg[k] for k in before} == before
    assert stored_config(_method(method=method).cfg, tmp_path / "config.yaml")["supervised_batch"] == "ssl"
