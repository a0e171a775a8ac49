"""The method registry. Built-ins register by name; a user's own class is named ``package.module:ClassName``.

Importing a module runs its code, so a ``module:Class`` name is imported only when the user named it in this
process (a config they wrote, ``--set method=...``, ``--method``): :func:`name_user_method` records that, and
:func:`get_method` refuses every other ``module:Class``. A name found in a checkpoint or a run directory's
``config.yaml`` (someone else's file, perhaps) therefore never imports anything by itself.
"""

from __future__ import annotations

import importlib

from dust.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_NAMED_BY_USER: set[str] = set()  # module:Class names the user gave in this process


class UntrustedMethodError(ValueError):
    """A ``module:Class`` method that the user did not name in this process: importing it would run its code."""


def is_user_method(name: str) -> bool:
    """Whether ``name`` is a user's own class (``module:Class``) rather than a registered method."""
    return ":" in str(name)


def name_user_method(name: str) -> None:
    """The user named ``name`` (config file, ``--set``, ``--method``): :func:`get_method` may import its module."""
    if is_user_method(name):
        _NAMED_BY_USER.add(str(name))


def refuse_unnamed_method(name: str, source: object, how: str) -> None:
    """Raise :class:`UntrustedMethodError` naming ``source`` when ``name`` is a ``module:Class`` the user has not
    named in this process; ``how`` says how to name it in the command at hand (e.g. ``--method NAME``)."""
    if is_user_method(name) and str(name) not in _NAMED_BY_USER:
        raise UntrustedMethodError(
            f"{source}: names the method {name!r}, code outside dust that it would have to import; dust imports a "
            f"module only when you name it yourself: if you trust it, add {how}")


def register(name: str):
    """Class decorator: ``@register("mean_teacher")`` makes the method available as ``method: mean_teacher``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """Look up a registered method, or import ``package.module:ClassName`` from the user's own code (only a name
    the user gave in this process: :func:`name_user_method`)."""
    if is_user_method(name):
        refuse_unnamed_method(name, "the config", f"--method {name}")
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
