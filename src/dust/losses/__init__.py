"""Losses shared by the methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_loss", "supervised_loss"]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss averaged over all classes (background included), computed over the whole batch.

    This is the Dice term of the paper's Eq. 5 as implemented by SSL4MIS's DiceLoss (softmax, one-hot target).
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    intersect = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    return (1 - (2 * intersect + smooth) / (denom + smooth)).mean()


def supervised_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(Dice + CE) / 2, the supervised loss of the DUST paper (Eq. 5)."""
    return (dice_loss(logits, target) + F.cross_entropy(logits.float(), target.long())) / 2
