"""Losses shared by the methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dust.uncertainty.pixel import decoder_kl

__all__ = ["dice_loss", "supervised_loss", "uncertainty_rectified_loss"]


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
