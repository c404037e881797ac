"""Fixtures of vlm-config's tests (helpers live in ``config_helpers``)."""

from config_helpers import registered

__all__ = ["registered"]
