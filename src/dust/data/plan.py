"""Planning a 3D dataset, as nnU-Net v2 plans one (its code read for the rules, not copied): target spacing, the
CT intensity statistics, and a patch that fits a budget and the network's downsampling.

- **Target spacing**: the median spacing of the training cases per axis. Where the data are anisotropic (the
  median's coarsest axis over 3x its finest, and few voxels along it), the coarse axis takes the 10th percentile
  of the cases' spacing along it instead, so that thick-slice cases are not made coarser still (nnU-Net's rule).
- **CT statistics** (``--norm ct``): the foreground voxels (label > 0) of the labelled training cases, sampled
  (10,000 per case, seeded); clip to their 0.5 / 99.5 percentiles (or a fixed ``--window``), then z-score with
  their mean / std (nnU-Net's CTNormalization). One Hounsfield value then maps to one input value in every scan.
- **Patch**: from the median shape at the target spacing, rounded up to the network's step (2**levels-1), then
  the axis that is largest relative to the median shape is shrunk by one step until the patch holds at most
  ``patch_voxels`` voxels (the memory budget; 32 x 64 x 64 = 131,072 by default, the LA CPU protocol's patch).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from dust.data.transforms import ANISOTROPY_RATIO  # one anisotropy rule for planning and resampling

log = logging.getLogger("dust")

SAMPLES_PER_CASE = 10_000
DEFAULT_PATCH_VOXELS = 32 * 64 * 64


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> list[float]:
    """The planned spacing per axis from the training cases' spacings and shapes (same axis order)."""
    spacing = np.asarray(spacings, dtype=np.float64)
    shape = np.asarray(shapes, dtype=np.float64)
    target = np.median(spacing, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != coarse]
    median_shape = np.median(shape * spacing / target, axis=0)
    anisotropic = target[coarse] > ANISOTROPY_RATIO * min(target[others])
    few_slices = median_shape[coarse] * ANISOTROPY_RATIO < min(median_shape[others])
    if anisotropic and few_slices:
        # never finer than the coarsest other axis (nnU-Net's rule, its + 1e-5 included)
        target[coarse] = max(float(np.percentile(spacing[:, coarse], 10)), float(max(target[others])) + 1e-5)
    return [round(float(t), 6) for t in target]


def outlier_spacings(case_ids: Sequence[str], spacings: Sequence[Sequence[float]], factor: float = 1.5) -> list[str]:
    """Cases whose spacing differs from the median by more than ``factor`` along an axis (said once, not refused:
    they are resampled like the others)."""
    median = np.median(np.asarray(spacings, dtype=np.float64), axis=0)
    out = []
    for cid, sp in zip(case_ids, spacings, strict=True):
        ratio = np.asarray(sp, dtype=np.float64) / median
        if np.any(ratio > factor) or np.any(ratio < 1 / factor):
            out.append(f"{cid} ({[round(float(s), 3) for s in sp]} mm)")
    return out


def sample_foreground(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to SAMPLES_PER_CASE intensities (C, N) of the voxels where ``label`` > 0, for the CT statistics."""
    index = np.flatnonzero(label.reshape(-1) > 0)
    if len(index) > SAMPLES_PER_CASE:
        index = np.sort(rng.choice(index, SAMPLES_PER_CASE, replace=False))
    return image.reshape(len(image), -1)[:, index]


def ct_statistics(samples: Sequence[np.ndarray], window: Sequence[float] | None) -> list[dict[str, float]]:
    """Per channel ``{low, high, mean, std}`` from foreground samples (each (C, N)); ``window`` fixes low / high."""
    values = np.concatenate([s for s in samples if s.size], axis=1) if any(s.size for s in samples) else None
    if values is None:
        raise ValueError("--norm ct: no labelled foreground voxel among the training cases to take the intensity "
                         "statistics from (nnU-Net's CT normalisation uses the foreground); use --norm zscore")
    stats = []
    for channel in values:
        low, high = (float(window[0]), float(window[1])) if window else (
            float(np.percentile(channel, 0.5)), float(np.percentile(channel, 99.5)))
        std = float(channel.std())  # of the foreground as it is (nnU-Net's), the clip comes on top
        stats.append({"low": low, "high": high, "mean": float(channel.mean()), "std": std if std > 0 else 1.0})
    return stats


def plan_patch(median_shape: Sequence[float], step: int = 16, patch_voxels: int = DEFAULT_PATCH_VOXELS) -> list[int]:
    """A patch (S, H, W) from the median shape at the target spacing: multiples of ``step``, at most
    ``patch_voxels`` voxels, shrinking the axis that exceeds the median shape most."""
    median = [max(float(m), 1.0) for m in median_shape]
    patch = [max(step, int(np.ceil(m / step)) * step) for m in median]
    while int(np.prod(patch)) > patch_voxels:
        shrinkable = [a for a in range(len(patch)) if patch[a] > step]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: (patch[a] / median[a], patch[a]))
        patch[axis] -= step
    return patch
