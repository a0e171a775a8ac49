"""Predictions and pixel uncertainty on a few slices of a validation volume, for the report's overlays.

The trained method is loaded with :func:`dust.workflows.load_trained` and predicted by the engine's one
inference path (:class:`dust.inference.Predictor`, as evaluation: a 2D model on the shown slices only, a 3D
model on the whole volume, of which the slices are shown). Uncertainty comes from the method's
``inference_heads``: the decoders' KL divergence (DUST Eq. 2) for paired decoders, the predictive entropy otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dust.data.types import Volume
from dust.inference import Predictor
from dust.methods.loading import load_trained, pick_device


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
        self.predictor = Predictor.from_config(self.cfg, pick_device(self.cfg["device"]))

    def predict(self, volume: Volume, slices: list[int]) -> list[SlicePrediction]:
        image_all, label = volume.image, volume.label  # read once (a stored volume reads them from disk)
        if label is None:
            raise ValueError(f"volume {volume.case_id} has no label to show")
        for net in self.method.networks.values():
            net.eval()
        # a 2D model predicts each slice on its own; a 3D one needs the whole volume
        three_d = self.predictor.spatial_dims == 3
        image = image_all if three_d else image_all[:, slices]
        segmentation = self.predictor.segment(self.method, image, uncertainty=True,
                                              spacing=volume.spacing if three_d else None)
        prediction, uncertainty = segmentation.label, segmentation.uncertainty
        if three_d:
            prediction, uncertainty = prediction[slices], uncertainty[slices]
        prediction, name = prediction.numpy(), segmentation.uncertainty_name
        return [
            SlicePrediction(volume.case_id, s, image_all[0, s], label[s], prediction[j],
                            uncertainty[j].numpy(), name)
            for j, s in enumerate(slices)
        ]
