"""Augmentation applied identically to an image and its (pseudo-)label, in 2D or 3D, and resizing / resampling.

Items are ``(C, *spatial)``; augmentation acts on the last two axes (the in-plane axes of dust's (S, H, W) order),
so a 2D slice and a 3D volume go through the same code. Two spatial policies make a training patch:

- ``resize`` (:func:`augment_pair`): the whole item resized to the patch, SSL4MIS's 2D ACDC pipeline. One affine
  resampling per sample does rotation and resize together (``grid_sample``: linear for images, nearest for labels).
- ``crop`` (:func:`augment_crop`): in-plane rot90 + flip, optional small rotation, pad if smaller than the patch,
  random crop (optionally centred on a foreground voxel), as the left-atrium papers (UA-MT's RandomRotFlip +
  RandomCrop) and nnU-Net do.

The random draws come from an explicit ``torch.Generator`` that the sampler saves and restores on resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dust.data.types import Item, StoredArray, as_tensor, box_overlap

INTERPOLATIONS = ("bilinear", "nearest")


def _rotation_theta(angle_deg: float, height: int, width: int, spatial_dims: int = 2) -> torch.Tensor:
    """Affine matrix (normalised coordinates) for a rotation in the (H, W) plane of an item of size (.., H, W).

    grid_sample works in [-1, 1] coordinates per axis; for a non-square plane a rotation in pixel space is
    S^-1 R S with S = diag(W/2, H/2), otherwise the anatomy would be sheared. In 3D the slice axis is left alone.
    """
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    plane = [[c, -s * height / width], [s * width / height, c]]
    if spatial_dims == 2:
        return torch.tensor([[*plane[0], 0.0], [*plane[1], 0.0]], dtype=torch.float32)
    # affine_grid orders a 3D grid's coordinates (x, y, z) = (W, H, S)
    return torch.tensor([[*plane[0], 0.0, 0.0], [*plane[1], 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float32)


def _rot_flip(image: torch.Tensor, label: torch.Tensor | None, k: int, axis: int):
    """rot90 by k in the (H, W) plane, then a flip along in-plane axis 1 (H) or 2 (W)."""
    image = torch.flip(torch.rot90(image, k, (-2, -1)), (image.dim() - 3 + axis,))
    if label is not None:
        label = torch.flip(torch.rot90(label, k, (-2, -1)), (label.dim() - 3 + axis,))
    return image, label


def augment_pair(
    image: torch.Tensor,
    label: torch.Tensor | None,
    patch_size: Sequence[int],
    generator: torch.Generator,
    rot_flip: bool = True,
    rotate_deg: float = 20.0,
    interpolation: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``resize`` policy: random rot90 + flip (p=0.5), else a random rotation in ±rotate_deg (p=0.5), resize to
    patch_size.

    The probabilities are SSL4MIS's RandomGenerator, so baselines see the augmentation they were tuned with.

    image (C, *spatial) float, label (*spatial) integer or None -> image (C, *patch), label (*patch) int64 or None.
    ``interpolation`` resamples the image (``bilinear``: linear, or ``nearest`` as SSL4MIS's order-0 zoom does);
    labels are always resampled with nearest neighbour.
    """
    if rot_flip and torch.rand((), generator=generator) < 0.5:
        k = int(torch.randint(0, 4, (), generator=generator))
        axis = int(torch.randint(1, 3, (), generator=generator))
        image, label = _rot_flip(image, label, k, axis)
        angle = 0.0
    elif rotate_deg > 0 and torch.rand((), generator=generator) < 0.5:
        angle = float((torch.rand((), generator=generator) * 2 - 1) * rotate_deg)
    else:
        angle = 0.0
    return _resample(image, label, tuple(patch_size), angle, interpolation)


def _resample(
    image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, ...], angle_deg: float, interpolation: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate by ``angle_deg`` in the (H, W) plane and resample to ``size`` in one ``grid_sample``."""
    h, w = image.shape[-2:]
    if angle_deg == 0.0:
        out = resize_image(image[None], size, interpolation)[0]
        lab = None if label is None else resize_label(label[None], size)[0]
        return out, lab
    theta = _rotation_theta(angle_deg, h, w, len(size))[None]
    grid = F.affine_grid(theta, [1, image.shape[0], *size], align_corners=False)
    out = F.grid_sample(image[None].float(), grid, mode=interpolation, padding_mode="zeros", align_corners=False)[0]
    lab = None
    if label is not None:
        lab = F.grid_sample(label[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0].long()
    return out, lab


def augment_crop(
    image: Item,
    label: Item | None,
    patch_size: Sequence[int],
    generator: torch.Generator,
    rot_flip: bool = True,
    rotate_deg: float = 0.0,
    interpolation: str = "bilinear",
    foreground_oversample: float = 0.0,
    margin: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``crop`` policy: rot90 by a random k and a flip along a random in-plane axis (always, as UA-MT's
    RandomRotFlip), a rotation in ±rotate_deg (p=0.5, when rotate_deg > 0), zero padding to at least the patch,
    then a random crop of ``patch_size``.

    With ``margin`` the item is first zero-padded by the margin on both sides of each axis and ``patch_size`` is the
    patch plus twice the margin: the crop's centre patch is then placed exactly as a plain crop of the patch would
    be, and the margin holds the item's neighbourhood (or zeros beyond its edge).

    With ``foreground_oversample`` p and a label holding foreground, a share p of crops is centred on a random
    foreground voxel (clamped to the item), as nnU-Net oversamples foreground; the others start uniformly.
    image (C, *spatial), label (*spatial) or None -> image (C, *patch), label (*patch) int64 or None.

    Only the crop is read: the window is planned on the rotated, flipped and padded item's shape and mapped back
    onto the item, so an item stored on disk (:class:`~dust.data.types.StoredArray`) is read one box at a time, with
    the same draws and the same result as an item in memory. A small rotation resamples the whole plane, so with
    one the item is read whole.
    """
    k = axis = 0
    if rot_flip:
        k = int(torch.randint(0, 4, (), generator=generator))
        axis = int(torch.randint(1, 3, (), generator=generator))
    if rotate_deg > 0 and torch.rand((), generator=generator) < 0.5:
        angle = float((torch.rand((), generator=generator) * 2 - 1) * rotate_deg)
        image, label = as_tensor(image), None if label is None else as_tensor(label)
        if rot_flip:
            image, label = _rot_flip(image, label, k, axis)
        image, label = _resample(image, label, tuple(image.shape[1:]), angle, interpolation)
        k = axis = 0  # done
    plan = _InPlane(tuple(image.shape[1:]), k, axis)
    margin = tuple(margin) if margin is not None else (0,) * len(patch_size)
    # the item's spatial shape after rot90, margin and padding to the patch, and where the item starts in it
    rotated = plan.rotated_shape
    size = [max(s + 2 * m, p) for s, m, p in zip(rotated, margin, patch_size, strict=True)]
    offset = [m + max(p - s - 2 * m, 0) // 2 for s, m, p in zip(rotated, margin, patch_size, strict=True)]
    centre = None
    if label is not None and foreground_oversample > 0 and torch.rand((), generator=generator) < foreground_oversample:
        foreground = plan.foreground(label, offset)
        if len(foreground):
            centre = foreground[int(torch.randint(0, len(foreground), (), generator=generator))].tolist()
    if centre is None:
        starts = [int(torch.randint(0, s - p + 1, (), generator=generator)) for s, p in zip(size, patch_size,
                                                                                              strict=True)]
    else:
        starts = [min(max(c - p // 2, 0), s - p) for c, s, p in zip(centre, size, patch_size, strict=True)]
    window = [(b - o, b - o + p) for b, o, p in zip(starts, offset, patch_size, strict=True)]
    out = plan.window(image, window).contiguous().float()
    return out, None if label is None else plan.window(label, window).contiguous().long()


class _InPlane:
    """rot90 by ``k`` in the (H, W) plane then a flip along in-plane axis ``flip`` (1: H, 2: W; 0: none), as
    coordinate maps, so a window of the rotated item is read as a box of the item and rotated alone."""

    def __init__(self, spatial: tuple[int, ...], k: int, flip: int) -> None:
        self.spatial, self.k, self.flip = spatial, k % 4, flip
        h, w = spatial[-2:]
        self.rotated_shape = (*spatial[:-2], *((w, h) if self.k % 2 else (h, w)))

    def _to_item(self, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rotated-frame in-plane coordinates -> the item's (torch.rot90's definition, flip undone first)."""
        h, w = self.spatial[-2:]
        n0, n1 = self.rotated_shape[-2:]
        i, j = (n0 - 1 - i if self.flip == 1 else i), (n1 - 1 - j if self.flip == 2 else j)
        return {0: (i, j), 1: (j, w - 1 - i), 2: (h - 1 - i, w - 1 - j), 3: (h - 1 - j, i)}[self.k]

    def _to_rotated(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.spatial[-2:]
        n0, n1 = self.rotated_shape[-2:]
        i, j = {0: (a, b), 1: (w - 1 - b, a), 2: (h - 1 - a, w - 1 - b), 3: (b, h - 1 - a)}[self.k]
        return (n0 - 1 - i if self.flip == 1 else i), (n1 - 1 - j if self.flip == 2 else j)

    def window(self, item: Item, window: list[tuple[int, int]]) -> torch.Tensor:
        """The box ``window`` ([start, stop) per spatial axis, in the rotated frame, zeros beyond the item)."""
        (i0, i1), (j0, j1) = window[-2:]
        a, b = self._to_item(np.array([i0, i1 - 1]), np.array([j0, j1 - 1]))
        box = [*(slice(lo, hi) for lo, hi in window[:-2]), slice(int(a.min()), int(a.max()) + 1),
               slice(int(b.min()), int(b.max()) + 1)]
        if isinstance(item, StoredArray):
            part = item.read(tuple(box))
        else:
            part = _zero_filled_box(item, box)
        part = torch.rot90(part, self.k, (-2, -1)) if self.k else part
        return torch.flip(part, (part.dim() - 3 + self.flip,)) if self.flip else part

    def foreground(self, label: Item, offset: list[int]) -> np.ndarray:
        """Labelled voxels in the rotated, padded frame, in the order ``torch.nonzero`` lists them there."""
        if isinstance(label, StoredArray):
            coords = label.foreground if label.foreground is not None else torch.nonzero(label.load() > 0).numpy()
        else:
            coords = torch.nonzero(label > 0).numpy()
        coords = np.array(coords, dtype=np.int64).reshape(-1, len(self.spatial))
        if not len(coords):
            return coords
        i, j = self._to_rotated(coords[:, -2], coords[:, -1])
        coords = np.concatenate([coords[:, :-2], i[:, None], j[:, None]], axis=1) + np.asarray(offset)
        return coords[np.lexsort(coords.T[::-1])]


def _zero_filled_box(array: torch.Tensor, box: list[slice]) -> torch.Tensor:
    """``array[..., box]`` with zeros where the box leaves the array."""
    lead = array.dim() - len(box)
    inside, target = box_overlap(box, tuple(array.shape[lead:]))
    if inside is not None and inside == tuple(box):
        return array[(Ellipsis, *box)]
    out = array.new_zeros((*array.shape[:lead], *(b.stop - b.start for b in box)))
    if inside is not None:
        out[(Ellipsis, *target)] = array[(Ellipsis, *inside)]
    return out


def pad_to(image: torch.Tensor, label: torch.Tensor | None, size: Sequence[int]):
    """Zero-pad (C, *spatial) and (*spatial) symmetrically to at least ``size`` per axis (label: background)."""
    missing = [max(p - s, 0) for s, p in zip(image.shape[1:], size, strict=True)]
    if not any(missing):
        return image, label
    pads = [v for m in reversed(missing) for v in (m // 2, m - m // 2)]  # F.pad: last axis first
    image = F.pad(image, pads)
    return image, None if label is None else F.pad(label, pads)


def _linear(size: Sequence[int]) -> str:
    return {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]


def resize_image(images: torch.Tensor, size: Sequence[int], interpolation: str = "bilinear") -> torch.Tensor:
    """(B, C, *spatial) -> (B, C, *size), linear (``bilinear``: bi- or trilinear) or ``nearest``."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown image_interpolation {interpolation!r}; choose one of {INTERPOLATIONS}")
    if tuple(images.shape[2:]) == tuple(size):
        return images.float()
    if interpolation == "nearest":
        return F.interpolate(images.float(), size=tuple(size), mode="nearest")
    return F.interpolate(images.float(), size=tuple(size), mode=_linear(size), align_corners=False)


def resize_label(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, *spatial) integer -> (B, *size) int64, nearest neighbour."""
    if tuple(labels.shape[1:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def resampled_shape(shape: Sequence[int], factor: float) -> tuple[int, ...]:
    """The grid a case of ``shape`` is trained on at ``resample_factor`` (at least one voxel per axis)."""
    return tuple(max(1, round(s * factor)) for s in shape)


# ---------------------------------------------------------------------------------------------- batch-level mixing
def shifted_window(context: torch.Tensor, margin: Sequence[int], offset: Sequence[int],
                   patch_size: Sequence[int]) -> torch.Tensor:
    """The window of ``patch_size`` at ``offset`` from the centre patch of a context crop (B, C, *(patch + 2 *
    margin)), the sampler's crop with ``unlabeled_margin``. Offset 0 on every axis is the centre ("fixed") patch."""
    if any(abs(o) > m for o, m in zip(offset, margin, strict=True)):
        raise ValueError(f"offset {tuple(offset)} leaves the context crop (margin {tuple(margin)})")
    window = tuple(slice(m + o, m + o + p) for m, o, p in zip(margin, offset, patch_size, strict=True))
    return context[(slice(None), slice(None), *window)]


def to_centre_frame(window_values: torch.Tensor, offset: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Map values (B, C, *patch) of the window at ``offset`` onto the centre patch's voxel grid.

    Centre voxel j sits at window voxel j - offset. Returns ``(values, covered)``: values (B, C, *patch), zero where
    the window does not reach, and the boolean mask (*patch) of the centre voxels the window covers."""
    patch = window_values.shape[2:]
    mapped = torch.zeros_like(window_values)
    covered = torch.zeros(patch, dtype=torch.bool, device=window_values.device)
    centre, source = [], []
    for o, p in zip(offset, patch, strict=True):  # centre coordinates [max(o, 0), min(p, p + o)) are covered
        centre.append(slice(max(o, 0), min(p, p + o)))
        source.append(slice(max(o, 0) - o, min(p, p + o) - o))
    mapped[(slice(None), slice(None), *centre)] = window_values[(slice(None), slice(None), *source)]
    covered[tuple(centre)] = True
    return mapped, covered


def cutmix_box(spatial: Sequence[int], fraction: float, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """A boolean box mask (*spatial) of ``round(fraction * size)`` voxels along each axis at a random position."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"cutmix box fraction must be in (0, 1], got {fraction}")
    mask = torch.zeros(tuple(spatial), dtype=torch.bool, device=device)
    box = []
    for size in spatial:
        length = max(1, round(fraction * size))
        start = int(torch.randint(0, size - length + 1, (), generator=generator))
        box.append(slice(start, start + length))
    mask[tuple(box)] = True
    return mask


def cut_mix(batch: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """CUT(.): inside ``box`` each sample takes the next sample's content (sample i from i + 1, the last from the
    first), so with two samples p and q the box is swapped between them. Works on images (B, C, *spatial) and on
    labels or probabilities of the same layout, so an image and its pseudo-label are mixed identically."""
    box = box.view((1,) * (batch.dim() - box.dim()) + tuple(box.shape))
    return torch.where(box, batch.roll(-1, dims=0), batch)


# ---------------------------------------------------------------------------------------------- spacing
# nnU-Net's rule: a case whose coarsest voxel axis is more than 3x its finest is resampled in-plane only along the
# other axes, and with nearest neighbour across the coarse axis, so thick slices are not blurred into each other.
ANISOTROPY_RATIO = 3.0


def separate_axis(spacing: Sequence[float]) -> int | None:
    """The coarse axis resampled on its own (nearest), or None when the case is close enough to isotropic."""
    spacing = [float(s) for s in spacing]
    return int(np.argmax(spacing)) if max(spacing) > ANISOTROPY_RATIO * min(spacing) else None


def spacing_grid(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The grid of a case of ``shape`` at ``spacing`` resampled to ``target`` spacing (at least one voxel per axis)."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True))


def resample_to(x: torch.Tensor, size: Sequence[int], separate: int | None = None) -> torch.Tensor:
    """(B, C, *spatial) float -> (B, C, *size): linear, or, with ``separate`` (a spatial axis), linear across the
    other axes and nearest along that one. The one resampling of images and probabilities between a case's grid
    and a planned spacing (``dust prepare --dims 3``, evaluation, ``dust predict``)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x.float()
    if separate is None or x.dim() != 5:
        return resize_image(x, size, "bilinear")
    axis = 2 + separate
    moved = x.float().movedim(axis, 2)  # (B, C, D, P, Q): D the coarse axis
    plane = [s for i, s in enumerate(size) if i != separate]
    b, c, d = moved.shape[:3]
    flat = F.interpolate(moved.reshape(b, c * d, *moved.shape[3:]), size=tuple(plane), mode="bilinear",
                         align_corners=False).reshape(b, c, d, *plane)
    # nearest-exact: centre-aligned as the linear resampling is ("nearest" would shift a round trip by a slice)
    flat = F.interpolate(flat, size=(size[separate], *plane), mode="nearest-exact")
    return flat.movedim(2, axis).contiguous()


def resample_label_to(label: torch.Tensor, size: Sequence[int], separate: int | None = None) -> torch.Tensor:
    """(*spatial) integer -> (*size) uint8: each class present resampled as a mask with :func:`resample_to`, the
    class of largest value kept (nnU-Net's way), so boundaries are smooth and no class is invented."""
    size = tuple(int(s) for s in size)
    if tuple(label.shape) == size:
        return label.to(torch.uint8)
    best = torch.full(size, -1.0)
    out = torch.zeros(size, dtype=torch.uint8)
    for value in torch.unique(label).tolist():
        mask = resample_to((label == value).float()[None, None], size, separate)[0, 0]
        better = mask > best
        out[better], best = value, torch.where(better, mask, best)
    return out
