"""Backwards-compatible re-exports: the digits datasets live in :mod:`vlm_data.digits`."""

from __future__ import annotations

from vlm_data.digits import (
    DIGIT_WORDS,
    DigitsCaptionDataset,
    DigitsVideoDataset,
    digit_images,
    digits_split,
)

__all__ = [
    "DIGIT_WORDS",
    "DigitsCaptionDataset",
    "DigitsVideoDataset",
    "digit_images",
    "digits_split",
]
