"""The one inference path: a model's class probabilities on a whole case, 2D or 3D.

Evaluation, ``dust predict``, ``dust rank``, the report, and pseudo-labelling and ranking of the unlabelled pool all
call :class:`Predictor`; nothing else in dust runs a network on a case. How a case is covered follows the config:

- a 2D model on a volume (C, S, H, W) predicts it slice by slice (slices batched);
- a 3D model predicts the volume as a whole;
- ``spatial_policy: resize``: the slice (or volume) is resized to the patch and the probabilities back (SSL4MIS's
  2D ACDC inference); ``crop``: a sliding window of the patch size (MONAI's ``sliding_window_inference``: zero
  padding where the case is smaller, ``inference_overlap`` or a per-axis ``inference_stride``, Gaussian or
  constant blending of the windows' probabilities), on the grid the model was trained on (``resample_factor``),
  probabilities resampled back to the case's grid before the argmax.

A head function maps a batch (B, C, *patch) to a tuple of logits (B, K, *patch): the method's prediction first,
then any heads used for the pixel uncertainty (:meth:`dust.methods.Method.inference_heads`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dust.data.transforms import resample_to, resampled_shape, resize_image, separate_axis, spacing_grid
from dust.data.types import as_tensor
from dust.models.layers import to_channels_last
from dust.uncertainty import uncertainty_map, uncertainty_name

Heads = Callable[[torch.Tensor], Sequence[torch.Tensor]]
SLICES_PER_FORWARD = 32  # 2D models: slices of a case per forward
POOL_ITEMS_PER_FORWARD = 64  # 2D models: unlabelled items per forward when a method labels or ranks its pool


@dataclass(frozen=True)
class Segmentation:
    """One case's label map (*spatial, int64) and, when asked for, its pixel uncertainty (*spatial, float32)."""

    label: torch.Tensor
    uncertainty: torch.Tensor | None = None
    uncertainty_name: str | None = None  # what ``uncertainty`` is: "decoder KL (Eq. 2)" or "predictive entropy"


@dataclass(frozen=True)
class Predictor:
    """How a config's model covers a case: patch, policy, window overlap, precision, device."""

    patch_size: tuple[int, ...]
    device: torch.device
    bf16: bool = False
    channels_last: bool = False
    interpolation: str = "bilinear"
    spatial_policy: str = "resize"
    resample_factor: float = 1.0
    overlap: float | tuple[float, ...] = 0.5
    stride: tuple[int, ...] | None = None
    blend: str = "gaussian"
    windows_per_batch: int = 2
    target_spacing: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: torch.device) -> Predictor:
        overlap = cfg["inference_overlap"]
        return cls(
            tuple(cfg["patch_size"]), device, bool(cfg["bf16"]), bool(cfg["channels_last"]),
            cfg["image_interpolation"], cfg["spatial_policy"], float(cfg["resample_factor"]),
            tuple(overlap) if isinstance(overlap, list) else float(overlap),
            None if cfg["inference_stride"] is None else tuple(int(s) for s in cfg["inference_stride"]),
            cfg["inference_blend"], int(cfg["inference_windows_per_batch"]),
            None if cfg["target_spacing"] is None else tuple(float(s) for s in cfg["target_spacing"]),
        )

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)

    # ------------------------------------------------------------------ whole cases
    @torch.inference_mode()
    def case(self, heads: Heads, image: np.ndarray | torch.Tensor,
             spacing: Sequence[float] | None = None) -> list[torch.Tensor]:
        """Class probabilities (K, *spatial) of each head on the case's own grid, for an image (C, *spatial) with
        one more spatial axis than the model (2D model, slice by slice) or as many (3D model).

        A model trained at a ``target_spacing`` sees the case resampled from its ``spacing`` (mm per axis) to that
        spacing, as ``dust prepare --dims 3`` stored its training volumes; a case of unknown spacing is refused."""
        volume = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image).float()
        extra = volume.dim() - 1 - self.spatial_dims
        if extra == 0:
            return [p[0] for p in self._probabilities(heads, volume[None], spacing)]
        if extra != 1:
            raise ValueError(f"a {self.spatial_dims}D model predicts (C, *spatial) cases with {self.spatial_dims} or "
                             f"{self.spatial_dims + 1} spatial axes; got an image of shape {tuple(volume.shape)}")
        slices = volume.transpose(0, 1)  # (S, C, H, W)
        batch = SLICES_PER_FORWARD if self.spatial_policy == "resize" else 1
        out = [self._probabilities(heads, slices[i : i + batch]) for i in range(0, len(slices), batch)]
        return [torch.cat(parts).transpose(0, 1).contiguous() for parts in zip(*out, strict=True)]

    def _probabilities(self, heads: Heads, x: torch.Tensor,
                       spacing: Sequence[float] | None = None) -> list[torch.Tensor]:
        """(B, C, *spatial) at the case's grid -> per head (B, K, *spatial) probabilities on that grid, on the CPU."""
        size = tuple(x.shape[2:])
        if self.spatial_policy == "resize":
            inputs = resize_image(x, self.patch_size, self.interpolation).to(self.device)
            probs = [torch.softmax(z.float(), 1) for z in self._forward(heads, inputs)]
        elif self.target_spacing is not None:
            if spacing is None or len(spacing) != len(size):
                raise ValueError(f"this model was trained at {list(self.target_spacing)} mm and resamples every case "
                                 f"to it; the case's voxel size is not known (got {spacing})")
            separate = separate_axis(spacing)
            grid = spacing_grid(size, spacing, self.target_spacing)
            probs = self._sliding_window(heads, resample_to(x, grid, separate).to(self.device))
            return [resample_to(p.cpu(), size, separate) for p in probs]
        else:
            grid = resampled_shape(size, self.resample_factor)
            probs = self._sliding_window(heads, resize_image(x, grid, self.interpolation).to(self.device))
        return [resize_image(p, size).cpu() for p in probs]

    def segment(self, method: Any, image: np.ndarray | torch.Tensor, uncertainty: bool = False,
                spacing: Sequence[float] | None = None) -> Segmentation:
        """A trained method's label map of one case, the argmax of ``method.predict`` (what evaluation scores),
        and with ``uncertainty`` its pixel uncertainty: the decoders' KL when the method's ``inference_heads``
        include two decoders, else the prediction's entropy."""
        heads = method.inference_heads if uncertainty else (lambda x: (method.predict(x),))
        probs = self.case(heads, image, spacing)
        if not uncertainty:
            return Segmentation(probs[0].argmax(0))
        return Segmentation(probs[0].argmax(0), uncertainty_map(probs), uncertainty_name(len(probs)))

    # ------------------------------------------------------------------ training items (the unlabelled pool)
    @torch.inference_mode()
    def items(
        self, heads: Heads, images: Sequence[torch.Tensor], indices: Sequence[int]
    ) -> Iterator[tuple[list[int], torch.Tensor, list[torch.Tensor]]]:
        """(indices, inputs, per head logits (B, K, *grid)) for training items ``images[i]`` (C, *spatial) already
        on the training grid: ``resize``: batches of items at the patch size (``grid`` is the patch); ``crop``: one
        item at a time by the sliding window on its own grid (logits = log of the blended probabilities).

        Softmax and argmax of what comes back are what callers use; ``inputs`` is what the model saw (on the device).
        """
        if self.spatial_policy == "resize":
            for start in range(0, len(indices), POOL_ITEMS_PER_FORWARD):
                idx = list(indices[start : start + POOL_ITEMS_PER_FORWARD])
                x = torch.cat([resize_image(as_tensor(images[i])[None], self.patch_size, self.interpolation)
                               for i in idx])
                x = self._layout(x.to(self.device))
                yield idx, x, [z.float() for z in self._forward(heads, x)]
            return
        for i in indices:
            x = as_tensor(images[i])[None].float().to(self.device)
            probs = self._sliding_window(heads, x)
            yield [i], x, [p.clamp_min(1e-12).log() for p in probs]

    # ------------------------------------------------------------------ shared
    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return to_channels_last(x) if self.channels_last else x

    def _forward(self, heads: Heads, x: torch.Tensor) -> Sequence[torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return heads(self._layout(x))

    def _sliding_window(self, heads: Heads, x: torch.Tensor) -> list[torch.Tensor]:
        """Per head (B, K, *spatial) probabilities of windows of the patch size blended over ``x``."""

        from monai.inferers import sliding_window_inference  # here: importing MONAI costs seconds at every `dust` start

        def window_probs(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(torch.softmax(z.float(), 1) for z in self._forward(heads, w))

        out = sliding_window_inference(
            x, self.patch_size, self.windows_per_batch, window_probs, overlap=self.window_overlap(),
            mode=self.blend, padding_mode="constant", cval=0.0,
        )
        return list(out) if isinstance(out, tuple | list) else [out]

    def window_overlap(self) -> tuple[float, ...]:
        """Overlap per axis for MONAI: from ``stride`` where given (MONAI steps by int(patch * (1 - overlap)); half
        a voxel more keeps float rounding from shortening a step), else ``overlap``."""
        if self.stride is None:
            o = self.overlap
            return tuple(o) if isinstance(o, tuple) else (float(o),) * self.spatial_dims
        for s, p in zip(self.stride, self.patch_size, strict=True):
            if not 0 < s <= p:
                raise ValueError(f"inference_stride {list(self.stride)}: each step must be in 1..patch size "
                                 f"{list(self.patch_size)}")
        return tuple(1.0 - (s + 0.5) / p if s < p else 0.0 for s, p in zip(self.stride, self.patch_size,
                                                                               strict=True))
