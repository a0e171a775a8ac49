"""The ACDC models shipped under models/: intact, loadable as weights only, and scoring what their index says."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import pytest
import torch

from dust.cli.main import main
from dust.config import resolve_data_dir
from dust.data import load_split
from dust.engine.evaluation import evaluate_volumes
from dust.methods.loading import load_trained
from tests.conftest import ACDC_DIR

MODELS = Path(__file__).resolve().parents[1] / "models"
INDEX = json.loads((MODELS / "index.json").read_text())
# Per-case Dice is stored as computed on the machine that shipped the model (bf16 autocast, as recorded); a CPU
# that only emulates bf16 rounds some sums differently, which moves a case's Dice by far less than this.
DICE_TOLERANCE = 0.5
needs_acdc = pytest.mark.skipif(not ACDC_DIR.is_dir(), reason="ACDC not found under $DUST_DATA")


@pytest.mark.parametrize("entry", INDEX, ids=[e["name"] for e in INDEX])
def test_a_shipped_model_is_intact_and_loads_as_weights_only(entry: dict):
    path = MODELS / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    floats = [t for net in state["networks"].values() for t in net.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 for t in floats)
    assert path.stat().st_size < 10_000_000 and state["method"] == entry["method"]


@needs_acdc
@pytest.mark.parametrize("entry", INDEX, ids=[e["name"] for e in INDEX])
def test_a_shipped_model_reproduces_its_per_case_dice(entry: dict):
    method, cfg = load_trained(MODELS / entry["file"])
    wanted = entry["check_cases"]
    volumes = [v for v in load_split(cfg, resolve_data_dir(cfg["data_dir"]), "val") if v.case_id in wanted]
    per_case, _ = evaluate_volumes(method, volumes, cfg, torch.device("cpu"), distances=False)
    assert len(volumes) == len(wanted)
    for volume, case in zip(volumes, per_case, strict=True):
        dice = 100 * sum(c.dice for c in case.values()) / len(case)
        assert dice == pytest.approx(wanted[volume.case_id], abs=DICE_TOLERANCE), volume.case_id


@needs_acdc
def test_the_readme_quick_start_predicts_an_exported_validation_volume(tmp_path: Path):
    case = next(iter(INDEX[0]["check_cases"]))
    assert main(["export", "--input", str(ACDC_DIR / "data" / f"{case}.h5"), "--output", str(tmp_path / "scan")]) == 0
    scan = tmp_path / "scan" / f"{case}.nii.gz"
    model = next(e for e in INDEX if e["method"] == "dust")
    assert main(["predict", "--checkpoint", str(MODELS / model["file"]), "--input", str(scan),
                 "--output", str(tmp_path / "out"), "--uncertainty"]) == 0
    label = nib.load(tmp_path / "out" / f"{case}.nii.gz")
    assert label.shape == nib.load(scan).shape and 0 < label.get_fdata().max() <= 3
    assert main(["evaluate", "--pred", str(tmp_path / "out"), "--ref", str(tmp_path / "scan" / "labels"),
                 "--class-names", "background", "RV", "Myo", "LV"]) == 0
    scored = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 100 * scored["overall"]["dice"]["mean"] == pytest.approx(model["check_cases"][case], abs=DICE_TOLERANCE)
