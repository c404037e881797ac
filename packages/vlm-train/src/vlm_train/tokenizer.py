"""Backwards-compatible re-exports: tokenisers live in :mod:`vlm_data.tokenizer`."""

from __future__ import annotations

from vlm_data.tokenizer import SPECIAL_TOKENS, TextTokenizer, pretrained_tokenizer

__all__ = ["SPECIAL_TOKENS", "TextTokenizer", "pretrained_tokenizer"]
