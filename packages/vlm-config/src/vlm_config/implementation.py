"""Resolve a config class's ``implementation`` import string (no torch here)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from vlm_config.components import ComponentConfig


def load_implementation(config: ComponentConfig | type[ComponentConfig]) -> Callable[..., Any]:
    """Import and return the builder named by ``type(config).implementation``.

    Raises:
        ValueError: when the class names no implementation or the string is malformed.
        ImportError: when the module or attribute cannot be imported; the message
            names the config class and the import string.
    """
    cls = config if isinstance(config, type) else type(config)
    target = cls.implementation
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"{cls.__qualname__}.implementation must be 'package.module:callable', got {target!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"cannot import {module_name!r} for {cls.__qualname__} ({target}): {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportError(
                f"{module_name!r} has no attribute {attr!r} (needed by {cls.__qualname__})"
            ) from exc
    if not callable(obj):
        raise ValueError(f"{target} (from {cls.__qualname__}) is not callable")
    return obj
