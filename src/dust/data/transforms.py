"""2D augmentation applied identically to an image and its (pseudo-)label, and resizing to the patch size.

One affine resampling per sample does rotation and resize together (``grid_sample``: bilinear for images,
nearest for labels), so a training batch costs a handful of small tensor ops instead of SciPy calls per sample.
The random draws come from an explicit ``torch.Generator`` that the sampler saves and restores on resume.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rotation_theta(angle_deg: float, height: int, width: int) -> torch.Tensor:
    """Affine matrix (normalised coordinates) for a rotation in pixel space of a (height, width) image.

    grid_sample works in [-1, 1] coordinates per axis; for a non-square image a rotation in pixel space is
    S^-1 R S with S = diag(W/2, H/2), otherwise the anatomy would be sheared.
    """
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return torch.tensor(
        [[c, -s * height / width, 0.0], [s * width / height, c, 0.0]], dtype=torch.float32
    )


def augment_pair(
    image: torch.Tensor,
    label: torch.Tensor | None,
    patch_size: tuple[int, int],
    generator: torch.Generator,
    rot_flip: bool = True,
    rotate_deg: float = 20.0,
    interpolation: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random rot90 + flip (p=0.5), else a random rotation in ±rotate_deg (p=0.5), resize to patch_size.

    The probabilities are SSL4MIS's RandomGenerator, so baselines see the augmentation they were tuned with.

    image (C, H, W) float, label (H, W) integer or None -> image (C, h, w), label (h, w) int64 or None.
    ``interpolation`` resamples the image (``bilinear``, or ``nearest`` as SSL4MIS's order-0 zoom does);
    labels are always resampled with nearest neighbour.
    """
    if rot_flip and torch.rand((), generator=generator) < 0.5:
        k = int(torch.randint(0, 4, (), generator=generator))
        axis = int(torch.randint(1, 3, (), generator=generator))
        image = torch.flip(torch.rot90(image, k, (1, 2)), (axis,))
        if label is not None:
            label = torch.flip(torch.rot90(label, k, (0, 1)), (axis - 1,))
        angle = 0.0
    elif rotate_deg > 0 and torch.rand((), generator=generator) < 0.5:
        angle = float((torch.rand((), generator=generator) * 2 - 1) * rotate_deg)
    else:
        angle = 0.0
    return _resample(image, label, patch_size, angle, interpolation)


def _resample(
    image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int], angle_deg: float, interpolation: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    h, w = image.shape[-2:]
    if angle_deg == 0.0:
        out = resize_image(image[None], size, interpolation)[0]
        lab = None if label is None else resize_label(label[None], size)[0]
        return out, lab
    theta = _rotation_theta(angle_deg, h, w)[None]
    grid = F.affine_grid(theta, [1, image.shape[0], *size], align_corners=False)
    out = F.grid_sample(image[None].float(), grid, mode=interpolation, padding_mode="zeros", align_corners=False)[0]
    lab = None
    if label is not None:
        lab = F.grid_sample(label[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0].long()
    return out, lab


INTERPOLATIONS = ("bilinear", "nearest")


def resize_image(images: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, h, w), bilinear or nearest (images; probability maps always bilinear)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown image_interpolation {interpolation!r}; choose one of {INTERPOLATIONS}")
    if tuple(images.shape[-2:]) == tuple(size):
        return images.float()
    if interpolation == "nearest":
        return F.interpolate(images.float(), size=tuple(size), mode="nearest")
    return F.interpolate(images.float(), size=tuple(size), mode="bilinear", align_corners=False)


def resize_label(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer -> (B, h, w) int64, nearest neighbour."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
