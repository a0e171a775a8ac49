"""ST++'s strong augmentation (Yang et al., CVPR 2022) for single-channel slices, applied to a batch tensor.

Per image, as ST++'s ``semi_train`` transform (after the geometric augmentation the sampler already did):
- p = 0.8: colour jitter, which for one channel is brightness and contrast, each a factor in [0.5, 1.5], in
  random order (torchvision's ColorJitter(0.5, 0.5, 0.5, 0.25); saturation, hue and RandomGrayscale do nothing to
  a grey image);
- p = 0.5: Gaussian blur, sigma in [0.1, 2.0];
- p = 0.5: cutout of a rectangle of 2-40% of the image with aspect ratio in [0.3, 1/0.3], filled with uniform
  noise over the image's intensity range; its pixels get ``IGNORE_INDEX`` in the label (no loss there).
Intensities stay within each image's own [min, max] (ST++ clips to the 8-bit range; dust assumes no range).
Random numbers come from ``generator`` (default: torch's global one, which checkpoints save and restore).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255  # label of cut-out pixels; pass it to cross_entropy(ignore_index=...)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, *spatial) blurred with a separable Gaussian of std ``sigma`` along every spatial axis (kernel
    2 * ceil(3 sigma) + 1, reflect pad), 2D or 3D."""
    dims = image.dim() - 1
    radius = min(math.ceil(3 * sigma), min(image.shape[1:]) - 1)
    taps = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.pad(image[:, None], (radius,) * (2 * dims), mode="reflect")  # channels as batch
    convolve = F.conv2d if dims == 2 else F.conv3d
    for axis in range(dims - 1, -1, -1):  # the last axis first
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = -1
        x = convolve(x, kernel.view(shape))
    return x[:, 0]


def _cutout_box(height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """(y, x, h, w) of a rectangle inside the image, drawn as ST++ does (rejection until it fits)."""
    while True:
        area = _uniform(0.02, 0.4, generator) * height * width
        ratio = _uniform(0.3, 1 / 0.3, generator)
        h, w = int(math.sqrt(area * ratio)), int(math.sqrt(area / ratio))
        y = int(torch.randint(0, height, (), generator=generator))
        x = int(torch.randint(0, width, (), generator=generator))
        if y + h <= height and x + w <= width:
            return y, x, h, w


def strong_augment(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, C, *spatial), labels (B, *spatial) -> strongly augmented float32 images, int64 labels (new
    tensors). The cutout is a box in the (H, W) plane, through every slice of a volume."""
    with torch.autocast(images.device.type, enabled=False):
        images, labels = images.float().clone(), labels.long().clone()
        for b in range(len(images)):
            img = images[b]
            low, high = float(img.min()), float(img.max())
            if torch.rand((), generator=generator) < 0.8:
                factors = {"brightness": _uniform(0.5, 1.5, generator), "contrast": _uniform(0.5, 1.5, generator)}
                for name in [list(factors)[i] for i in torch.randperm(2, generator=generator).tolist()]:
                    img = img * factors[name] if name == "brightness" else \
                        img.mean() + factors[name] * (img - img.mean())
                img = img.clamp(low, high)
            if torch.rand((), generator=generator) < 0.5:
                img = gaussian_blur(img, _uniform(0.1, 2.0, generator))
            if torch.rand((), generator=generator) < 0.5:
                y, x, h, w = _cutout_box(*img.shape[-2:], generator)
                noise = torch.rand((*img.shape[:-2], h, w), generator=generator, device=img.device)
                img = img.clone()
                img[..., y : y + h, x : x + w] = low + (high - low) * noise
                labels[b, ..., y : y + h, x : x + w] = IGNORE_INDEX
            images[b] = img
    return images, labels
