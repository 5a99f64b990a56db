"""The pass registry: built-in passes register themselves; plug-ins come through an entry-point group."""

from __future__ import annotations

import difflib
from importlib import import_module
from importlib.metadata import entry_points

from .errors import OnnxShrinkError, UsageError
from .pass_base import Pass

ENTRY_POINT_GROUP = "onnxshrink.passes"

_registry: dict[str, type[Pass]] = {}
_loaded = False


def register_pass(name: str):
    """Class decorator: `@register_pass("prune")` makes the pass available under that name."""

    def decorate(cls: type[Pass]) -> type[Pass]:
        if not issubclass(cls, Pass):
            raise TypeError(f"{cls.__name__} must subclass onnxshrink.Pass")
        if name in _registry and _registry[name] is not cls:
            raise ValueError(f"pass '{name}' is already registered by {_registry[name].__module__}")
        cls.name = name
        _registry[name] = cls
        return cls

    return decorate


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import_module("onnxshrink.passes")  # built-in passes register on import
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except Exception as exc:  # a broken plug-in must not break the built-in passes
            raise OnnxShrinkError(f"plug-in pass '{entry.name}' ({entry.value}) failed to load: {exc}") from None
        if entry.name not in _registry:
            register_pass(entry.name)(cls)


def get_pass(name: str) -> type[Pass]:
    _load_all()
    if name not in _registry:
        close = difflib.get_close_matches(name, _registry, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(sorted(_registry))})"
        raise UsageError(f"unknown pass '{name}'{hint}")
    return _registry[name]


def all_passes() -> dict[str, type[Pass]]:
    _load_all()
    return dict(sorted(_registry.items()))
