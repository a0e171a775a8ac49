"""How a scan becomes model input, the same at ``dust prepare`` and at ``dust predict``, and the way back.

A scan (C, X, Y, Z) from NIfTI is put in dust's (C, S, H, W) axis order (:func:`dust.data.nifti.to_stored`), cropped
to the box where any channel is nonzero (``crop_nonzero``, nnU-Net's crop: a skull-stripped brain loses its empty
border, a CT is kept whole since air is -1000 HU), and normalised per ``intensity_norm``
(:func:`dust.data.nifti.normalize`; ``ct`` with the dataset statistics ``intensity_stats`` that ``dust prepare``
measured). Resampling to the planned ``target_spacing`` is not done here: the training volumes are stored
resampled by ``dust prepare``, and :class:`dust.inference.Predictor` resamples a whole case to the model's grid and
its probabilities back with the same function (:func:`dust.data.transforms.resample_to`). The crop box, spacing and
full shape travel in the :class:`Grid`, so a prediction is uncropped and written on the input's own voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dust.data.nifti import Grid, InputCase, normalize, read_channels, read_h5_case, spacing_of, stored_axes, to_stored
from dust.data.types import DataError


@dataclass(frozen=True)
class Preprocessing:
    """The config keys ``dust prepare`` writes and ``dust predict`` applies again."""

    intensity_norm: str = "minmax"
    intensity_stats: list[dict[str, float]] | None = None
    slice_axis: int = 2
    modalities: list[int] | None = None
    crop_nonzero: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Preprocessing:
        # A model trained by the la_h5 reader saw the volumes as stored (UA-MT z-scored each whole scan before
        # cropping it), whatever its config said: checkpoints written before the LA configs said `none` record
        # minmax, which would feed it other statistics.
        norm = "none" if cfg["dataset"] == "la_h5" else cfg["intensity_norm"]
        return cls(norm, cfg["intensity_stats"], int(cfg["slice_axis"]), cfg["modalities"], bool(cfg["crop_nonzero"]))

    def crop(self, channels: np.ndarray, source: str) -> tuple[np.ndarray, tuple[tuple[int, int], ...] | None]:
        """(C, X, Y, Z) in the file's voxel order -> (C, S, H, W) cropped to the nonzero box (when
        ``crop_nonzero``), and that box in the stored grid (None: not cropped)."""
        stored = to_stored(channels, self.slice_axis)
        box = nonzero_box(stored, source) if self.crop_nonzero else None
        if box is not None:
            stored = stored[(slice(None), *(slice(a, b) for a, b in box))]
        return stored, box

    def normalize(self, stored: np.ndarray, source: str) -> tuple[np.ndarray, dict[str, list[float]]]:
        """``intensity_norm`` with the recorded ``intensity_stats``: float32, and the statistics used."""
        return normalize(stored, self.intensity_norm, source, self.intensity_stats)

    def apply(self, channels: np.ndarray, source: str) -> tuple[np.ndarray, tuple[tuple[int, int], ...] | None]:
        """(C, X, Y, Z) in the file's voxel order -> model input (C, S, H, W) float32, and the crop box in the
        stored (S, H, W) grid (None: not cropped)."""
        stored, box = self.crop(channels, source)
        return self.normalize(stored, source)[0], box


def nonzero_box(stored: np.ndarray, source: str) -> tuple[tuple[int, int], ...]:
    """[start, stop) per spatial axis of the box holding every voxel where any channel is nonzero."""
    mask = np.any(stored != 0, axis=0)
    if not mask.any():
        raise DataError(f"{source}: every voxel is zero; nothing to segment")
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def read_input_case(case: InputCase, prep: Preprocessing) -> tuple[np.ndarray, Grid]:
    """Model input (C, S, H, W) float32 of a new case, preprocessed like the training data, and its grid.

    An h5 input is taken as already prepared (``dust prepare`` output, the SSL4MIS or LA layout): it is not
    normalised again; its geometry comes from the attributes ``dust prepare`` writes, else (SSL4MIS) it is a
    (Z, Y, X) array written back as (X, Y, Z) with an identity affine.
    """
    if case.is_h5:
        return read_h5_case(case.paths[0])
    channels, reference = read_channels(case.paths, prep.modalities)
    image, box = prep.apply(channels, str(case.paths[0]))
    zooms = spacing_of(reference)
    spacing = tuple(zooms[a] for a in stored_axes(prep.slice_axis))
    full = tuple(channels.shape[1:][a] for a in stored_axes(prep.slice_axis))
    return image, Grid(prep.slice_axis, reference.affine, reference.header, type(reference), box, full, spacing)
