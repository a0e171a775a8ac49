"""Whole-volume inference for 2D models: slices batched, resized to the patch size and back, softmax."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dust.data.transforms import resize_image


@torch.inference_mode()
def predict_volume(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    patch_size: tuple[int, int],
    device: torch.device,
    bf16: bool = False,
    channels_last: bool = False,
    batch_size: int = 32,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Class probabilities (K, S, H, W) for an image volume (C, S, H, W), predicted slice by slice.

    Probabilities (not labels) are resized back to the original slice size, so argmax happens at full
    resolution; this is smoother than nearest-neighbour resizing of a label map.
    """
    slices = torch.from_numpy(np.ascontiguousarray(image)).float().permute(1, 0, 2, 3)  # (S, C, H, W)
    size = tuple(slices.shape[-2:])
    out = []
    for start in range(0, slices.shape[0], batch_size):
        x = resize_image(slices[start : start + batch_size], patch_size, interpolation).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = predict(x)
        probs = torch.softmax(logits.float(), dim=1)
        out.append(resize_image(probs, size).cpu())
    return torch.cat(out).permute(1, 0, 2, 3).contiguous()
