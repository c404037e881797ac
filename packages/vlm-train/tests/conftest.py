"""Fixtures of vlm-train's tests (helpers live in ``train_helpers``)."""

from train_helpers import tiny_dict, tiny_job, trained_run

__all__ = ["tiny_dict", "tiny_job", "trained_run"]
