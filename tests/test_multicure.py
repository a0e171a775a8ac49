"""MultiCURE: 3D deformable convolution, the three-branch module, prototypes, the contrastive loss, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from dust.config import ConfigError
from dust.engine.trainer import Trainer
from dust.losses import class_prototypes, prototype_contrastive_loss
from dust.methods.multicure import contrastive_weight
from dust.models.deformable import DeformableConv, MultiCURE


def _deformable_and_conv(dims: int) -> tuple[DeformableConv, nn.Module]:
    torch.manual_seed(0)
    deformable = DeformableConv(2, 3, 3, dims)
    plain = (nn.Conv2d, nn.Conv3d)[dims - 2](2, 3, 3, padding=1)
    with torch.no_grad():
        plain.weight.copy_(deformable.weight)
        plain.bias.copy_(deformable.bias)
    return deformable, plain


@pytest.mark.parametrize("dims", [2, 3])
def test_deformable_conv_with_zero_offsets_is_the_plain_convolution(dims):
    deformable, plain = _deformable_and_conv(dims)
    x = torch.randn(2, 2, *(5, 6, 7)[-dims:])
    assert torch.allclose(deformable(x), plain(x), atol=1e-5)  # the offset branch starts at zero


def test_deformable_conv_with_a_constant_integer_offset_is_the_convolution_of_the_shifted_volume():
    deformable, plain = _deformable_and_conv(3)
    x = torch.randn(1, 2, 6, 7, 8)
    shift = (2, -1, 0)  # every tap samples two voxels deeper and one up (not symmetric: the axis order matters)
    offsets = torch.tensor(shift, dtype=torch.float32).repeat(27).view(1, 81, 1, 1, 1).expand(1, 81, 6, 7, 8)
    got = deformable(x, offsets)
    shifted = torch.zeros_like(x)  # shifted[p] = x[p + shift], zeros beyond the volume (grid_sample's padding)
    shifted[:, :, :4, 1:, :] = x[:, :, 2:, :6, :]
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))  # taps inside the grid both ways
    assert torch.allclose(got[inner], plain(shifted)[inner], atol=1e-5)


def test_deformable_conv_is_right_on_an_axis_of_one_voxel():
    deformable, plain = _deformable_and_conv(3)
    x = torch.randn(1, 2, 1, 4, 4)  # a deep decoder level of a thin crop
    assert torch.allclose(deformable(x), plain(x), atol=1e-5)


def test_gradients_reach_the_offsets():
    deformable = DeformableConv(2, 2, 3, 3)
    nn.init.normal_(deformable.offset.weight, std=0.1)  # off the integer grid, where the sampling is differentiable
    deformable(torch.randn(1, 2, 5, 5, 5)).pow(2).sum().backward()
    assert deformable.offset.weight.grad is not None and deformable.offset.weight.grad.abs().sum() > 0


def test_the_branch_attention_sums_to_one_over_the_three_branches():
    module = MultiCURE(4, spatial_dims=3, reduction=2)
    z = torch.randn(2, 4, 4, 6, 6)
    uncertain = (torch.rand(2, 1, 4, 6, 6) > 0.5).float()
    out = module(z, uncertain)
    assert out.shape == z.shape
    attention = module.last_attention
    assert attention.shape == (2, 3, 4) and torch.allclose(attention.sum(1), torch.ones(2, 4))


def test_prototypes_are_the_mean_features_of_the_reliable_voxels_of_each_class():
    features = torch.tensor([[1.0, 3.0, 5.0, 7.0], [0.0, 2.0, 4.0, 10.0]]).view(1, 2, 4)  # (B, D, W): 4 voxels
    classes = torch.tensor([[0, 0, 1, 1]])
    reliable = torch.tensor([[True, True, True, False]])
    prototypes, present = class_prototypes(features, classes, reliable, num_classes=3)
    assert torch.allclose(prototypes, torch.tensor([[2.0, 1.0], [5.0, 4.0], [0.0, 0.0]]))
    assert present.tolist() == [True, True, False]


def test_the_contrastive_loss_is_lower_when_uncertain_features_sit_on_their_own_prototype():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    present = torch.tensor([True, True])
    classes = torch.tensor([[0, 1]])
    uncertain = torch.tensor([[True, True]])
    on_own = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).t().reshape(1, 2, 2)  # voxel 0 at c_0, voxel 1 at c_1
    on_other = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).t().reshape(1, 2, 2)
    own, _ = prototype_contrastive_loss(on_own, classes, uncertain, prototypes, present, temperature=0.5)
    other, separation = prototype_contrastive_loss(on_other, classes, uncertain, prototypes, present, 0.5)
    assert own < other
    assert math.isclose(float(own), math.log(1 + math.exp(-2.0)), rel_tol=1e-5)  # cos 1 vs 0, tau 0.5
    assert math.isclose(float(separation), 0.0, abs_tol=1e-6)  # orthogonal prototypes
    features = on_other.clone().requires_grad_(True)  # the pull moves the uncertain voxels' features
    prototype_contrastive_loss(features, classes, uncertain, prototypes, present, 0.5)[0].backward()
    assert features.grad.abs().sum() > 0


def test_the_contrastive_weight_as_printed_decreases_and_the_option_ramps_up():
    assert math.isclose(contrastive_weight("paper", 0, 100), 0.1 * math.exp(4)) and \
        math.isclose(contrastive_weight("paper", 100, 100), 0.1)
    assert math.isclose(contrastive_weight("rampup", 0, 100), 0.1 * math.exp(-5)) and \
        math.isclose(contrastive_weight("rampup", 100, 100), 0.1)
    with pytest.raises(ConfigError, match="contrastive_schedule"):
        contrastive_weight("cosine", 0, 100)


def test_the_unlabelled_and_contrastive_terms_as_printed_send_gradients_into_both_networks(tiny_cfg_3d):
    trainer = Trainer(tiny_cfg_3d(method="multicure", confidence_threshold=0.9, framework="as_printed"))
    method = trainer.method
    batch = trainer.sampler.next(True)
    losses = method.train_step(batch, iteration=0)
    assert {"sup", "unsup", "contrast"} <= losses.keys()
    # L_u trains both networks (its XOR term); L_c acts on the auxiliary network's decoder features
    for term, names in (("unsup", ("model", "model2")), ("contrast", ("model2",))):
        for name in names:
            net = method.networks[name]
            net.zero_grad()
            losses = method.train_step(batch, iteration=0)
            losses[term].backward()
            grads = [p.grad.abs().sum() for p in net.parameters() if p.grad is not None]
            assert grads and float(sum(grads)) > 0, (term, name)
    deformable = method.networks["model2"].multicure.deformable
    assert deformable.weight.grad is not None and deformable.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("switches", [{}, {"multicure_module": False}, {"contrastive": False},
                                      {"framework": "as_printed", "contrastive_schedule": "paper"}])
def test_multicure_and_its_ablations_lower_the_loss_on_the_3d_phantom(tiny_cfg_3d, switches):
    torch.manual_seed(0)
    trainer = Trainer(tiny_cfg_3d(method="multicure", iterations=30, val_every=30, lr=0.05, augment_rot_flip=False,
                                  **switches))
    trainer.fit()
    log = trainer.train_log
    assert np.mean([r["sup"] for r in log[-5:]]) < np.mean([r["sup"] for r in log[:5]])
    assert ("contrast" in log[-1]) == switches.get("contrastive", True)
    assert all(np.isfinite(v) for r in log for v in r.values())
    has_module = trainer.method.networks["model2"].multicure is not None
    assert has_module == switches.get("multicure_module", True)
