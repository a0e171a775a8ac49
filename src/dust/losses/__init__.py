"""Losses shared by the methods."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dust.uncertainty.pixel import decoder_kl

__all__ = ["dice_loss", "supervised_loss", "uncertainty_rectified_loss", "signed_distance_map",
           "level_set_to_probability"]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss averaged over all classes (background included), computed over the whole batch.

    This is the Dice term of the paper's Eq. 5 as implemented by SSL4MIS's DiceLoss (softmax, one-hot target).
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, probs.dim()))  # the batch and every spatial axis: one Dice per class
    intersect = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    return (1 - (2 * intersect + smooth) / (denom + smooth)).mean()


def supervised_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(Dice + CE) / 2, the supervised loss of the DUST paper (Eq. 5)."""
    return (dice_loss(logits, target) + F.cross_entropy(logits.float(), target.long())) / 2


def uncertainty_rectified_loss(
    main_logits: torch.Tensor, aux_logits: torch.Tensor, pseudo_label: torch.Tensor, detach_weight: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """DUST's UNRC loss (Eq. 4): mean over pixels of exp(-D_kl) * CE(main, pseudo-label) + D_kl.

    D_kl is the decoder disagreement of Eq. 2, from the main decoder to the auxiliary one. Returns the loss
    and the D_kl map (B, *spatial) (detached, for logging). As written, the gradient also flows through the
    weight exp(-D_kl); ``detach_weight`` stops it there (see the DUST method's ``detach_uncertainty_weight``).
    """
    dkl = decoder_kl(main_logits, aux_logits)
    ce = F.cross_entropy(main_logits.float(), pseudo_label.long(), reduction="none")
    weight = torch.exp(-(dkl.detach() if detach_weight else dkl))
    return (weight * ce + dkl).mean(), dkl.detach()


def _normalised_signed_distance(mask: np.ndarray) -> np.ndarray:
    """DTC's SDF of one boolean mask: (d_out - min) / (max - min) - (d_in - min) / (max - min), 0 on the inner
    boundary; d_in is the Euclidean distance of a foreground voxel to the background, d_out of a background voxel to
    the foreground. In [-1, 1]: negative inside, positive outside; all zeros when the mask is empty."""
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    inside, outside = ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask)

    def scaled(d: np.ndarray) -> np.ndarray:
        span = d.max() - d.min()
        return (d - d.min()) / span if span > 0 else np.zeros_like(d)

    sdf = scaled(outside) - scaled(inside)
    boundary = mask & ~ndimage.binary_erosion(mask, border_value=1)  # foreground voxels touching the background
    sdf[boundary] = 0.0
    return sdf.astype(np.float32)


def signed_distance_map(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *spatial) integer labels -> (B, num_classes - 1, *spatial) normalised signed distance of each foreground
    class, one image at a time (DTC's ``compute_sdf``, on the crops the network sees)."""
    maps = [[_normalised_signed_distance(y == c) for c in range(1, num_classes)] for y in labels.cpu().numpy()]
    return torch.from_numpy(np.asarray(maps, np.float32)).to(labels.device)


def level_set_to_probability(sdf: torch.Tensor, k: float = 1500.0) -> torch.Tensor:
    """DTC's transform from the level-set head to a foreground probability: sigmoid(-k * sdf) (k = 1500)."""
    return torch.sigmoid(-k * sdf.float())
