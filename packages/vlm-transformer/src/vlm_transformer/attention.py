"""Grouped-query attention: the functional core and the self-attention module."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_config import ModelConfig
from vlm_transformer.init import mark_output_projection
from vlm_transformer.masks import AttentionMask
from vlm_transformer.norms import RMSNorm
from vlm_transformer.rotary import apply_rotary

if TYPE_CHECKING:
    from vlm_transformer.cache import LayerKVCache

__all__ = ["Attention", "attention", "repeat_kv"]


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D)``, each KV head repeated ``n_rep`` times
    consecutively (the GQA grouping of Hugging Face Llama)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Scaled dot-product attention with GQA/MQA, via ``F.scaled_dot_product_attention``.

    Args:
        q: ``(B, Hq, Sq, D)``.
        k, v: ``(B, Hkv, Sk, D)`` with ``Hq % Hkv == 0`` (query head ``h`` uses KV head
            ``h // (Hq // Hkv)``).
        mask: an :class:`AttentionMask`; ``None`` = attend everything.
        scale: defaults to ``D ** -0.5``.

    Returns:
        ``(B, Hq, Sq, D)`` in ``q.dtype``.

    Raises:
        ValueError: wrong ranks, mismatched batch/head-dim, ``Hq % Hkv != 0``, or a causal
            fast path with ``Sq != Sk``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects 4-D (B, H, S, D) q/k/v, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: k/v must be (B={q.shape[0]}, Hkv, Sk, D={q.shape[3]}) and equal, got "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if hq % hkv:
        raise ValueError(f"attention: query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if mask is None:
        mask = AttentionMask.full()
    if mask.is_causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"causal fast path needs Sq == Sk, got Sq={q.shape[2]}, Sk={k.shape[2]}; "
            "use build_attention_mask for queries after a cache"
        )
    if hq != hkv:
        k = repeat_kv(k, hq // hkv)
        v = repeat_kv(v, hq // hkv)
    dense = mask.dense
    valid = None
    if dense is not None and mask.guard_empty_rows:
        valid = dense.any(dim=-1, keepdim=True)
        dense = dense | ~valid
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense, dropout_p=dropout_p, is_causal=mask.is_causal, scale=scale
    )
    if valid is not None:
        out = out.masked_fill(~valid, 0.0)
    return out


class Attention(nn.Module):
    """Self-attention with RoPE, GQA/MQA and optional per-head QK RMSNorm.

    Parameters: ``qkv_proj`` (fused, rows ``[q (Hq*hd) | k (Hkv*hd) | v (Hkv*hd)]``,
    no bias), ``o_proj`` (marked as an output projection for init scaling), and
    ``q_norm``/``k_norm`` (``RMSNorm(head_dim)``) when ``config.qk_norm``.

    ``forward(x (B,S,D), cos, sin (B|1,S,hd) float32, mask, cache=None, output_from=0)
    -> (B, S - output_from, D)``.  With a ``cache`` the new K/V are appended and the
    queries attend to all cached keys; ``output_from > 0`` drops the first positions'
    attention outputs before ``o_proj`` (their keys and values are still used).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.q_dim = self.n_heads * self.head_dim
        self.kv_dim = self.n_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.dim, self.q_dim + 2 * self.kv_dim, bias=False)
        self.o_proj = mark_output_projection(nn.Linear(self.q_dim, config.dim, bias=False))
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: AttentionMask,
        cache: LayerKVCache | None = None,
        output_from: int = 0,
    ) -> Tensor:
        b, s, _ = x.shape
        qkv = self.qkv_proj(x).view(b, s, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk, v = qkv.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)
        # one rotary pass over the query and key heads together, (B, S, H, hd) layout
        qk = apply_rotary(qk, cos, sin, head_axis=-2)
        q, k = qk.transpose(1, 2).split([self.n_heads, self.n_kv_heads], dim=1)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)
        out = attention(q, k, v, mask)
        if output_from:
            out = out[:, :, output_from:]
        return self.o_proj(out.transpose(1, 2).reshape(b, s - output_from, self.q_dim))
