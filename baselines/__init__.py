"""Retrieval methods found by name.

Every module in this package that defines a subclass of :class:`quari.methods.RetrievalMethod`
with a ``name`` is a method the config can ask for; QuARI itself is registered from ``quari``.
Adding a baseline is dropping one module here. A module whose optional dependency is missing is
skipped with a warning (it disables that method, not the harness).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil

from quari.methods import RetrievalMethod

log = logging.getLogger(__name__)
_BROKEN: dict[str, str] = {}


def _discover() -> dict[str, type[RetrievalMethod]]:
    found: dict[str, type[RetrievalMethod]] = {}
    modules = ["quari.quari_method"] + [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)
                                          if not m.name.startswith("_")]
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:  # an optional dependency of that one method is missing
            _BROKEN[module_name] = str(err)
            log.warning("method module %s unavailable: %s", module_name, err)
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, RetrievalMethod) and obj.name and obj.__module__ == module.__name__:
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two methods are named {obj.name!r}: "
                                       f"{found[obj.name].__module__} and {module_name}")
                found[obj.name] = obj
    return found


def available_methods() -> list[str]:
    """Names of every registered method."""
    return sorted(_discover())


def get_method(name: str) -> type[RetrievalMethod]:
    """The method class called ``name``; an unknown name lists what exists."""
    methods = _discover()
    if name not in methods:
        hint = "".join(f"\n  {m}: {e}" for m, e in _BROKEN.items())
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(methods))}"
                       + (f"\nunavailable modules:{hint}" if hint else ""))
    return methods[name]
