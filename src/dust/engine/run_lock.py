"""One process per run directory: an advisory lock on ``<run_dir>/run.lock`` holding the owner's pid.

Two ``dust train`` on one run directory (or ``--resume`` of a run still going) would interleave ``train.log`` and
overwrite each other's checkpoints and metrics. A POSIX record lock (``fcntl.lockf``) is released by the operating
system when its process dies, so ``kill -9`` never leaves a stale lock; the pid in the file only serves the message.
Under ``torchrun`` rank 0 holds it (the other ranks write nothing).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from dust.engine.errors import RunDirectoryBusyError

LOCK_NAME = "run.lock"


def lock_run_directory(run_dir: Path) -> IO[str]:
    """Hold ``run_dir`` for this process; the returned file keeps the lock until it is closed or the process ends.
    Raises ``RunDirectoryBusyError`` naming the holder's pid when another process holds it."""
    handle = open(Path(run_dir) / LOCK_NAME, "a+")  # noqa: SIM115 - the open file is the lock
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirectoryBusyError(f"{run_dir}: another dust process (pid {holder}) is using this run directory; "
                                    "wait for it to finish, or give this run another run_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
