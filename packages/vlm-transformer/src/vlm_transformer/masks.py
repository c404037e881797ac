"""Attention-mask objects handed to the attention core.

An :class:`AttentionMask` is either the SDPA ``is_causal`` fast path (no mask tensor),
"attend to everything" (no mask tensor), or a dense boolean tensor where ``True`` means
"this query may attend to this key".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AttentionMask", "build_attention_mask"]


@dataclass(frozen=True)
class AttentionMask:
    """What a query may attend to.

    Attributes:
        dense: ``None`` or a bool tensor broadcastable to ``(B, H, Sq, Sk)`` (typically
            ``(B, 1, Sq, Sk)`` or ``(1, 1, Sq, Sk)``); ``True`` = may attend.
        is_causal: use SDPA's ``is_causal`` (top-left aligned, so only valid when
            ``Sq == Sk``); requires ``dense is None``.
        guard_empty_rows: when ``True`` the attention core lets a query row with no
            allowed key attend everything and then zeroes its output, so it stays finite.
            Masks from :func:`build_attention_mask` never need it (a query always sees its
            own slot); :meth:`from_key_padding` (cross-attention) sets it.
    """

    dense: Tensor | None = None
    is_causal: bool = False
    guard_empty_rows: bool = False

    def __post_init__(self) -> None:
        if self.is_causal and self.dense is not None:
            raise ValueError("AttentionMask: is_causal=True cannot be combined with a dense mask")
        if self.dense is not None:
            if self.dense.dtype != torch.bool:
                raise ValueError(f"AttentionMask.dense must be bool, got {self.dense.dtype}")
            if self.dense.ndim != 4:
                raise ValueError(
                    "AttentionMask.dense must be 4-D (B, H|1, Sq, Sk), got "
                    f"{tuple(self.dense.shape)}"
                )

    @classmethod
    def causal(cls) -> AttentionMask:
        """Causal self-attention with ``Sq == Sk`` and nothing masked (fast path)."""
        return cls(is_causal=True)

    @classmethod
    def full(cls) -> AttentionMask:
        """Every query attends every key (e.g. one decode query after the cache)."""
        return cls()

    @classmethod
    def from_key_padding(cls, key_valid: Tensor) -> AttentionMask:
        """Mask keys only: ``key_valid (B, Sk) bool`` (True = real key) -> ``(B,1,1,Sk)``.

        Queries whose keys are all invalid produce zeros (``guard_empty_rows``).

        Raises:
            ValueError: ``key_valid`` is not a 2-D bool tensor.
        """
        if key_valid.dtype != torch.bool or key_valid.ndim != 2:
            raise ValueError(
                "key_valid must be a (B, Sk) bool tensor, got "
                f"{tuple(key_valid.shape)} {key_valid.dtype}"
            )
        return cls(dense=key_valid[:, None, None, :], guard_empty_rows=True)


def build_attention_mask(
    *,
    q_len: int,
    kv_len: int,
    device: torch.device | str,
    key_valid: Tensor | None = None,
    prefix_len: int = 0,
    prefix_bidirectional: bool = False,
    sequence_ids: Tensor | None = None,
) -> AttentionMask:
    """Self-attention mask for queries appended after ``kv_len - q_len`` cached keys.

    Query ``i`` occupies cache slot ``past + i`` (``past = kv_len - q_len``) and may see
    keys at slots ``<= past + i`` (causal), restricted to ``key_valid`` keys. With
    ``prefix_bidirectional`` the first ``prefix_len`` queries of this call (slots
    ``past .. past+prefix_len-1``) also see each other both ways (prefix-LM).

    NaN guard: every query may always see its own slot, so no row is empty and SDPA
    stays finite; a query whose own key is padding is itself padding, and its output
    is meaningless and must be discarded by the caller.

    Fast paths (no mask tensor): nothing masked and ``past == 0`` -> ``is_causal``;
    nothing masked and ``q_len == 1`` -> attend everything.

    Packing: with ``sequence_ids (B, kv_len)`` long (needs ``q_len == kv_len``, no
    cache) a query sees only keys with its own id (a block-diagonal causal mask).

    Args:
        key_valid: ``(B, kv_len)`` bool, True = real key; ``None`` = all real.
        sequence_ids: ``(B, kv_len)`` long sample ids; ``None`` = one sample per row.

    Raises:
        ValueError: inconsistent lengths, a wrongly shaped ``key_valid`` or
            ``sequence_ids``, or ``sequence_ids`` with cached keys (``kv_len > q_len``).
    """
    if q_len < 1 or kv_len < q_len:
        raise ValueError(f"need 1 <= q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
    if key_valid is not None and (
        key_valid.dtype != torch.bool or key_valid.ndim != 2 or key_valid.shape[1] != kv_len
    ):
        raise ValueError(
            f"key_valid must be (B, {kv_len}) bool, got {tuple(key_valid.shape)} {key_valid.dtype}"
        )
    if sequence_ids is not None and (
        sequence_ids.dtype != torch.long
        or sequence_ids.ndim != 2
        or sequence_ids.shape[1] != kv_len
        or kv_len != q_len
    ):
        raise ValueError(
            f"sequence_ids must be (B, {kv_len}) long with no cached keys (q_len == kv_len), "
            f"got {tuple(sequence_ids.shape)} {sequence_ids.dtype} with q_len={q_len}"
        )
    past = kv_len - q_len
    bidir = prefix_bidirectional and prefix_len > 0
    if key_valid is None and not bidir and sequence_ids is None:
        if past == 0:
            return AttentionMask.causal()
        if q_len == 1:
            return AttentionMask.full()
    q_slot = torch.arange(past, kv_len, device=device)
    k_slot = torch.arange(kv_len, device=device)
    allowed = k_slot[None, :] <= q_slot[:, None]
    if bidir:
        end = past + min(prefix_len, q_len)
        q_in = q_slot < end
        k_in = (k_slot >= past) & (k_slot < end)
        allowed = allowed | (q_in[:, None] & k_in[None, :])
    dense = allowed[None, None]
    if sequence_ids is not None:
        dense = dense & (sequence_ids[:, :, None] == sequence_ids[:, None, :])[:, None]
    if key_valid is not None:
        dense = dense & key_valid[:, None, None, :]
        dense = dense | (k_slot[None, :] == q_slot[:, None])[None, None]
    return AttentionMask(dense=dense)
