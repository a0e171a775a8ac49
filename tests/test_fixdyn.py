"""Fixed + dynamic pseudo-label co-training: shifted crops, COM, CutMix, no ground-truth leak, training in 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dust.config import ConfigError
from dust.data.sampler import TwoStreamSampler
from dust.data.transforms import cut_mix, cutmix_box, shifted_window, to_centre_frame
from dust.engine.trainer import Trainer
from dust.methods import fixdyn
from dust.methods.consistency import pseudo_label_forwards
from dust.methods.fixdyn import combine, draw_shifts, temporary_pseudo_label
from dust.models import make_model


def _coordinates(shape: tuple[int, ...]) -> torch.Tensor:
    """A (1, 1, *shape) volume whose value at each voxel is its own flat index: where a value came from is known."""
    return torch.arange(int(np.prod(shape)), dtype=torch.float32).view(1, 1, *shape)


def test_shifted_crops_map_back_onto_the_fixed_crop_voxel_for_voxel():
    patch, margin = (4, 6, 6), (0, 2, 2)
    context = _coordinates(tuple(p + 2 * m for p, m in zip(patch, margin, strict=True)))
    fixed = shifted_window(context, margin, (0, 0, 0), patch)
    assert torch.equal(fixed, context[..., :, 2:8, 2:8])  # the centre of the context crop
    for offset in [(0, 2, 0), (0, -1, 0), (0, 0, 2), (0, 0, -2), (0, 1, -1)]:
        window = shifted_window(context, margin, offset, patch)
        assert torch.equal(window, context[..., :, 2 + offset[1]: 8 + offset[1], 2 + offset[2]: 8 + offset[2]])
        mapped, covered = to_centre_frame(window, offset)
        assert torch.equal(mapped[..., covered], fixed[..., covered])  # the same voxel of the scan, not a neighbour
        expected = torch.zeros(patch, dtype=torch.bool)
        expected[:, max(offset[1], 0): 6 + min(offset[1], 0), max(offset[2], 0): 6 + min(offset[2], 0)] = True
        assert torch.equal(covered, expected) and torch.all(mapped[..., ~covered] == 0)
    with pytest.raises(ValueError, match="leaves the context crop"):
        shifted_window(context, margin, (0, 3, 0), patch)


def test_four_shifts_go_both_ways_along_the_two_in_plane_axes_and_are_redrawn():
    generator = torch.Generator().manual_seed(0)
    draws = [draw_shifts((0, 3, 5), generator) for _ in range(20)]
    for shifts in draws:
        (a, b, c, d) = shifts
        assert a[0] == b[0] == c[0] == d[0] == 0  # the slice axis is never shifted
        assert 1 <= a[1] <= 3 and -3 <= b[1] <= -1 and a[2] == b[2] == 0
        assert 1 <= c[2] <= 5 and -5 <= d[2] <= -1 and c[1] == d[1] == 0
    assert len({tuple(s) for s in draws}) > 1  # dynamic: not the same four crops every iteration


def test_com_takes_the_overlap_from_the_temporary_label_and_the_rest_from_the_fixed_one():
    patch = (1, 4, 4)
    offsets = [(0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    # each shifted crop predicts a constant foreground probability: 0.2, 0.4, 0.6, 0.8
    shifted = [torch.stack([1 - torch.full(patch, v), torch.full(patch, v)])[None] for v in (0.2, 0.4, 0.6, 0.8)]
    temporary, overlap = temporary_pseudo_label(shifted, offsets)
    expected_overlap = torch.zeros(patch, dtype=torch.bool)
    expected_overlap[:, 1:3, 1:3] = True  # every shifted crop covers only the inner 2x2 of the 4x4 crop
    assert torch.equal(overlap, expected_overlap)
    assert torch.allclose(temporary[0, 1][overlap], torch.tensor(0.5))  # the mean of the four
    fixed = torch.stack([torch.ones(patch), torch.zeros(patch)])[None]  # the fixed label: background everywhere
    dynamic = combine(fixed, temporary, overlap)
    assert torch.allclose(dynamic[0, 1][overlap], torch.tensor(0.5))
    assert torch.equal(dynamic[0, 1][~overlap], torch.zeros(int((~overlap).sum())))


def test_cutmix_swaps_the_same_box_in_the_image_and_its_pseudo_label():
    generator = torch.Generator().manual_seed(3)
    box = cutmix_box((4, 6, 6), 0.5, generator)
    assert int(box.sum()) == 2 * 3 * 3  # half of each axis
    images = torch.stack([torch.full((1, 4, 6, 6), 1.0), torch.full((1, 4, 6, 6), 2.0)])  # p, q
    labels = torch.stack([torch.zeros(2, 4, 6, 6), torch.ones(2, 4, 6, 6)])  # (B, C, *spatial) probabilities
    mixed_images, mixed_labels = cut_mix(images, box), cut_mix(labels, box)
    assert torch.all(mixed_images[0, :, box] == 2.0) and torch.all(mixed_images[0, :, ~box] == 1.0)
    assert torch.all(mixed_images[1, :, box] == 1.0) and torch.all(mixed_images[1, :, ~box] == 2.0)
    from_q = mixed_labels[0, 0] == 1.0  # where p's label came from q: exactly where p's image did
    assert torch.equal(from_q, box) and torch.equal(mixed_labels[1, 0] == 0.0, box)


def test_pseudo_labels_never_come_from_labels_of_unlabelled_volumes(tiny_cfg_3d):
    def losses(tamper: bool) -> list[dict]:
        torch.manual_seed(0)
        trainer = Trainer(tiny_cfg_3d(method="fixdyn", iterations=3, val_every=3))
        pool = trainer.data.unlabeled
        if tamper:  # whatever labels the unlabelled pool might carry must not reach the loss
            pool.labels = [torch.ones(img.shape[1:], dtype=torch.uint8) for img in pool.images]
            trainer.sampler.set_pseudo_labels([torch.ones(img.shape[1:], dtype=torch.uint8) for img in pool.images])
        trainer.fit()
        return trainer.train_log

    assert losses(tamper=False) == losses(tamper=True)


@pytest.mark.parametrize("switches", [{}, {"use_dynamic": False}, {"use_fixed": False}, {"cutmix": False},
                                      {"hard_pseudo_labels": False, "confidence_threshold": 0.6}])
def test_fixdyn_and_its_ablations_lower_the_loss_on_the_3d_phantom(tiny_cfg_3d, switches):
    torch.manual_seed(0)
    trainer = Trainer(tiny_cfg_3d(method="fixdyn", iterations=30, val_every=30, lr=0.05, augment_rot_flip=False,
                                  rampup_fraction=0.0, **switches))
    trainer.fit()
    log = trainer.train_log
    assert np.mean([r["sup"] for r in log[-5:]]) < np.mean([r["sup"] for r in log[:5]])
    terms = {"fix"} if switches.get("use_dynamic") is False else {"dyn"} if switches.get("use_fixed") is False \
        else {"fix", "dyn"}
    assert terms <= log[-1].keys() and not ({"fix", "dyn"} - terms) & log[-1].keys()
    assert all(np.isfinite(v) and v >= 0 for r in log for v in r.values())


def test_the_same_file_trains_in_2d_and_refuses_what_it_cannot_do(tiny_cfg):
    trainer = Trainer(tiny_cfg(method="fixdyn", spatial_policy="crop", iterations=4, val_every=4))
    trainer.fit()
    assert trainer.sampler.unlabeled_patch_size == (40, 40)  # 32 + 2 x round(0.125 x 32) on both in-plane axes
    with pytest.raises(ConfigError, match="use_fixed and use_dynamic are both false"):
        Trainer(tiny_cfg(method="fixdyn", spatial_policy="crop", use_fixed=False, use_dynamic=False))
    with pytest.raises(ConfigError, match="needs spatial_policy: crop"):
        Trainer(tiny_cfg(method="fixdyn"))
    with pytest.raises(ConfigError, match="unlabeled_batch_size >= 2"):
        Trainer(tiny_cfg(method="fixdyn", spatial_policy="crop", unlabeled_batch_size=1))


def test_the_centre_of_a_widened_unlabelled_crop_is_the_crop_a_plain_sampler_draws(tiny_cfg_3d):
    trainer = Trainer(tiny_cfg_3d(method="supervised"))
    data, patch = trainer.data, (16, 16, 16)
    plain = TwoStreamSampler(data.labeled, data.unlabeled, 2, 3, patch, seed=7, spatial_policy="crop")
    wide = TwoStreamSampler(data.labeled, data.unlabeled, 2, 3, patch, seed=7, spatial_policy="crop",
                            unlabeled_margin=(0, 3, 5))
    for _ in range(4):
        a, b = plain.next(True)["unlabeled_image"], wide.next(True)["unlabeled_image"]
        assert b.shape[2:] == (16, 22, 26)
        assert torch.equal(shifted_window(b, (0, 3, 5), (0, 0, 0), patch), a)  # same place, same augmentation


def test_pseudo_label_forwards_leave_batchnorm_statistics_alone_and_switch_dropout_off(tiny_cfg_3d):
    net = make_model(tiny_cfg_3d(method="supervised", dropout=[0.0, 0.0, 0.0, 0.0, 0.5]))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad(), pseudo_label_forwards(net):
        first, second = net(x), net(x)
    assert torch.equal(first, second)  # no dropout noise; batch statistics as in training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if "num_batches" not in k)
    assert net.training and all(m.training for m in net.modules())
    with torch.no_grad():
        net(x)  # outside: running statistics move again
    assert not all(torch.equal(before[k], v) for k, v in net.state_dict().items() if "running_mean" in k)


def test_a_training_step_mixes_image_and_pseudo_labels_with_one_box(tiny_cfg_3d, monkeypatch):
    boxes = []

    def recording_cut_mix(batch, box):
        boxes.append(box)
        return torch.where(box.view((1,) * (batch.dim() - box.dim()) + tuple(box.shape)), batch.roll(-1, 0), batch)

    monkeypatch.setattr(fixdyn, "cut_mix", recording_cut_mix)
    trainer = Trainer(tiny_cfg_3d(method="fixdyn"))
    trainer.method.train_step(trainer.sampler.next(True), iteration=0)
    assert len(boxes) == 3  # the image, SN1's fixed and its dynamic pseudo-label
    assert all(b is boxes[0] for b in boxes) and 0 < int(boxes[0].sum()) < boxes[0].numel()


def test_the_pseudo_label_terms_change_what_the_subnets_learn(tiny_cfg_3d):
    def weights(**overrides) -> list[torch.Tensor]:
        torch.manual_seed(0)
        trainer = Trainer(tiny_cfg_3d(method="fixdyn", iterations=4, val_every=4, rampup_fraction=0.0, **overrides))
        trainer.fit()
        return [p.detach().clone() for p in trainer.method.networks["model"].parameters()]

    with_terms, without = weights(), weights(fixed_weight=0.0, dynamic_weight=0.0)
    assert any(not torch.equal(a, b) for a, b in zip(with_terms, without, strict=True))
