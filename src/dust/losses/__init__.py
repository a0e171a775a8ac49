"""Losses shared by the methods."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dust.uncertainty.pixel import decoder_kl

__all__ = ["dice_loss", "supervised_loss", "uncertainty_rectified_loss", "signed_distance_map",
           "level_set_to_probability", "masked_supervised_loss", "class_prototypes", "prototype_contrastive_loss"]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
              mask: torch.Tensor | None = None, include_background: bool = True,
              squared: bool = True) -> torch.Tensor:
    """Soft Dice loss averaged over the classes, computed over the whole batch.

    With the defaults, the Dice term of the paper's Eq. 5 as SSL4MIS's DiceLoss implements it (softmax, one-hot
    target, background included, squared denominator). ``include_background=False`` averages over the foreground
    classes only (UA-MT's and MC-Net's LA Dice, on the foreground channel); ``squared=False`` sums probabilities
    instead of their squares in the denominator (MC-Net's ``Binary_dice_loss``). ``mask`` (B, *spatial), if given,
    keeps only the voxels where it is true (e.g. confident pseudo-labels).
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    if mask is not None:
        keep = mask[:, None].to(probs.dtype)
        probs, onehot = probs * keep, onehot * keep
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = (0, *range(2, probs.dim()))  # the batch and every spatial axis: one Dice per class
    intersect = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims) if squared else probs.sum(dims) + onehot.sum(dims)
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


def masked_supervised_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                           smooth: float = 1e-5) -> torch.Tensor:
    """CE + soft Dice (as :func:`dice_loss`, all classes) over the voxels where ``mask`` (B, *spatial) is true: the
    pseudo-label loss of methods that keep only confident voxels. 0 when the mask is empty."""
    keep = mask.float()
    if keep.sum() == 0:
        return logits.sum() * 0.0  # keeps the graph (and a gradient of 0) when no voxel is confident
    ce = (F.cross_entropy(logits.float(), target.long(), reduction="none") * keep).sum() / keep.sum()
    return ce + dice_loss(logits, target, smooth, mask)


def class_prototypes(features: torch.Tensor, classes: torch.Tensor, reliable: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MultiCURE Eq. 4: c_k = mean feature (B, D, *spatial) of the reliable voxels of class k. Returns
    ``(prototypes (K, D), present (K,) bool)``; a class without reliable voxels has a zero row and present False."""
    flat = features.movedim(1, -1).reshape(-1, features.shape[1]).float()
    onehot = F.one_hot(classes.reshape(-1).long(), num_classes).float() * reliable.reshape(-1, 1).float()
    counts = onehot.sum(0)
    prototypes = (onehot.t() @ flat) / counts.clamp_min(1.0)[:, None]
    return prototypes, counts > 0


def prototype_contrastive_loss(features: torch.Tensor, classes: torch.Tensor, uncertain: torch.Tensor,
                               prototypes: torch.Tensor, present: torch.Tensor,
                               temperature: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """MultiCURE Eq. 5 and its prototype-separation term: ``(pull, separation)``.

    pull: the uncertain voxels' features (B, D, *spatial) against the class prototypes by cosine similarity / tau,
    cross-entropy towards their own class ``classes`` (B, *spatial), averaged per class over its uncertain voxels
    and then over classes (the 1/|S_k| of Eq. 5). Departure: Eq. 5's denominator sums over j != k only, which makes
    the term the similarity gap (linear, unbounded in tau, negative once a voxel is nearer its own prototype); dust
    keeps k in the denominator (the InfoNCE form: a log-probability, >= 0). The prototypes are not moved by this
    term (detached: uncertain voxels go to the reliable ones, not the reverse).
    separation: the mean cosine similarity between the present prototypes (pushes class clusters apart; it does move
    the prototypes, hence the reliable features). Both are 0 when there is nothing to compare.
    """
    zero = features.sum() * 0.0
    flat = F.normalize(features.movedim(1, -1).reshape(-1, features.shape[1]).float(), dim=1)
    protos = F.normalize(prototypes.float(), dim=1)
    labels, pick = classes.reshape(-1).long(), uncertain.reshape(-1) & present[classes.reshape(-1).long()]
    pull = zero
    if pick.any() and int(present.sum()) >= 2:
        logits = flat[pick] @ protos.detach().t() / temperature
        logits = logits.masked_fill(~present[None], float("-inf"))  # absent classes are no alternative
        per_voxel = F.cross_entropy(logits, labels[pick], reduction="none")
        per_class = [per_voxel[labels[pick] == k].mean() for k in labels[pick].unique()]
        pull = torch.stack(per_class).mean()
    separation = zero
    if int(present.sum()) >= 2:
        p = protos[present]
        sim = p @ p.t()
        off_diagonal = ~torch.eye(len(p), dtype=torch.bool, device=p.device)
        separation = sim[off_diagonal].mean()
    return pull, separation


def difference_review(logits_a: torch.Tensor, logits_b: torch.Tensor,
                      target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MCF's contrastive difference review (CDR) on labelled crops: ``(loss_a, loss_b, disagreement mask)``; each
    loss is the squared error between that subnet's softmax and the one-hot target, averaged over the classes and
    over the voxels where the two subnets' argmax labels differ (0 where they agree everywhere)."""
    disagree = (logits_a.argmax(1) != logits_b.argmax(1)).float()
    onehot = F.one_hot(target.long(), logits_a.shape[1]).movedim(-1, 1).float()

    def masked(logits: torch.Tensor) -> torch.Tensor:
        error = (torch.softmax(logits.float(), 1) - onehot).pow(2).mean(1)
        return (disagree * error).sum() / (disagree.sum() + 1e-16)

    return masked(logits_a), masked(logits_b), disagree
