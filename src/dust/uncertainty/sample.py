"""Sample-level uncertainty (DUST Eq. 1) and the easy-to-hard split of the unlabelled pool."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SAMPLE_UNCERTAINTY_REGIONS = ("image", "foreground")  # where Eq. 1 averages; see sample_uncertainty


def sample_uncertainty(
    probs_per_checkpoint: Sequence[torch.Tensor] | torch.Tensor, region: str = "image"
) -> torch.Tensor:
    """Eq. 1: sum_{i<K} mean[(F_i(x) - F_K(x))^2] / (K - 1) for each image.

    ``probs_per_checkpoint``: K softmax outputs (N, C, *spatial) of checkpoints saved in pre-training order
    (a sequence, or one tensor (K, N, C, *spatial)), slices or volumes; the last one is the reference F_K.
    Returns (N,) float32.

    ``region="image"`` (the paper): the mean runs over all C x pixels (voxels) entries, as the equation is written
    (summing over classes instead would only rescale by C and leave the ranking unchanged). ``region="foreground"``: the
    mean runs over the pixels that some checkpoint labels foreground (argmax != 0). Over the whole image, a
    slice with small structures (apex, base) scores low because its background agrees, so it ranks "easy"
    while its labels are the worst of the pool (docs/results/analysis.md, "The sample-uncertainty ranking is upside
    down on ACDC"); a slice that no checkpoint labels
    foreground gives no evidence at all and scores ``inf`` (ranked last).
    """
    probs = torch.stack(list(probs_per_checkpoint)) if not torch.is_tensor(probs_per_checkpoint) \
        else probs_per_checkpoint
    if probs.dim() < 4 or probs.shape[0] < 2:
        raise ValueError(f"need K >= 2 checkpoints of (N, C, *spatial) probabilities, got shape {tuple(probs.shape)}")
    probs = probs.float()
    sq = (probs[:-1] - probs[-1:]).pow(2).mean(0)  # (N, C, *spatial), averaged over the K - 1 pairs
    if region == "image":
        return sq.flatten(1).mean(1)
    if region not in SAMPLE_UNCERTAINTY_REGIONS:
        raise ValueError(f"sample uncertainty region must be one of {SAMPLE_UNCERTAINTY_REGIONS}, got {region!r}")
    foreground = (probs.argmax(2) != 0).any(0).flatten(1)  # (N, pixels): foreground for some checkpoint
    per_pixel = sq.mean(1).flatten(1)  # (N, pixels)
    pixels = foreground.sum(1)
    mean = (per_pixel * foreground).sum(1) / pixels.clamp_min(1)
    return torch.where(pixels > 0, mean, torch.full_like(mean, float("inf")))


def split_by_uncertainty(
    uncertainty: torch.Tensor, reliable_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort ascending; the first ``reliable_fraction`` of the pool is reliable, the rest unreliable.

    Returns ``(order, reliable, unreliable)`` as int64 index tensors into the pool. The sort is stable, so
    ties keep pool order and the split is reproducible. At least one sample is reliable.
    """
    if not 0.0 < reliable_fraction <= 1.0:
        raise ValueError(f"reliable_fraction must be in (0, 1], got {reliable_fraction}")
    order = torch.sort(uncertainty, stable=True).indices
    n_reliable = min(len(order), max(1, round(reliable_fraction * len(order))))
    return order, order[:n_reliable], order[n_reliable:]
