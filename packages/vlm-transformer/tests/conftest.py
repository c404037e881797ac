"""Fixtures of vlm-transformer's tests (helpers live in ``tf_helpers``)."""

from tf_helpers import model

__all__ = ["model"]
