"""Errors of bad data (files, records, tokenisers), not of bugs."""

from __future__ import annotations

__all__ = ["CaptionTooLongError", "DataError"]


class DataError(ValueError):
    """A dataset, record, image, manifest or tokeniser that cannot be used.

    Messages name the file (and the record, where there is one), what is wrong and what
    is allowed.
    """


class CaptionTooLongError(DataError):
    """Prompt + caption do not fit ``arch.max_text_len``."""
