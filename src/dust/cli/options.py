"""Options several commands share."""

from __future__ import annotations

import argparse

from dust.methods import name_user_method


def add_method_option(parser: argparse.ArgumentParser) -> None:
    """``--method MODULE:CLASS``: the user's own method class, which a checkpoint or run directory names but dust
    imports only when the user names it too (importing a module runs its code)."""
    parser.add_argument("--method", action="append", default=[], metavar="MODULE:CLASS",
                        help="your own method class that the checkpoint or run names (e.g. mypkg.mod:MyMethod); "
                             "dust imports a module only when you name it here (repeatable)")


def trust_named_methods(args: argparse.Namespace) -> None:
    """The classes the user named with ``--method`` may be imported in this process."""
    for name in getattr(args, "method", None) or []:
        name_user_method(name)
