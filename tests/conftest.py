"""Shared fixtures: a tiny phantom dataset and a tiny, fast config on top of it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from dust.data.phantom import generate_phantom
from dust.methods.loading import full_config

ACDC_DIR = Path(os.environ.get("DUST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "ACDC"

TINY_PHANTOM = dict(n_train_patients=4, n_val_patients=1, n_test_patients=1, slices_per_volume=(3, 4),
                    frames_per_patient=2, size_range=(40, 48))


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), seed=0, **TINY_PHANTOM)


@pytest.fixture
def tiny_cfg(phantom_root: Path, tmp_path: Path):
    """A factory for fully resolved configs that train in about a second on the tiny phantom."""

    def make(**overrides: Any) -> dict[str, Any]:
        cfg = {
            "data_dir": str(phantom_root.resolve()),
            "labeled_patients": 2,
            "patch_size": [32, 32],
            "channels": [4, 8, 16, 32, 64],
            "batch_size": 4,
            "unlabeled_batch_size": 4,
            "iterations": 20,
            "val_every": 10,
            "log_every": 5,
            "threads": 1,
            "tensorboard": False,
            "progress": False,
            "run_dir": str(tmp_path / "run"),
        }
        cfg.update(overrides)
        return full_config(cfg)

    return make


@pytest.fixture(scope="session")
def la_phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten tiny 3D phantom volumes (X, Y, Z) = (24, 20, 16) in the LA h5 layout."""
    from dust.data.phantom3d import generate_la_phantom

    return generate_la_phantom(tmp_path_factory.mktemp("la_phantom"), seed=0, n_cases=10, shape=(24, 20, 16))


@pytest.fixture
def tiny_cfg_3d(la_phantom_root: Path, tmp_path: Path):
    """A factory for resolved 3D configs (VNet, crops of 16^3) that train in seconds on the 3D phantom."""

    def make(**overrides: Any) -> dict[str, Any]:
        cfg = {
            "dataset": "la_h5",
            "data_dir": str(la_phantom_root.resolve()),
            "model": "vnet",
            "upsample": "deconv",
            "channels": [4, 8, 16, 32, 64],
            "dropout": [0.0, 0.0, 0.0, 0.0, 0.5],
            "num_classes": 2,
            "class_names": ["background", "LA"],
            "spacing": [0.625, 0.625, 0.625],
            "spatial_policy": "crop",
            "augment_rotate_deg": 0.0,
            "labeled_patients": 3,
            "holdout_cases": 2,
            "patch_size": [16, 16, 16],
            "batch_size": 2,
            "unlabeled_batch_size": 2,
            "iterations": 2,
            "val_every": 2,
            "log_every": 1,
            "threads": 1,
            "tensorboard": False,
            "progress": False,
            "run_dir": str(tmp_path / "run3d"),
        }
        cfg.update(overrides)
        return full_config(cfg)

    return make
