"""Per-case, per-class segmentation metrics (Dice, Jaccard, HD95, ASD) for integer label volumes.

The definitions follow ``medpy.metric.binary`` because that is what the semi-supervised segmentation papers
we compare against report, and the surface-distance machinery is MONAI's (``get_mask_edges`` /
``get_surface_distance``) so we do not maintain our own distance transforms:

* Dice ``2|P∩R| / (|P|+|R|)`` and Jaccard ``|P∩R| / |P∪R|``, fractions in [0, 1].
* Surfaces are the voxels of a mask removed by one binary erosion (face connectivity), as in medpy.
  ``d(P->R)`` is the Euclidean distance from every prediction-surface voxel to the nearest
  reference-surface voxel, and vice versa.
* HD95 = 95th percentile (``np.percentile``, linear interpolation) of the *concatenation* of ``d(P->R)``
  and ``d(R->P)`` (``medpy.metric.binary.hd95``). This is not MONAI's ``compute_hausdorff_distance
  (percentile=95)``, which takes the max of the two directed 95th percentiles and is never smaller.
* ASD = mean of ``d(P->R)`` only (``medpy.metric.binary.asd``), not the symmetric ASSD.
* Distances are reported in voxels (spacing 1, the convention of the papers' tables) and, when a
  ``spacing`` is given, also in mm.

Empty masks (per class; ``empty_mask_policy``, docs/metrics.md shows the three side by side):

* ``dust`` (default; means over cases stay finite and a missed structure is penalised): prediction and reference
  both empty is perfect agreement, Dice = Jaccard = 1, HD95 = ASD = 0 (:data:`EMPTY_BOTH_OVERLAP`,
  :data:`EMPTY_BOTH_DISTANCE`); exactly one of them empty (missed or hallucinated structure) gives Dice = Jaccard
  = 0 and HD95 = ASD = the diagonal of the image extent, ``sqrt(sum((n_i * s_i)^2))`` (s_i = 1 for voxel units),
  an upper bound on any surface distance in that image (:data:`EMPTY_ONE_OVERLAP`, :func:`image_diagonal`);
* ``nnunet`` (``nnUNetv2_evaluate_folder``): both empty gives NaN for every metric, left out of the means; one
  empty gives Dice = Jaccard = 0 and NaN distances (undefined; medpy raises), left out of the distance means;
* ``exclude``: a class of a case in which either mask is empty is left out of every mean.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from monai.metrics.utils import get_mask_edges, get_surface_distance

__all__ = [
    "EMPTY_MASK_POLICIES",
    "EMPTY_BOTH_DISTANCE",
    "EMPTY_BOTH_OVERLAP",
    "EMPTY_ONE_OVERLAP",
    "METRIC_NAMES",
    "ClassMetrics",
    "case_metrics",
    "image_diagonal",
    "summarize",
    "write_case_csv",
]

EMPTY_MASK_POLICIES = ("dust", "nnunet", "exclude")
EMPTY_BOTH_OVERLAP = 1.0  # Dice/Jaccard when prediction and reference are both empty
EMPTY_BOTH_DISTANCE = 0.0  # HD95/ASD when prediction and reference are both empty
EMPTY_ONE_OVERLAP = 0.0  # Dice/Jaccard when exactly one is empty (distances: image_diagonal)


@dataclass
class ClassMetrics:
    """Metrics of one class in one case; ``*_mm`` are None when no spacing was given."""

    dice: float
    jaccard: float
    hd95_vox: float
    asd_vox: float
    hd95_mm: float | None
    asd_mm: float | None


METRIC_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ClassMetrics))


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Diagonal of the image extent: the distance charged when exactly one of the masks is empty."""
    sp = [1.0] * len(shape) if spacing is None else [float(s) for s in spacing]
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sp, strict=True)))


def _hd95_asd(
    edges_p: np.ndarray, edges_r: np.ndarray, spacing: Sequence[float] | None
) -> tuple[float, float]:
    """medpy-style HD95 (percentile of the pooled directed distances) and directed ASD (pred -> ref)."""
    sp = None if spacing is None else [float(s) for s in spacing]

    def directed(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # surface a -> nearest voxel of surface b
        return np.asarray(get_surface_distance(a, b, distance_metric="euclidean", spacing=sp), np.float64)

    d_pr, d_rp = directed(edges_p, edges_r), directed(edges_r, edges_p)
    return float(np.percentile(np.concatenate([d_pr, d_rp]), 95)), float(d_pr.mean())


def _binary_metrics(
    p: np.ndarray, r: np.ndarray, spacing: Sequence[float] | None, distances: bool = True, policy: str = "dust"
) -> ClassMetrics:
    p_any, r_any = bool(p.any()), bool(r.any())
    nan_mm = math.nan if spacing is not None else None
    if (not p_any or not r_any) and (policy == "exclude" or (policy == "nnunet" and not p_any and not r_any)):
        return ClassMetrics(math.nan, math.nan, math.nan, math.nan, nan_mm, nan_mm)
    if p_any != r_any and policy == "nnunet":
        return ClassMetrics(EMPTY_ONE_OVERLAP, EMPTY_ONE_OVERLAP, math.nan, math.nan, nan_mm, nan_mm)
    if not p_any and not r_any:
        d_mm = EMPTY_BOTH_DISTANCE if spacing is not None else None
        return ClassMetrics(
            EMPTY_BOTH_OVERLAP, EMPTY_BOTH_OVERLAP, EMPTY_BOTH_DISTANCE, EMPTY_BOTH_DISTANCE, d_mm, d_mm
        )
    if p_any != r_any:
        d_vox = image_diagonal(p.shape)
        d_mm = image_diagonal(p.shape, spacing) if spacing is not None else None
        return ClassMetrics(EMPTY_ONE_OVERLAP, EMPTY_ONE_OVERLAP, d_vox, d_vox, d_mm, d_mm)
    inter = float(np.logical_and(p, r).sum())
    n_p, n_r = float(p.sum()), float(r.sum())
    dice = 2.0 * inter / (n_p + n_r)
    jaccard = inter / (n_p + n_r - inter)
    if not distances:
        return ClassMetrics(dice, jaccard, math.nan, math.nan, None, None)
    # crop=True keeps only the union bounding box (+1 margin): same distances, much less work on big volumes.
    edges_p, edges_r = get_mask_edges(p, r, crop=True)  # numpy in, numpy out
    hd95_vox, asd_vox = _hd95_asd(edges_p, edges_r, None)
    hd95_mm = asd_mm = None
    if spacing is not None:
        hd95_mm, asd_mm = _hd95_asd(edges_p, edges_r, spacing)
    return ClassMetrics(dice, jaccard, hd95_vox, asd_vox, hd95_mm, asd_mm)


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    class_names: dict[int, str],
    spacing: tuple[float, ...] | None = None,
    distances: bool = True,
    empty_mask_policy: str = "dust",
) -> dict[str, ClassMetrics]:
    """Score one case: ``{class name: ClassMetrics}`` for each label in ``class_names``.

    ``pred`` and ``ref`` are integer label maps of the same 2D or 3D shape; only the labels listed in
    ``class_names`` are scored (leave background out). ``spacing`` (one value per axis, in mm) adds the
    ``*_mm`` distances; the ``*_vox`` distances always use unit spacing so they match the papers' tables.
    ``distances=False`` skips HD95/ASD (NaN): the cheap Dice-only check used during training.
    ``empty_mask_policy``: what a class that is empty in the prediction or the reference scores (module docstring).
    """
    if empty_mask_policy not in EMPTY_MASK_POLICIES:
        raise ValueError(f"empty_mask_policy {empty_mask_policy!r}: choose one of {EMPTY_MASK_POLICIES}")
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference shapes differ: {pred.shape} vs {ref.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D label map, got shape {pred.shape}")
    if spacing is not None:
        if len(spacing) != pred.ndim:
            raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}D image")
        if any(not s > 0 for s in spacing):
            raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    return {
        name: _binary_metrics(pred == label, ref == label, spacing, distances, empty_mask_policy)
        for label, name in class_names.items()
    }


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and std over the values that are not NaN (NaN: left out by the empty-mask policy); NaN if all are."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)] if not np.isnan(arr).all() else arr
    return {"mean": float(arr.mean()), "std": float(arr.std())}


def _nan_mean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nan) if np.isnan(arr).all() else float(np.nanmean(arr))


def summarize(per_case: list[dict[str, ClassMetrics]], empty_mask_policy: str = "dust") -> dict:
    """Mean and (population, ddof=0) std of every metric over cases, per class and overall.

    ``overall`` is the field's "mean over volumes and classes": each case is first averaged over its
    classes, then mean/std are taken over those per-case means. Dice/Jaccard stay fractions. A mm metric
    is None unless every case has it (a partial mm mean would silently cover a different case set). Values the
    ``empty_mask_policy`` left out (NaN) are skipped in every mean; the policy is stated in the summary.
    """
    if not per_case:
        raise ValueError("summarize() needs at least one case")
    names = list(dict.fromkeys(name for case in per_case for name in case))
    per_class: dict[str, dict[str, dict[str, float] | None]] = {}
    for name in names:
        rows = [asdict(case[name]) for case in per_case if name in case]
        per_class[name] = {
            m: None if any(r[m] is None for r in rows) else _mean_std([r[m] for r in rows])
            for m in METRIC_NAMES
        }
    overall: dict[str, dict[str, float] | None] = {}
    for m in METRIC_NAMES:
        case_vals = [[getattr(cm, m) for cm in case.values()] for case in per_case]
        if any(v is None for vals in case_vals for v in vals) or any(not vals for vals in case_vals):
            overall[m] = None
        else:
            overall[m] = _mean_std([_nan_mean(vals) for vals in case_vals])
    return {"per_class": per_class, "overall": overall, "n_cases": len(per_case),
            "empty_mask_policy": empty_mask_policy}


def write_case_csv(
    path: str | os.PathLike[str], case_ids: list[str], per_case: list[dict[str, ClassMetrics]]
) -> None:
    """One row per (case, class) so any table can be re-derived; missing mm values are left blank."""
    if len(case_ids) != len(per_case):
        raise ValueError(f"{len(case_ids)} case ids for {len(per_case)} cases")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "class", *METRIC_NAMES])
        for case_id, case in zip(case_ids, per_case, strict=True):
            for name, cm in case.items():
                values = ("" if v is None else repr(float(v)) for v in asdict(cm).values())
                writer.writerow([case_id, name, *values])
