"""Methods: what a method is (:mod:`dust.methods.base`), the registry (:mod:`dust.methods.registry`), and the
built-in methods, one file each, registered here by importing them.

A new built-in method is a file with an ``@register("name")`` class, added to the import list below.
"""

from __future__ import annotations

from dust.methods import (  # noqa: F401  (imported to register them)
    cps,
    dct,
    dtc,
    dust,
    fixdyn,
    mc_net,
    mcf,
    mean_teacher,
    multicure,
    st_plus_plus,
    supervised,
    ua_mt,
    urpc,
)
from dust.methods.base import Method, RunContext, Stage
from dust.methods.registry import (
    UntrustedMethodError,
    available_methods,
    get_method,
    is_user_method,
    name_user_method,
    refuse_unnamed_method,
    register,
)

__all__ = ["Method", "RunContext", "Stage", "register", "get_method", "available_methods", "name_user_method",
           "is_user_method", "refuse_unnamed_method", "UntrustedMethodError"]
