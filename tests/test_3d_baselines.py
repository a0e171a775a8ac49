"""The 3D baselines of the LA tables, DTC, MC-Net and MCF: the pieces they are made of, and their training steps.

(That each trains on the 3D phantom and lowers its loss is in tests/test_3d.py; MCF's resume in test_baselines.py.)
"""

from __future__ import annotations

import pytest
import torch

from dust.engine.trainer import Trainer
from dust.losses import difference_review, level_set_to_probability, signed_distance_map
from dust.methods.consistency import sharpen, weaker_subnet
from dust.models import make_model


def test_signed_distance_of_a_tiny_mask_matches_a_hand_computation():
    label = torch.tensor([[[0, 0, 1, 1, 1, 0, 0]]])  # (B=1, 1, 7): foreground at 2..4
    # outside: distances to the foreground 2, 1 (scaled by their max 2); inside: 1, 2, 1 to the background
    # (scaled by 2); the inner boundary (2 and 4) is set to 0
    expected = torch.tensor([1.0, 0.5, 0.0, -1.0, 0.0, 0.5, 1.0])
    sdf = signed_distance_map(label, num_classes=2)
    assert sdf.shape == (1, 1, 1, 7)
    assert torch.allclose(sdf[0, 0, 0], expected)


def test_signed_distance_is_negative_inside_positive_outside_zero_on_the_boundary_in_3d():
    label = torch.zeros(1, 9, 9, 9, dtype=torch.long)
    label[0, 2:7, 2:7, 2:7] = 1
    sdf = signed_distance_map(label, num_classes=2)[0, 0]
    assert sdf[4, 4, 4] == -1.0 and sdf[0, 0, 0] == 1.0
    assert sdf[2, 4, 4] == 0.0 and sdf[4, 6, 4] == 0.0  # boundary voxels of the cube
    assert (sdf[label[0] == 0] > 0).all() and (sdf[3:6, 3:6, 3:6] < 0).all()
    assert (signed_distance_map(torch.zeros(1, 4, 4, dtype=torch.long), 2) == 0).all()  # no foreground


def test_the_level_set_transform_is_a_steep_sigmoid_of_the_negative_distance():
    q = level_set_to_probability(torch.tensor([-0.01, 0.0, 0.01]))
    assert q[1] == 0.5 and q[0] > 0.999 and q[2] < 0.001


def test_sharpening_peaks_the_distribution_and_matches_mc_net_for_two_classes():
    p = torch.tensor([[0.7, 0.3], [0.5, 0.5]]).view(2, 2, 1)
    s = sharpen(p, 0.1)
    p1 = p[:, 0]
    assert torch.allclose(s[:, 0], p1 ** 10 / (p1 ** 10 + (1 - p1) ** 10), atol=1e-6)
    assert torch.allclose(s.sum(1), torch.ones(2, 1)) and s[0, 0] > 0.99 and torch.allclose(s[1], p[1])
    assert torch.allclose(sharpen(p, 1.0), p, atol=1e-6)


def test_difference_review_counts_only_the_voxels_where_the_subnets_disagree():
    target = torch.tensor([[0, 1, 1, 0]])  # (1, 4)
    logits_a = torch.tensor([[[5.0, -5.0, -5.0, 5.0], [-5.0, 5.0, 5.0, -5.0]]])  # predicts 0 1 1 0 (right)
    logits_b = torch.tensor([[[5.0, 5.0, -5.0, -5.0], [-5.0, -5.0, 5.0, 5.0]]])  # predicts 0 0 1 1
    loss_a, loss_b, mask = difference_review(logits_a, logits_b, target)
    assert mask.tolist() == [[0.0, 1.0, 0.0, 1.0]]  # the XOR of the two foreground masks
    # softmax of (5, -5) is (sigmoid(10), sigmoid(-10)): a confident right voxel errs by sigmoid(-10) in each class,
    # a confident wrong one by sigmoid(10)
    right, wrong = torch.sigmoid(torch.tensor(-10.0)) ** 2, torch.sigmoid(torch.tensor(10.0)) ** 2
    assert loss_a == pytest.approx(float(right), abs=1e-7)
    assert loss_b == pytest.approx(float(wrong), rel=1e-5)
    same = difference_review(logits_a, logits_a, target)
    assert same[0] == 0 and same[2].sum() == 0


def test_dcplg_teaches_the_subnet_with_the_higher_supervised_loss(tiny_cfg_3d):
    assert weaker_subnet((torch.tensor(0.2), torch.tensor(0.6))) == 1
    assert weaker_subnet((torch.tensor(0.6), torch.tensor(0.2))) == 0
    trainer = Trainer(tiny_cfg_3d(method="mcf", iterations=4))
    method = trainer.method
    batch = trainer.sampler.next(with_unlabeled=True)
    for net in method.networks.values():
        net.train()
    terms = method.train_step(batch, iteration=3)
    terms["cons"].backward()
    taught = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.networks[k].parameters())
              for k in ("model", "model2")]
    assert sum(taught) == 1  # the pseudo-label carries no gradient: only the weaker subnet learns from it


def test_the_3d_baselines_build_3d_networks_and_mcf_pairs_two_different_subnets():
    cfg = dict(patch_size=[16, 16, 16], model="vnet", in_channels=1, num_classes=2, channels=[4, 8, 16, 32, 64],
               dropout=[0, 0, 0, 0, 0.5], upsample="deconv")
    vnet, resnet = make_model(cfg).eval(), make_model(cfg, model="resnet_vnet").eval()
    x = torch.zeros(1, 1, 16, 16, 16)
    assert vnet(x).shape == resnet(x).shape == (1, 2, 16, 16, 16)
    assert sum(p.numel() for p in resnet.parameters()) > sum(p.numel() for p in vnet.parameters())
    logits, level_set = make_model(cfg, variant="sdf").eval()(x)
    assert logits.shape == (1, 2, 16, 16, 16) and level_set.shape == (1, 1, 16, 16, 16)
    assert level_set.abs().max() < 1
