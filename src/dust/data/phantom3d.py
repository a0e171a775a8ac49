"""A tiny deterministic 3D phantom in the left-atrium h5 layout (:mod:`dust.data.la`), for tests and the 3D demo.

Each case is a small (X, Y, Z) volume holding a few smooth blobs: one "atrium" (an ellipsoid with a bulge,
label 1) and two or three distractors of similar brightness (label 0), on a smooth background with noise, z-scored
like the LA volumes. Sizes and positions are drawn from ``seed``, so the same call always writes the same files;
``phantom.json`` records the arguments, and a repeated call with the same arguments reuses the dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from dust.data.la import case_path
from dust.data.types import write_h5

_FORMAT_VERSION = 1


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def phantom_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (X, Y, Z), label uint8 (X, Y, Z)) of one case."""
    size = np.asarray(shape, dtype=np.float64)
    grid = tuple(np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]].astype(np.float64))
    centre = size * rng.uniform(0.35, 0.65, 3)
    radii = size * rng.uniform(0.14, 0.24, 3)
    label = _ellipsoid(grid, centre, radii)
    bulge = centre + radii * rng.uniform(-0.9, 0.9, 3)
    label |= _ellipsoid(grid, bulge, radii * rng.uniform(0.35, 0.55, 3))
    image = rng.uniform(0.7, 1.0) * label.astype(np.float64)
    for _ in range(int(rng.integers(2, 4))):  # distractors: bright, but not the labelled structure
        blob = _ellipsoid(grid, size * rng.uniform(0.1, 0.9, 3), size * rng.uniform(0.06, 0.14, 3)) & ~label
        image += rng.uniform(0.5, 0.9) * blob
    image += ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 3.0) * 0.6  # smooth background texture
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 1.0)) + rng.normal(0.0, 0.15, shape)
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), label.astype(np.uint8)


def generate_la_phantom(root: Path | str, seed: int = 0, n_cases: int = 12,
                        shape: tuple[int, int, int] = (48, 40, 24)) -> Path:
    """Write ``n_cases`` phantom volumes of ``shape`` (X, Y, Z) and ``train.list`` under ``root``; returns root.

    A ``root/volumes`` not written by this function (no ``phantom.json``, e.g. the real LA data) is never mixed
    with phantom files: that raises FileExistsError."""
    root = Path(root)
    args = {"format": _FORMAT_VERSION, "seed": seed, "n_cases": n_cases, "shape": list(shape)}
    stamp = root / "phantom.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {**args, "complete": True}:
        return root
    if not stamp.is_file() and (root / "volumes").is_dir() and any((root / "volumes").iterdir()):
        raise FileExistsError(f"{root / 'volumes'} exists and was not made by generate_la_phantom")
    root.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({**args, "complete": False}))  # marks the directory as ours while writing
    rng = np.random.default_rng(seed)
    ids = [f"case{i:03d}" for i in range(n_cases)]
    for case_id in ids:
        image, label = phantom_case(rng, tuple(shape))
        path = case_path(root, case_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_h5(path, image, label)
    (root / "train.list").write_text("\n".join(ids) + "\n")
    stamp.write_text(json.dumps({**args, "complete": True}))
    return root
