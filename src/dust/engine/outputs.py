"""Which files of an output folder ``dust predict`` may replace: only those it wrote, and only with the same model.

An output folder gets a record, ``dust_predictions.json``: the checkpoint (path and SHA-256 of its bytes) and every
file written for it. Before a case is predicted, each file about to be written is checked: one that exists but
is not in the record (ground-truth labels in ``scans/labels``, the input images) is refused, and so is a folder
whose record names another model (labels of two models side by side, or labels of one model beside the
uncertainty maps of another, would pass for one result). The record lists the files before they are written, so
a predict that was killed midway is continued by the same command; temp files its kill left behind are removed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dust.storage import UnreadableFileError, atomic_write_text, read_json

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
