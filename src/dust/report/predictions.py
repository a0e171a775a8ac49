"""Predictions and pixel uncertainty on a few slices of a validation volume, for the report's overlays.

The trained method is loaded with :func:`dust.engine.workflows.load_trained` and slices are predicted with
:func:`dust.engine.inference.predict_volume_heads` (the same resizing and autocast as evaluation). Uncertainty is the
decoders' KL divergence (DUST Eq. 2) for a dual-decoder network, the predictive entropy otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dust.data.ssl4mis import Volume
from dust.engine.inference import predict_volume_heads
from dust.engine.trainer import pick_device
from dust.engine.workflows import load_trained
from dust.models import DualDecoderUNet2D
from dust.uncertainty import decoder_kl, predictive_entropy

_LOG_FLOOR = 1e-8  # probabilities are turned back into log-probabilities; keeps log(0) finite


@dataclass
class SlicePrediction:
    """One slice: image (H, W), ground truth and prediction (H, W) labels, uncertainty map (H, W)."""

    case_id: str
    index: int
    image: np.ndarray
    label: np.ndarray
    prediction: np.ndarray
    uncertainty: np.ndarray
    uncertainty_name: str


def pick_slices(label: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` slice indices spread evenly over the slices that hold any foreground."""
    foreground = np.flatnonzero(label.reshape(label.shape[0], -1).any(1))
    if len(foreground) == 0:
        foreground = np.arange(label.shape[0])
    picks = np.linspace(0, len(foreground) - 1, min(count, len(foreground))).round().astype(int)
    return sorted({int(foreground[i]) for i in picks})


def largest_slice(label: np.ndarray) -> int:
    """The slice with the most foreground: where the structures are easiest to see."""
    return int(np.argmax((label.reshape(label.shape[0], -1) > 0).sum(1)))


class SlicePredictor:
    """A trained method from a checkpoint, ready to predict slices of volumes."""

    def __init__(self, checkpoint: Path) -> None:
        self.method, self.cfg = load_trained(checkpoint)
        self.device = pick_device(self.cfg["device"])
        network = self.method.networks.get("model")
        self.dual = isinstance(network, DualDecoderUNet2D)
        self.uncertainty_name = "decoder KL (Eq. 2)" if self.dual else "predictive entropy"

    def predict(self, volume: Volume, slices: list[int]) -> list[SlicePrediction]:
        if volume.label is None:
            raise ValueError(f"volume {volume.case_id} has no label to show")
        for net in self.method.networks.values():
            net.eval()
        cfg = self.cfg
        image = volume.image[:, slices]  # a 2D model predicts each slice on its own
        network = self.method.networks.get("model")

        def heads(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # the method's prediction (what evaluation scores) and, for two decoders, both of them
            return (self.method.predict(x), *network(x)) if self.dual else (self.method.predict(x),)

        probs = predict_volume_heads(heads, image, tuple(cfg["patch_size"]), self.device, cfg["bf16"],
                                     cfg["channels_last"], interpolation=cfg["image_interpolation"])
        # (K, S, H, W) -> (S, K, H, W) log-probabilities, which are valid logits: log_softmax(log p) = log p
        log_probs = [p.permute(1, 0, 2, 3).clamp_min(_LOG_FLOOR).log() for p in probs]
        main = log_probs[0]
        uncertainty = decoder_kl(log_probs[1], log_probs[2]) if self.dual else predictive_entropy(main)
        prediction = main.argmax(1).numpy()
        return [
            SlicePrediction(volume.case_id, s, volume.image[0, s], volume.label[s], prediction[j],
                            uncertainty[j].numpy(), self.uncertainty_name)
            for j, s in enumerate(slices)
        ]
