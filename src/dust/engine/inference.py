"""Whole-volume inference for 2D models: slices batched, resized to the patch size and back, softmax."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    return predict_volume_heads(lambda x: (predict(x),), image, patch_size, device, bf16, channels_last,
                                batch_size, interpolation)[0]


@torch.inference_mode()
def predict_volume_heads(
    predict_heads: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    image: np.ndarray,
    patch_size: tuple[int, int],
    device: torch.device,
    bf16: bool = False,
    channels_last: bool = False,
    batch_size: int = 32,
    interpolation: str = "bilinear",
) -> list[torch.Tensor]:
    """:func:`predict_volume` for several logit maps per forward (e.g. both decoders of a dual-decoder
    U-Net, for their disagreement): class probabilities (K, S, H, W) of each head, in the order returned."""
    slices = torch.from_numpy(np.ascontiguousarray(image)).float().permute(1, 0, 2, 3)  # (S, C, H, W)
    size = tuple(slices.shape[-2:])
    out = []
    for start in range(0, slices.shape[0], batch_size):
        x = resize_image(slices[start : start + batch_size], patch_size, interpolation).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            heads = predict_heads(x)
        out.append([resize_image(torch.softmax(logits.float(), dim=1), size).cpu() for logits in heads])
    return [torch.cat(parts).permute(1, 0, 2, 3).contiguous() for parts in zip(*out, strict=True)]
