"""Hand-computed checks of dust.metrics.segmentation (medpy-style Dice/Jaccard/HD95/ASD)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from dust.metrics import (
    ClassMetrics,
    case_metrics,
    image_diagonal,
    summarize,
    write_case_csv,
)


def _square(shape, rows, cols, label=1):
    a = np.zeros(shape, dtype=np.int64)
    a[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = label
    return a


def test_2d_one_pixel_shift():
    # ref: 3x3 square rows 1-3, cols 1-3; pred: same square shifted one column right (cols 2-4).
    # Overlap 3x2 = 6 -> Dice 2*6/(9+9) = 2/3, Jaccard 6/12 = 1/2.
    # Surfaces = the 8 non-centre pixels of each square (ref centre (2,2), pred centre (2,3)).
    # pred->ref: (1,2),(1,3),(3,2),(3,3) lie on the ref surface -> 0; (2,2) (ref centre), (1,4),(2,4),(3,4)
    # -> 1 each. ref->pred is the mirror image. Pooled 16 values = 8 zeros + 8 ones -> HD95 = 1, ASD = 4/8.
    ref = _square((5, 6), (1, 3), (1, 3))
    pred = _square((5, 6), (1, 3), (2, 4))
    m = case_metrics(pred, ref, {1: "A"})["A"]
    assert m.dice == pytest.approx(2 / 3)
    assert m.jaccard == pytest.approx(0.5)
    assert m.hd95_vox == pytest.approx(1.0)
    assert m.asd_vox == pytest.approx(0.5)
    assert m.hd95_mm is None and m.asd_mm is None


def test_2d_anisotropic_spacing():
    # Same masks, spacing (rows 2 mm, cols 3 mm). pred->ref: four 0s; (2,2) -> (1,2) one row up = 2 mm;
    # (1,4),(2,4),(3,4) -> one column left = 3 mm. Sum 11 over 8 -> ASD 1.375 mm.
    # ref->pred: four 0s; (2,3) (pred centre) -> (1,3) = 2 mm; (1,1),(2,1),(3,1) -> 3 mm.
    # Pooled: 8 zeros, 2 twos, 6 threes; index 0.95*15 = 14.25 falls between two 3s -> HD95 3 mm.
    ref = _square((5, 6), (1, 3), (1, 3))
    pred = _square((5, 6), (1, 3), (2, 4))
    m = case_metrics(pred, ref, {1: "A"}, spacing=(2.0, 3.0))["A"]
    assert m.hd95_mm == pytest.approx(3.0)
    assert m.asd_mm == pytest.approx(11 / 8)
    # voxel distances ignore the spacing
    assert m.hd95_vox == pytest.approx(1.0)
    assert m.asd_vox == pytest.approx(0.5)


def test_2d_asymmetric_outlier_is_medpy_not_monai_hd95():
    # ref: 3x3 square rows 1-3, cols 1-3; pred: the same square plus one stray pixel at (2,8).
    # Overlap 9 -> Dice 18/19, Jaccard 9/10.
    # pred->ref: 8 square-surface pixels at 0, the stray pixel at 5 (nearest ref surface pixel (2,3)).
    # ref->pred: 8 zeros. Pooled 17 values, 16 zeros + one 5: index 0.95*16 = 15.2 -> 0.2*5 = 1.0.
    # MONAI's max of directed 95th percentiles would give 0.6*5 = 3.0 (pred->ref, 9 values, index 7.6).
    # ASD (directed pred->ref) = 5/9; the symmetric ASSD would be 5/17.
    ref = _square((5, 10), (1, 3), (1, 3))
    pred = ref.copy()
    pred[2, 8] = 1
    m = case_metrics(pred, ref, {1: "A"})["A"]
    assert m.dice == pytest.approx(18 / 19)
    assert m.jaccard == pytest.approx(0.9)
    assert m.hd95_vox == pytest.approx(1.0)
    assert m.asd_vox == pytest.approx(5 / 9)
    # Swapping the roles leaves HD95 unchanged (symmetric) but ASD becomes 0 (pred surface lies on ref's).
    s = case_metrics(ref, pred, {1: "A"})["A"]
    assert s.hd95_vox == pytest.approx(1.0)
    assert s.asd_vox == pytest.approx(0.0)


def test_3d_one_voxel_shift_with_spacing():
    # ref: 3x3x3 cube at 1..3 on every axis; pred: shifted +1 along axis 0 (2..4).
    # Overlap 2*9 = 18 -> Dice 36/54 = 2/3, Jaccard 18/36 = 1/2. Surfaces: 26 voxels (all but the centre).
    # pred->ref: a=4 face (9 voxels) -> 1 each; (2,2,2) (ref centre) -> 1; the other 16 lie on ref's surface.
    # 10 ones / 26 -> ASD 5/13; ref->pred is the mirror; pooled 32 zeros + 20 ones -> HD95 1.
    # spacing (5,1,1): the a=4 face moves 5 mm, (2,2,2) still 1 mm (sideways neighbour)
    # -> ASD (9*5 + 1)/26 = 23/13 mm; pooled 32 zeros, 2 ones, 18 fives, index 0.95*51 = 48.45 -> 5 mm.
    ref = np.zeros((5, 5, 5), dtype=np.int64)
    ref[1:4, 1:4, 1:4] = 2
    pred = np.zeros_like(ref)
    pred[2:5, 1:4, 1:4] = 2
    m = case_metrics(pred, ref, {2: "B"}, spacing=(5.0, 1.0, 1.0))["B"]
    assert m.dice == pytest.approx(2 / 3)
    assert m.jaccard == pytest.approx(0.5)
    assert m.hd95_vox == pytest.approx(1.0)
    assert m.asd_vox == pytest.approx(5 / 13)
    assert m.hd95_mm == pytest.approx(5.0)
    assert m.asd_mm == pytest.approx(23 / 13)


def test_multiclass_and_empty_conventions():
    # Label 1 matches perfectly; label 2 only in ref (missed); label 3 only in pred (hallucinated);
    # label 4 in neither (both empty).
    ref = np.zeros((6, 8), dtype=np.int64)
    pred = np.zeros_like(ref)
    ref[1:3, 1:3] = 1
    pred[1:3, 1:3] = 1
    ref[4, 4] = 2
    pred[4, 6] = 3
    names = {1: "same", 2: "missed", 3: "extra", 4: "absent"}
    out = case_metrics(pred, ref, names, spacing=(2.0, 0.5))
    assert list(out) == ["same", "missed", "extra", "absent"]
    assert out["same"] == ClassMetrics(1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    assert out["absent"] == ClassMetrics(1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    diag_vox = math.sqrt(6**2 + 8**2)  # 10
    diag_mm = math.sqrt(12**2 + 4**2)
    assert image_diagonal((6, 8)) == pytest.approx(10.0)
    assert image_diagonal((6, 8), (2.0, 0.5)) == pytest.approx(diag_mm)
    for name in ("missed", "extra"):
        assert out[name] == ClassMetrics(0.0, 0.0, diag_vox, diag_vox, diag_mm, diag_mm)
    none_sp = case_metrics(pred, ref, names)
    assert none_sp["absent"].hd95_mm is None and none_sp["missed"].asd_mm is None


def test_input_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        case_metrics(np.zeros((4, 4), int), np.zeros((4, 5), int), {1: "A"})
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(np.zeros((4, 4), int), np.zeros((4, 4), int), {1: "A"}, spacing=(1.0, 1.0, 1.0))


def _cm(dice, hd, mm=None):
    return ClassMetrics(dice, dice / 2, hd, hd / 2, mm, mm)


def test_summarize_by_hand():
    # case 1: A dice 1.0, B dice 0.5 -> case mean 0.75; case 2: A dice 0.8, B dice 0.2 -> case mean 0.5.
    # per-class A: mean 0.9, std 0.1 (population); B: mean 0.35, std 0.15.
    # overall dice: mean(0.75, 0.5) = 0.625, std 0.125. hd: case means (2+4)/2=3 and (6+10)/2=8 -> 5.5, 2.5.
    cases = [{"A": _cm(1.0, 2.0, 1.0), "B": _cm(0.5, 4.0, 1.0)}, {"A": _cm(0.8, 6.0), "B": _cm(0.2, 10.0)}]
    s = summarize(cases)
    assert s["n_cases"] == 2
    assert s["per_class"]["A"]["dice"] == pytest.approx({"mean": 0.9, "std": 0.1})
    assert s["per_class"]["B"]["dice"] == pytest.approx({"mean": 0.35, "std": 0.15})
    assert s["per_class"]["B"]["hd95_vox"] == pytest.approx({"mean": 7.0, "std": 3.0})
    assert s["overall"]["dice"] == pytest.approx({"mean": 0.625, "std": 0.125})
    assert s["overall"]["jaccard"] == pytest.approx({"mean": 0.3125, "std": 0.0625})
    assert s["overall"]["hd95_vox"] == pytest.approx({"mean": 5.5, "std": 2.5})
    assert s["overall"]["asd_vox"] == pytest.approx({"mean": 2.75, "std": 1.25})
    # case 2 has no mm values -> mm summaries are None
    assert s["per_class"]["A"]["hd95_mm"] is None and s["overall"]["asd_mm"] is None
    with pytest.raises(ValueError):
        summarize([])


def test_write_case_csv(tmp_path):
    path = tmp_path / "m.csv"
    write_case_csv(path, ["c1", "c2"], [{"A": _cm(1.0, 2.0, 3.0)}, {"A": _cm(0.5, 4.0)}])
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["case", "class", "dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm"]
    assert rows[1] == ["c1", "A", "1.0", "0.5", "2.0", "1.0", "3.0", "3.0"]
    assert rows[2] == ["c2", "A", "0.5", "0.25", "4.0", "2.0", "", ""]
    with pytest.raises(ValueError):
        write_case_csv(path, ["c1"], [])


@pytest.mark.parametrize(("policy", "expected"), [
    # (class-1 Dice mean, class-1 HD95 mean, class-2 Dice mean, overall Dice mean, overall HD95 mean)
    ("dust", (0.5, math.sqrt(48) / 2, 1.0, 0.75, math.sqrt(48) / 4)),
    ("nnunet", (0.5, 0.0, math.nan, 0.5, 0.0)),
    ("exclude", (1.0, 0.0, math.nan, 1.0, 0.0)),
])
def test_an_empty_prediction_scores_as_its_empty_mask_policy_says(policy, expected):
    """Case A predicts class 1 perfectly, case B misses it; class 2 is absent from both masks of both cases."""
    ref = np.zeros((4, 4, 4), np.int64)
    ref[1:3, 1:3, 1:3] = 1
    names = {1: "one", 2: "two"}
    case_a = case_metrics(ref.copy(), ref, names, empty_mask_policy=policy)
    case_b = case_metrics(np.zeros_like(ref), ref, names, empty_mask_policy=policy)
    summary = summarize([case_a, case_b], policy)
    got = (summary["per_class"]["one"]["dice"]["mean"], summary["per_class"]["one"]["hd95_vox"]["mean"],
           summary["per_class"]["two"]["dice"]["mean"], summary["overall"]["dice"]["mean"],
           summary["overall"]["hd95_vox"]["mean"])
    assert got == pytest.approx(expected, nan_ok=True)
    assert summary["empty_mask_policy"] == policy
    with pytest.raises(ValueError, match="empty_mask_policy 'medpy'"):
        case_metrics(ref, ref, names, empty_mask_policy="medpy")
