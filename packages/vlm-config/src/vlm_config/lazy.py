"""Lazy package exports, for plugin packages whose ``__init__`` must stay torch-free.

The plugin registry imports a config module (``pkg.configs``), which first imports
``pkg/__init__.py``; torch-side names there are resolved on first attribute access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package exporting ``names`` lazily.

    Args:
        package: the package's ``__name__`` (used in the ``AttributeError``).
        names: exported name -> module that defines it.
        namespace: the package's ``globals()``; a resolved name is cached there.

    Usage in ``__init__.py``::

        __getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
    """

    def getattr_(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(names))

    return getattr_, dir_
