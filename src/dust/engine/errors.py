"""Errors the engine raises that the CLI reports as one line (no traceback): the user can act on them."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf; raised before the bad step touches the weights or checkpoints.

    The message names the iteration and the loss term(s); ``dust train --resume`` restarts from the last
    good checkpoint (e.g. after lowering ``lr``).
    """


class RunFailedError(RuntimeError):
    """A training run started as a separate process (``dust benchmark --jobs``) exited with an error; the
    message names the run's command, its last output line and the file holding the rest."""


class RunDirectoryBusyError(RuntimeError):
    """Another process holds the run directory (``dust train`` twice on one run, or ``--resume`` of a live run);
    the message names the directory and the holder's pid."""
