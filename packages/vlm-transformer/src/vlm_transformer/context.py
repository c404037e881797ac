"""``ModalityContext``: everything an arch injects into one decoder forward."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["ModalityContext"]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


@dataclass(frozen=True)
class ModalityContext:
    """Inputs beyond ``input_ids`` for one ``Transformer.forward``.

    Notation: ``B`` batch, ``P`` prefix length (``prefix_embeds.shape[1]``, else 0),
    ``S_text`` the text length (``input_ids.shape[1]`` or ``inputs_embeds.shape[1]``),
    ``S = P + S_text`` the residual-stream length of this forward (with a KV cache: the
    *new* positions only), ``D`` model width.

    Attributes:
        prefix_embeds: ``(B, P, D)`` floating; concatenated *before* the text embeddings
            (cast to the embedding dtype).
        trim_prefix: positions dropped from the front before the LM head, so logits cover
            ``S - trim_prefix`` positions. ``None`` (default) means ``P``.
        image_features: ``(B, T, D)`` floating, for archs whose trunk reads images from
            the side (cross-attention); the dense trunk ignores it.
        image_mask: ``(B, T)`` bool, True = real image token; needs ``image_features``.
        modality_ids: ``(B, S)`` long, per-position modality tag (archs define values).
        key_padding_mask: ``(B, S)`` bool, True = real key. Padded positions are never
            attended (except by themselves); their outputs are garbage and must be
            ignored. Without explicit ``positions``, rotary positions are
            ``cumsum(key_padding_mask) - 1`` (so left padding does not shift positions).
        inputs_embeds: ``(B, S_text, D)`` floating, replaces the token embedding; passing
            ``input_ids`` too is an error.
        placeholder_mask: ``(B, S_text)`` bool, True at the text positions whose token
            embedding is replaced by a row of ``placeholder_embeds`` (images anywhere in
            the sequence: their visual tokens fill placeholder positions).
        placeholder_embeds: ``(K, D)`` floating with ``K = placeholder_mask.sum()``: the
            replacement embeddings in row-major order of ``placeholder_mask`` (row 0's
            positions left to right, then row 1's ...). Both or neither must be given.
        sequence_ids: ``(B, S)`` long, packing: the sample each position belongs to
            (a sample is a contiguous run of one id). A query attends only to keys of its
            own sample, and without explicit ``positions`` rotary positions restart at 0
            at every sample start (counting real positions only, like
            ``key_padding_mask``). Not allowed with a KV cache.
        image_query_mask: ``(B, S, T)`` bool, for archs that read images from the side:
            True where position ``s`` may read image token ``t`` (images anywhere: a
            position sees only the images before it). Needs ``image_features``; the
            archs decide what an all-False row means (typically: add exactly nothing).
        grad_anchor: a 0-d floating tensor that must equal 0, added to the input
            embeddings: it carries the (zero) gradient path of modules that ran on a
            dummy input (a text-only batch still runs the vision encoder so distributed
            collectives stay in step) into the decoder's backward at the place real
            visual tokens would enter. ``x + 0.0 == x``, so the values are unchanged.
        prefix_bidirectional: prefix-LM; the ``P`` prefix positions attend each other in
            both directions, text stays causal. Needs ``prefix_embeds``.
        extras: free-form arch data (e.g. frame masks, routing hints); not validated.

    Raises:
        ValueError: at construction for contradictory or malformed fields (wrong rank or
            dtype, mismatched batch sizes, ``image_mask`` without ``image_features``,
            ``trim_prefix`` outside ``[0, P]`` when there is a prefix, ``trim_prefix > 0``
            with neither prefix nor ``inputs_embeds``, ``prefix_bidirectional`` without a
            prefix); in :meth:`validate` for shapes that disagree with the forward.
    """

    prefix_embeds: Tensor | None = None
    trim_prefix: int | None = None
    image_features: Tensor | None = None
    image_mask: Tensor | None = None
    modality_ids: Tensor | None = None
    key_padding_mask: Tensor | None = None
    inputs_embeds: Tensor | None = None
    placeholder_mask: Tensor | None = None
    placeholder_embeds: Tensor | None = None
    sequence_ids: Tensor | None = None
    image_query_mask: Tensor | None = None
    grad_anchor: Tensor | None = None
    prefix_bidirectional: bool = False
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("prefix_embeds", "image_features", "inputs_embeds"):
            t = getattr(self, name)
            if t is not None and (t.ndim != 3 or not t.is_floating_point()):
                raise ValueError(
                    f"ModalityContext.{name} must be a floating (B, L, D) tensor, got "
                    f"{_shape(t)} {t.dtype}"
                )
        for name, dtype in (
            ("image_mask", torch.bool),
            ("modality_ids", torch.long),
            ("key_padding_mask", torch.bool),
            ("placeholder_mask", torch.bool),
            ("sequence_ids", torch.long),
        ):
            t = getattr(self, name)
            if t is not None and (t.ndim != 2 or t.dtype != dtype):
                raise ValueError(
                    f"ModalityContext.{name} must be a (B, L) {dtype} tensor, got "
                    f"{_shape(t)} {t.dtype}"
                )
        if self.placeholder_embeds is not None and (
            self.placeholder_embeds.ndim != 2 or not self.placeholder_embeds.is_floating_point()
        ):
            raise ValueError(
                "ModalityContext.placeholder_embeds must be a floating (K, D) tensor, got "
                f"{_shape(self.placeholder_embeds)} {self.placeholder_embeds.dtype}"
            )
        if (self.placeholder_mask is None) != (self.placeholder_embeds is None):
            raise ValueError(
                "ModalityContext.placeholder_mask and placeholder_embeds go together "
                "(give both or neither)"
            )
        if self.image_query_mask is not None:
            if self.image_query_mask.ndim != 3 or self.image_query_mask.dtype != torch.bool:
                raise ValueError(
                    "ModalityContext.image_query_mask must be a (B, S, T) bool tensor, got "
                    f"{_shape(self.image_query_mask)} {self.image_query_mask.dtype}"
                )
            if self.image_features is None:
                raise ValueError("ModalityContext.image_query_mask given without image_features")
            if self.image_query_mask.shape[2] != self.image_features.shape[1]:
                raise ValueError(
                    "ModalityContext.image_query_mask must be (B, S, T) with T = "
                    f"{self.image_features.shape[1]} (image_features), got "
                    f"{_shape(self.image_query_mask)}"
                )
        if self.grad_anchor is not None and (
            self.grad_anchor.ndim != 0 or not self.grad_anchor.is_floating_point()
        ):
            raise ValueError(
                "ModalityContext.grad_anchor must be a 0-d floating tensor, got "
                f"{_shape(self.grad_anchor)} {self.grad_anchor.dtype}"
            )
        batches = {
            name: getattr(self, name).shape[0]
            for name in (
                "prefix_embeds",
                "image_features",
                "image_mask",
                "modality_ids",
                "key_padding_mask",
                "inputs_embeds",
                "placeholder_mask",
                "sequence_ids",
                "image_query_mask",
            )
            if getattr(self, name) is not None
        }
        if len(set(batches.values())) > 1:
            raise ValueError(f"ModalityContext fields disagree on the batch size: {batches}")
        if self.image_mask is not None:
            if self.image_features is None:
                raise ValueError("ModalityContext.image_mask given without image_features")
            expected = tuple(self.image_features.shape[:2])
            if _shape(self.image_mask) != expected:
                raise ValueError(
                    f"ModalityContext.image_mask must be {expected} (B, T of image_features), "
                    f"got {_shape(self.image_mask)}"
                )
        if self.trim_prefix is not None:
            if self.trim_prefix < 0:
                raise ValueError(f"trim_prefix must be >= 0, got {self.trim_prefix}")
            if self.prefix_embeds is not None and self.trim_prefix > self.prefix_len:
                raise ValueError(
                    f"trim_prefix ({self.trim_prefix}) exceeds the prefix length "
                    f"P={self.prefix_len}"
                )
            if self.trim_prefix > 0 and self.prefix_embeds is None and self.inputs_embeds is None:
                raise ValueError("trim_prefix > 0 needs prefix_embeds or inputs_embeds")
        if self.prefix_bidirectional and self.prefix_embeds is None:
            raise ValueError("prefix_bidirectional=True needs prefix_embeds")

    @property
    def prefix_len(self) -> int:
        """``P``: number of prefix positions (0 without ``prefix_embeds``)."""
        return 0 if self.prefix_embeds is None else int(self.prefix_embeds.shape[1])

    @property
    def trim(self) -> int:
        """Resolved ``trim_prefix`` (``P`` when ``trim_prefix`` is ``None``)."""
        return self.prefix_len if self.trim_prefix is None else self.trim_prefix

    def validate(self, batch: int, seq_len: int, dim: int) -> None:
        """Check shapes against a forward with ``batch`` rows, ``seq_len`` text positions
        (``S_text``) and model width ``dim``. Called by ``Transformer.forward`` before
        any compute.

        Raises:
            ValueError: naming the field and the expected shape.
        """
        total = self.prefix_len + seq_len
        expected: dict[str, tuple[int | str, ...]] = {
            "prefix_embeds": (batch, self.prefix_len, dim),
            "inputs_embeds": (batch, seq_len, dim),
            "modality_ids": (batch, total),
            "key_padding_mask": (batch, total),
            "placeholder_mask": (batch, seq_len),
            "sequence_ids": (batch, total),
        }
        for name, shape in expected.items():
            t = getattr(self, name)
            if t is not None and _shape(t) != shape:
                raise ValueError(
                    f"ModalityContext.{name} must have shape {shape} (B, "
                    f"{'P+S_text' if len(shape) == 2 else 'L'}, ...), got {_shape(t)}"
                )
        if self.image_query_mask is not None and _shape(self.image_query_mask)[:2] != (
            batch,
            total,
        ):
            raise ValueError(
                f"ModalityContext.image_query_mask must be ({batch}, {total}, T) (B, P+S_text, "
                f"T), got {_shape(self.image_query_mask)}"
            )
        if self.placeholder_embeds is not None:
            assert self.placeholder_mask is not None
            if self.placeholder_embeds.shape[1] != dim:
                raise ValueError(
                    f"ModalityContext.placeholder_embeds must be (K, {dim}), got "
                    f"{_shape(self.placeholder_embeds)}"
                )
            if not torch.compiler.is_compiling():
                k = int(self.placeholder_mask.sum())
                if self.placeholder_embeds.shape[0] != k:
                    raise ValueError(
                        f"ModalityContext.placeholder_embeds must have one row per True of "
                        f"placeholder_mask ({k}), got {_shape(self.placeholder_embeds)}"
                    )
        if self.image_features is not None:
            b, _, d = self.image_features.shape
            if b != batch or d != dim:
                raise ValueError(
                    f"ModalityContext.image_features must be ({batch}, T, {dim}), got "
                    f"{_shape(self.image_features)}"
                )
        if self.trim > total:
            raise ValueError(f"trim_prefix ({self.trim}) exceeds the sequence length {total}")
