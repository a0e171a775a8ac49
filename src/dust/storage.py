"""Files that survive a kill: written atomically (temp file + rename), checkpoints read back as weights only.

Every file dust writes that a user relies on (checkpoints, snapshots, results JSONs, configs, NIfTI outputs)
goes through :func:`atomic_write` (or its text / torch wrappers): a kill at any moment leaves either the previous
file or the new one, never half a file, and a full disk is one line naming the file. Reading a checkpoint
(:func:`load_checkpoint`) refuses pickled Python objects and names the file in every error.
"""

from __future__ import annotations

import errno
import io
import json
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


class UnreadableFileError(ValueError):
    """A file dust reads back (a JSON record, a metrics summary) that is missing or damaged; the message names it."""


class DiskFullError(OSError):
    """No space left while writing a file; the message names it (the previous version is intact)."""


class StorageError(OSError):
    """A file that cannot be written (a read-only folder, a folder where a file should go...); the message names
    it, and the previous version, if any, is intact."""


def write_error(path: Path, err: OSError) -> OSError:
    """The one-line error for an ``OSError`` met while writing ``path``: :class:`DiskFullError` for a full disk,
    else :class:`StorageError`, both naming the file (``err.strerror`` holds the message)."""
    if err.errno == errno.ENOSPC:
        message = (f"{path}: no space left on device while writing it (the previous version, if any, is "
                   "intact; free some space, then resume)")
        log.error(message)
        return DiskFullError(errno.ENOSPC, message)
    reason = err.strerror or str(err) or type(err).__name__
    return StorageError(err.errno, f"{path}: cannot write it ({reason.rstrip('.')})")


def check_writable_folder(folder: Path) -> None:
    """Make ``folder`` if needed and make sure a file can be created in it, before any long work whose result
    would go there is started (a read-only checkpoint folder found after an hour of training loses the hour)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dust-write-check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise write_error(folder, err) from None


def atomic_write(path: str | Path, mode: str, write: Callable[[IO], None]) -> None:
    """Write through a temp file in the same folder, fsync, then rename over ``path``: a reader (or a kill)
    sees the old content or the new, never a torn file. Every ``OSError`` becomes one line naming ``path``."""
    path = Path(path)
    if path.is_dir():
        raise StorageError(errno.EISDIR, f"{path}: is a folder; give the name of a file to write")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the file gets what open() would have given it
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, DiskFullError | StorageError):
            raise write_error(path, err) from None
        raise


def read_json(path: str | Path) -> Any:
    """A JSON file dust (or the user) wrote, or one :class:`UnreadableFileError` line naming it and the problem."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnreadableFileError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnreadableFileError(f"{path}: not valid JSON ({err}); was it cut short or edited?") from None
    except OSError as err:
        raise UnreadableFileError(f"{path}: cannot read it ({err.strerror or err})") from None


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
    if not isinstance(state, dict) or state.get("format") != "dust-checkpoint":
        raise CheckpointError(f"{path}: not a dust checkpoint (it holds {describe_content(state)})")
    missing = [k for k in ("method", "num_classes", "config", "networks") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: an incomplete dust checkpoint: no {', '.join(missing)}")
    if state["method"] != method:
        raise CheckpointError(f"{path}: checkpoint is for method {state['method']!r}, not {method!r}")
    if int(state["num_classes"]) != int(num_classes):
        raise CheckpointError(
            f"{path}: checkpoint has {state['num_classes']} classes but the config asks for {num_classes}"
        )


def describe_content(obj: Any) -> str:
    """What a loaded file holds, in a few words, for an error message."""
    if isinstance(obj, torch.Tensor):
        return f"a bare tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))
        return f"a mapping with keys {keys[:8]}" + (" ..." if len(keys) > 8 else "")
    return f"a {type(obj).__name__}"


def load_network_weights(networks: dict[str, torch.nn.Module], state: dict[str, Any], path: Path) -> None:
    """Each network's weights from a checkpoint's ``networks``; weights that do not fit the model its config builds
    (a hand-edited config, a checkpoint of another model) are one ``CheckpointError`` naming the file, the network
    and the first mismatches, instead of PyTorch's multi-line ``load_state_dict`` report."""
    saved = state.get("networks", {}) if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: holds no network weights (it holds {describe_content(state)})")
    for name, net in networks.items():
        if name not in saved:
            raise CheckpointError(f"{path}: holds no weights for network {name!r} (it has {sorted(saved)})")
        try:
            net.load_state_dict(saved[name])
        except (RuntimeError, KeyError, TypeError, AttributeError) as err:
            problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err).strip()]
            summary = "; ".join(problems)
            summary = summary if len(summary) <= 300 else summary[:297] + "..."
            raise CheckpointError(f"{path}: the weights of network {name!r} do not fit the model its config "
                                  f"describes (was the config edited?): {summary}") from None
