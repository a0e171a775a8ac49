"""Files that survive a kill: written atomically (temp file + rename), checkpoints read back as weights only.

Every file dust writes that a user relies on (checkpoints, snapshots, results JSONs, configs, NIfTI outputs)
goes through :func:`atomic_write` (or its text / torch wrappers): a kill at any moment leaves either the previous
file or the new one, never half a file, and a full disk is one line naming the file. Reading a checkpoint
(:func:`load_checkpoint`) refuses pickled Python objects and names the file in every error.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

log = logging.getLogger("dust")
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), and set back at once
os.umask(_UMASK)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the file."""


class DiskFullError(OSError):
    """No space left while writing a file; the message names it (the previous version is intact)."""


def atomic_write(path: str | Path, mode: str, write: Callable[[IO], None]) -> None:
    """Write through a temp file in the same folder, fsync, then rename over ``path``: a reader (or a kill)
    sees the old content or the new, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the file gets what open() would have given it
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            message = (f"{path}: no space left on device while writing it (the previous version, if any, is "
                       "intact; free some space, then resume)")
            log.error(message)
            raise DiskFullError(errno.ENOSPC, message) from None
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    atomic_write(path, "w", lambda f: f.write(text))


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically (checkpoints, snapshots). Serialised in memory first, so that a failed write is
    the operating system's error (e.g. ENOSPC) and not a failure deep inside PyTorch's zip writer."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, "wb", lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # said without torch's hint to load it anyway (weights_only=False)
        detail = _unpickling_detail(str(err))
        if "GLOBAL" in detail:
            raise CheckpointError(f"{path}: refused: it holds Python objects beyond weights ({detail}); dust loads "
                                  "checkpoints as weights only") from None
        raise CheckpointError(f"{path}: not a readable dust checkpoint ({detail})") from None
    except Exception as err:  # torch raises several types for truncated / foreign files
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable dust checkpoint ({type(err).__name__}: {first_line})") from None


def _unpickling_detail(message: str) -> str:
    """The lines of torch's weights-only refusal that say what was found, without its boilerplate."""
    boilerplate = ("Weights only load failed", "weights_only", "Please file an issue", "Check the documentation")
    lines = [line.replace("WeightsUnpickler error:", "").strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not any(b in line for b in boilerplate)]
    return "; ".join(kept) or "unreadable"


def check_compatible(state: dict[str, Any], path: Path, method: str, num_classes: int) -> None:
    """Refuse to load a checkpoint of another method or class count, with a message saying which."""
    if state.get("format") != "dust-checkpoint":
        raise CheckpointError(f"{path}: not a dust checkpoint")
    if state["method"] != method:
        raise CheckpointError(f"{path}: checkpoint is for method {state['method']!r}, not {method!r}")
    if int(state["num_classes"]) != int(num_classes):
        raise CheckpointError(
            f"{path}: checkpoint has {state['num_classes']} classes but the config asks for {num_classes}"
        )


def load_network_weights(networks: dict[str, torch.nn.Module], state: dict[str, Any], path: Path) -> None:
    """Each network's weights from a checkpoint's ``networks``; weights that do not fit the model its config builds
    (a hand-edited config, a checkpoint of another model) are one ``CheckpointError`` naming the file, the network
    and the first mismatches, instead of PyTorch's multi-line ``load_state_dict`` report."""
    saved = state.get("networks", {})
    for name, net in networks.items():
        if name not in saved:
            raise CheckpointError(f"{path}: holds no weights for network {name!r} (it has {sorted(saved)})")
        try:
            net.load_state_dict(saved[name])
        except (RuntimeError, KeyError, TypeError) as err:
            problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err).strip()]
            summary = "; ".join(problems)
            summary = summary if len(summary) <= 300 else summary[:297] + "..."
            raise CheckpointError(f"{path}: the weights of network {name!r} do not fit the model its config "
                                  f"describes (was the config edited?): {summary}") from None
