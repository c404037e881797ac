"""User-facing errors: the CLI prints them as one ``error: ...`` line."""

from __future__ import annotations

__all__ = ["CaptionTooLongError", "DataError", "VLMTrainError"]


class VLMTrainError(Exception):
    """Base of the errors caused by bad input (files, data, checkpoints), not by bugs."""


class DataError(VLMTrainError, ValueError):
    """A dataset, image or manifest that cannot be used."""


class CaptionTooLongError(DataError):
    """Prompt + caption do not fit ``arch.max_text_len``."""
