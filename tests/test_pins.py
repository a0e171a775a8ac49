"""Every method's first few training steps on the 2D phantom, pinned before dust became N-dimensional.

``tests/pins_2d.json`` was written by ``python tests/test_pins.py`` on the 2D-only engine (commit b8f55a3). A
refactor that changes what a 2D run computes (augmentation draws, the order of random numbers, a layer, a loss)
moves these numbers; one that only generalises the code does not. fp32 and one thread, so the comparison does not
depend on whether the CPU computes bf16; the tolerance allows for another CPU's summation order over a few steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dust.engine.trainer import Trainer
from dust.methods import available_methods
from dust.methods.loading import ENGINE_KEYS_OF_OLDER_RUNS, METHOD_KEYS_OF_OLDER_RUNS, full_config

PINS = Path(__file__).with_name("pins_2d.json")
METHODS = ["supervised", "mean_teacher", "ua_mt", "urpc", "dct", "cps", "st_plus_plus", "self_training", "st_ss",
           "dust"]
# Methods written after the pins (nothing to compare with); tests/test_3d_baselines.py tests what they compute.
ADDED_AFTER_THE_PINS = ["dtc", "mc_net", "mcf", "fixdyn", "multicure"]
# Defaults changed since the pins so that baselines train as their references do (tests/test_reference_training.py
# tests the new defaults); the values a run made before them keeps (what a resumed old run gets) reproduce the pins.


def pinned_run(method: str, phantom_root: Path, run_dir: Path) -> dict:
    """A 10-iteration fp32 run of ``method``: its loss log, validation Dice and a checksum of every network."""
    cfg = full_config({
        "method": method, "data_dir": str(phantom_root.resolve()), "labeled_patients": 2, "patch_size": [32, 32],
        "channels": [4, 8, 16, 32, 64], "batch_size": 4, "unlabeled_batch_size": 4, "iterations": 10,
        "val_every": 5, "log_every": 1, "threads": 1, "bf16": False, "tensorboard": False, "progress": False,
        "run_dir": str(run_dir), "batchnorm_recalibration_batches": 2,
        **ENGINE_KEYS_OF_OLDER_RUNS, **METHOD_KEYS_OF_OLDER_RUNS.get(method, {}),
    })
    trainer = Trainer(cfg)
    trainer.fit()
    checksums = {}
    for name, net in sorted(trainer.method.networks.items()):
        tensors = [v.double() for v in net.state_dict().values() if v.is_floating_point()]
        checksums[name] = [float(sum(t.abs().sum() for t in tensors)), float(sum(t.pow(2).sum() for t in tensors))]
    return {"loss": [round(r["loss"], 6) for r in trainer.train_log], "dice": [h["dice"] for h in trainer.history],
            "checksums": checksums}


@pytest.mark.parametrize("method", METHODS)
def test_a_2d_run_computes_what_it_did_before_dust_was_n_dimensional(method, phantom_root, tmp_path):
    expected = json.loads(PINS.read_text())[method]
    got = pinned_run(method, phantom_root, tmp_path / "run")
    # A changed computation moves the first steps; another CPU's summation order drifts later ones, most in
    # methods that train on each other's argmax (CPS on an AMD EPYC: 1e-4 at step 5, 3e-3 at step 9).
    assert got["loss"][:5] == pytest.approx(expected["loss"][:5], rel=1e-3, abs=1e-4)
    assert got["loss"][5:] == pytest.approx(expected["loss"][5:], rel=1e-2, abs=1e-4)
    assert got["dice"] == pytest.approx(expected["dice"], abs=0.02)
    for name, values in expected["checksums"].items():
        assert got["checksums"][name] == pytest.approx(values, rel=5e-4), name


def test_every_registered_method_is_pinned():
    assert set(available_methods()) <= set(METHODS) | set(ADDED_AFTER_THE_PINS)


if __name__ == "__main__":  # (re)write the pins: only on purpose, when a change to 2D numbers is intended
    import tempfile

    from dust.data.phantom import generate_phantom

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import TINY_PHANTOM

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_phantom(Path(tmp) / "phantom", seed=0, **TINY_PHANTOM)
        pins = {m: pinned_run(m, root, Path(tmp) / m) for m in METHODS}
    PINS.write_text(json.dumps(pins, indent=1) + "\n")
    print(f"wrote {PINS}")
