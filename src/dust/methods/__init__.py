"""Method registry. Built-ins register by name; a user's own class is named ``package.module:ClassName``."""

from __future__ import annotations

import importlib

from dust.methods.base import Method, RunContext, Stage

__all__ = ["Method", "RunContext", "Stage", "register", "get_method", "available_methods"]

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: ``@register("mean_teacher")`` makes the method available as ``method: mean_teacher``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    # Imported lazily so that `import dust.methods` stays cheap and free of cycles.
    from dust.methods import (  # noqa: F401
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


def available_methods() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """Look up a registered method, or import ``package.module:ClassName`` from the user's own code."""
    _load_builtins()
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"method {name!r}: cannot import module {module_name!r} ({err})") from None
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ValueError(f"method {name!r}: {module_name} has no dust.methods.Method subclass {attr!r}")
        return cls
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(_REGISTRY)} (or use module:Class)")
    return _REGISTRY[name]
