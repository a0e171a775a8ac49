"""Trained checkpoints applied to new cases: ``dust predict``, ``dust rank``, and scoring folders of NIfTIs.

A case is read the way ``dust prepare`` read the training data (the checkpoint's config records
``modalities``, ``intensity_norm`` and ``slice_axis``), predicted by the engine's one inference path
(:class:`dust.inference.Predictor`: slice by slice for a 2D model, a sliding window for a 3D one), and
written back on the input's own voxel grid with its affine
and header (:mod:`dust.data.nifti`), so a viewer overlays it on the input without resampling.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dust.config import load_config
from dust.data.nifti import (
    InputCase,
    find_input_cases,
    nifti_stem,
    on_reference_grid,
    read_label_map,
    spacing_of,
    visible_files,
    write_stored,
)
from dust.data.preprocess import Preprocessing, read_input_case
from dust.data.types import DataError, missing_file
from dust.inference import Predictor
from dust.methods import Method
from dust.methods.loading import build_method, load_trained, pick_device, stored_config
from dust.metrics import case_metrics, summarize, write_case_csv
from dust.storage import (
    CheckpointError,
    UnreadableFileError,
    atomic_write_text,
    describe_content,
    load_checkpoint,
    read_json,
)
from dust.uncertainty import sample_uncertainty

log = logging.getLogger("dust")


def load_for_inference(path: Path, device: str | torch.device | None = None) -> tuple[Method, dict[str, Any]]:
    """A method in eval mode from a dust checkpoint, or from a DUST pre-training snapshot
    (``checkpoints/pretrain_kK.pt``: network weights only; the config is its run's ``config.yaml``), on ``device``
    (default auto: CUDA when available, else the CPU; the returned config's ``device`` names it)."""
    state = load_checkpoint(path)
    device = device if isinstance(device, torch.device) else pick_device(device or "auto")
    if isinstance(state, dict) and state.get("format") == "dust-checkpoint":
        method, cfg = load_trained(path, device)
    else:
        if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
            raise CheckpointError(f"{path}: neither a dust checkpoint nor a network's weights (it holds "
                                  f"{describe_content(state)})")
        config = path.resolve().parent.parent / "config.yaml"
        if not config.is_file():
            raise CheckpointError(f"{path}: holds network weights only, and its run's config {config} is missing")
        cfg = stored_config({**load_config(config), "device": str(device)}, config)  # its method is not imported
        method = build_method(cfg, device)
        try:
            method.networks["model"].load_state_dict(state)
        except (KeyError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"{path}: the weights do not fit the model of {config} ({err})") from None
    for net in method.networks.values():
        net.eval()
    return method, cfg


def _progress(cases: list[InputCase], desc: str, enabled: bool) -> tqdm:
    return tqdm(cases, desc=desc, unit="case", disable=None if enabled else True)  # None: on a terminal only


def _read_case(case: InputCase, cfg: dict[str, Any]):
    image, grid = read_input_case(case, Preprocessing.from_config(cfg))
    if image.shape[0] != cfg["in_channels"]:
        raise DataError(f"{case.paths[0]}: {image.shape[0]} input channel(s) (modalities {cfg['modalities']}), but "
                        f"the model takes in_channels={cfg['in_channels']}")
    if cfg["target_spacing"] is not None and grid.spacing is None:
        raise DataError(f"{case.paths[0]}: its voxel size is unknown (an h5 without a 'spacing' attribute), and this "
                        f"model resamples every case to {cfg['target_spacing']} mm; give it as NIfTI")
    trained = cfg["spacing"]  # a model without target_spacing sees every scan as it comes
    if cfg["target_spacing"] is None and trained is not None and grid.spacing is not None and not np.allclose(
            grid.spacing, trained, rtol=0.25):
        log.warning("%s: voxel size %s mm (S, H, W) differs from the %s mm this model was trained at, and the model "
                    "does not resample (no target_spacing): expect a worse segmentation", case.paths[0],
                    [round(s, 3) for s in grid.spacing], list(trained))
    return image, grid


def predict_cases(
    checkpoint: Path, input_path: Path, out_dir: Path, uncertainty: bool = False, progress: bool = True,
    device: str | None = None,
) -> list[Path]:
    """Label NIfTIs ``out_dir/<case>.nii.gz`` (and ``out_dir/uncertainty/<case>.nii.gz``) for every case, on
    ``device`` (default auto)."""
    folder = input_path if input_path.is_dir() else input_path.parent
    if out_dir.resolve() == folder.resolve():
        raise ValueError(f"{out_dir}: the output folder is the input folder; predictions would overwrite images")
    method, cfg = load_for_inference(checkpoint, device)
    predictor = Predictor.from_config(cfg, pick_device(cfg["device"]))
    cases = find_input_cases(input_path)
    # only files this model's earlier predict wrote may be replaced: checked for every case before the first
    claim_outputs(out_dir, checkpoint, [out_dir / f"{c.case_id}{c.ending}" for c in cases] + (
        [out_dir / "uncertainty" / f"{c.case_id}{c.ending}" for c in cases] if uncertainty else []))
    written, failed = [], []
    for case in _progress(cases, "predict", progress):
        try:  # a bad case is reported at the end; the others are still predicted
            image, grid = _read_case(case, cfg)
        except DataError as err:
            failed.append(str(err))
            continue
        segmentation = predictor.segment(method, image, uncertainty, spacing=grid.spacing)
        path = out_dir / f"{case.case_id}{case.ending}"
        write_stored(grid, segmentation.label.numpy().astype(np.uint8), np.uint8, path)
        written.append(path)
        if segmentation.uncertainty is not None:
            write_stored(grid, segmentation.uncertainty.numpy(), np.float32,
                         out_dir / "uncertainty" / f"{case.case_id}{case.ending}")
    if failed and len(cases) == 1:
        raise DataError(failed[0])  # the one case asked for: its own problem is the message
    if failed:
        raise DataError(f"{len(failed)} of {len(cases)} case(s) could not be predicted (the other {len(written)} "
                        f"are in {out_dir}):\n  " + "\n  ".join(failed))
    return written


# config keys that say how and where a run was executed or shown, not what it trained
SETTINGS_OF_THE_MACHINE = {"threads", "device", "progress", "tensorboard", "log_every", "keep_checkpoints",
                           "data_dir", "generate_phantom", "inference_windows_per_batch", "channels_last"}


def rank_cases(checkpoints: Sequence[Path], input_path: Path, out_csv: Path, progress: bool = True,
               device: str | None = None) -> list[dict]:
    """DUST's sample-level uncertainty (Eq. 1) of every case, written as a CSV sorted hardest first.

    ``checkpoints`` in training order (e.g. DUST's ``pretrain_k1.pt .. pretrain_kK.pt``); the last one is the
    reference F_K. A case's value is Eq. 1 averaged over all its voxels (the mean of its slices' values), or
    over its predicted foreground voxels where the run set ``sample_uncertainty_region: foreground``, at the
    input's resolution; ``hardest_slice`` is the slice (index along ``slice_axis``) with the largest value.
    """
    if len(checkpoints) < 2:
        raise ValueError("dust rank needs at least two checkpoints (Eq. 1 compares earlier ones with the last)")
    models = [load_for_inference(Path(p), device) for p in checkpoints]
    cfg = models[-1][1]
    for (_, other), path in zip(models, checkpoints, strict=True):
        # one run: the same config, but for settings that change no weight (a resume may change those); run_dir,
        # seed and method alone would let two runs that reused one run directory pass for one
        for key in sorted((set(cfg) | set(other)) - SETTINGS_OF_THE_MACHINE):
            if other.get(key) != cfg.get(key):
                raise CheckpointError(f"{path}: {key}={other.get(key)!r} differs from {checkpoints[-1]}'s "
                                      f"{cfg.get(key)!r}; rank with checkpoints of one run")
    device = pick_device(cfg["device"])
    predictors = [(m, Predictor.from_config(c, device)) for m, c in models]
    region = cfg.get("sample_uncertainty_region", "image")  # as the run ranked its pool
    rows = []
    for case in _progress(find_input_cases(input_path), "rank", progress):
        image, grid = _read_case(case, cfg)
        # (K checkpoints, classes, S, H, W) on the case's grid
        probs = torch.stack([predictor.case(lambda x, m=m: (m.predict(x),), image, grid.spacing)[0]
                             for m, predictor in predictors])
        volume = sample_uncertainty(probs[:, None], region)[0]  # the mean over all (or all foreground) voxels
        per_slice = sample_uncertainty(probs.transpose(1, 2), region)  # inf: no foreground on a slice
        rows.append({"case": case.case_id, "uncertainty": float(volume), "slices": len(per_slice),
                     "hardest_slice": int(torch.where(per_slice.isfinite(), per_slice, -1.0).argmax())})
    rows.sort(key=lambda r: -r["uncertainty"])  # stable: ties keep case order
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["rank", "case", "uncertainty", "slices", "hardest_slice"])
    for i, r in enumerate(rows, 1):
        writer.writerow([i, r["case"], f"{r['uncertainty']:.6g}", r["slices"], r["hardest_slice"]])
    atomic_write_text(text.getvalue(), out_csv)  # a full disk or a folder at --out: one line naming it
    return rows


def evaluate_folders(
    pred_dir: Path, ref_dir: Path, out_dir: Path | None = None, class_names: Sequence[str] | None = None,
    empty_mask_policy: str = "dust",
) -> dict:
    """Score ``pred_dir/<name>`` against every reference NIfTI ``ref_dir/<name>`` (nnU-Net's evaluate-folder).

    Distances in mm use the reference header's voxel size. ``class_names`` (background first) names labels
    0..K-1; by default every non-zero label found is scored, named by its value. ``empty_mask_policy``: how a class
    empty in the prediction or the reference scores (:mod:`dust.metrics.segmentation`). Writes ``metrics.csv`` (per
    case and class) and ``metrics.json`` (the summary) into ``out_dir`` (default: ``pred_dir``).
    """
    refs = [p for p in visible_files(ref_dir) if nifti_stem(p) is not None]
    if not refs:
        raise DataError(f"{ref_dir}: no reference NIfTI files (.nii.gz, .nii)")
    pairs = [(pred_dir / ref.name, ref) for ref in refs]
    for pred, ref in pairs:
        if not pred.is_file():
            raise DataError(f"{missing_file(pred)} (the prediction for {ref})")

    def read_pair(pred_path: Path, ref_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        (pred, pred_img), (ref, ref_img) = read_label_map(pred_path), read_label_map(ref_path)
        pred = on_reference_grid(pred, pred_img, pred_path, ref_img, ref_path)  # world space, not voxel order
        if class_names is not None:
            for label, path in ((pred, pred_path), (ref, ref_path)):
                outside = sorted({int(v) for v in np.unique(label)} - set(range(len(class_names))))
                if outside:
                    raise DataError(f"{path}: label values {outside} outside the {len(class_names)} class names")
        return pred, ref, spacing_of(ref_img)

    # a first pass checks every pair (and finds the labels present) before the first (slow) surface distance;
    # the maps are not all held in memory
    found = sorted({int(v) for pair in pairs for label in read_pair(*pair)[:2] for v in np.unique(label)} - {0})
    names = {v: str(v) for v in found} if class_names is None else {
        i: n for i, n in enumerate(class_names) if i > 0}
    per_case = []
    for pred_path, ref_path in pairs:
        pred, ref, spacing = read_pair(pred_path, ref_path)
        per_case.append(case_metrics(pred, ref, names, spacing, empty_mask_policy=empty_mask_policy))
    summary = summarize(per_case, empty_mask_policy)
    out_dir = out_dir or pred_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_case_csv(out_dir / "metrics.csv", [nifti_stem(ref) for _, ref in pairs], per_case)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------------------------------ the output folder's record
# Which files of an output folder ``dust predict`` may replace: only those it wrote, and only with the same model.
#
# An output folder gets a record, ``dust_predictions.json``: the checkpoint (path and SHA-256 of its bytes) and every
# file written for it. Before a case is predicted, each file about to be written is checked: one that exists but
# is not in the record (ground-truth labels in ``scans/labels``, the input images) is refused, and so is a folder
# whose record names another model (labels of two models side by side, or labels of one model beside the
# uncertainty maps of another, would pass for one result). The record lists the files before they are written, so
# a predict that was killed midway is continued by the same command; temp files its kill left behind are removed.
RECORD = "dust_predictions.json"


def model_identity(checkpoint: Path) -> dict[str, str]:
    """The checkpoint's path and the SHA-256 of its bytes: a retrained ``best.pt`` at the same path is another
    model."""
    digest = hashlib.sha256()
    with checkpoint.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"checkpoint": str(checkpoint.resolve()), "sha256": digest.hexdigest()}


def claim_outputs(out_dir: Path, checkpoint: Path, targets: list[Path]) -> None:
    """Make sure every path of ``targets`` (inside ``out_dir``) may be written for ``checkpoint``, then record
    them; raises ``FileExistsError`` naming the first file or folder that may not, before anything is written."""
    record_path = out_dir / RECORD
    model = model_identity(checkpoint)
    written: list[str] = []
    if record_path.exists():
        record = read_json(record_path)
        if not (isinstance(record, dict) and isinstance(record.get("files"), list)
                and isinstance(record.get("model"), dict)):
            raise UnreadableFileError(f"{record_path}: not a dust predict record; choose another --output")
        if record["model"].get("sha256") != model["sha256"]:
            raise FileExistsError(
                f"{out_dir}: holds predictions of another model ({record['model'].get('checkpoint')}); adding "
                f"those of {checkpoint} would mix two models' results in one folder; choose another --output")
        written = [str(f) for f in record["files"]]
    names = [t.relative_to(out_dir).as_posix() for t in targets]
    for target, name in zip(targets, names, strict=True):
        if (target.exists() or target.is_symlink()) and name not in written:
            raise FileExistsError(f"{target}: exists and was not written by dust predict (a label or image of "
                                  "yours?); it would be replaced: choose another --output")
    for target in targets:  # what a killed predict left: hidden temp files of cut writes (dust's own names)
        if target.parent.is_dir():
            for partial in target.parent.glob(f".{target.name}.*.tmp"):
                partial.unlink(missing_ok=True)
    files = sorted({*written, *names})
    atomic_write_text(json.dumps({"format": "dust-predictions", "model": model, "files": files}, indent=1),
                      record_path)
