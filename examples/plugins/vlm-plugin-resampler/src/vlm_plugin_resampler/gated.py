"""The ``gated_cross_attention`` arch (torch side), built from public core APIs only.

Trunk layout (parameter names)::

    transformer.trunk.layers.{i}.*        decoder blocks, named as in the dense trunk
    transformer.trunk.gated_layers.{i}.*  gated block run right *before* decoder block i
    transformer.trunk.norm.*              final norm

Each gated block computes, with ``img`` the visual tokens of real frames only::

    x = x + tanh(gate_attn) * xattn(norm(x), img)
    x = x + tanh(gate_ffn)  * ffn(norm(x))

and both gates start at ``gate_init`` (default 0, so ``tanh(0) = 0`` and a fresh block is
the identity). The image keys/values are computed once per generation and kept in
``cache.state``.

Images anywhere (a ``vlm_strategies.MediaBatch``): one placeholder per image marks its
place; ``vlm_strategies.media.side_fields`` stacks each row's images and gives the
media mask, so a position reads only the images at or before it (in its own packed
sample), and a position that sees none gets exactly nothing from the block (attention
output zeroed, FFN multiplied by 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm_config import ModelConfig
from vlm_plugin_resampler.configs import GatedCrossAttentionConfig
from vlm_strategies import ArchImplementation
from vlm_strategies.media import MediaEmbeds, side_decode_fields, side_fields
from vlm_transformer import (
    AttentionMask,
    DecoderBlock,
    KVCache,
    ModalityContext,
    Trunk,
    TrunkInputs,
    attention,
    build_mlp,
    build_norm,
)

__all__ = ["GatedCrossAttention", "GatedCrossAttentionBlock", "GatedCrossAttentionTrunk"]


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention dense block; ``forward(x (B,S,D), state) -> x``."""

    def __init__(self, config: ModelConfig, kv_heads: int, gate_init: float, key: str) -> None:
        super().__init__()
        self.key = key
        self.gate_init = gate_init
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, kv_heads, config.head_dim
        self.norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.media_norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.kv_proj = nn.Linear(config.dim, 2 * kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.ffn_norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.ffn = build_mlp(config)
        self.gate_attn = nn.Parameter(torch.full((1,), gate_init))
        self.gate_ffn = nn.Parameter(torch.full((1,), gate_init))

    def init_parameters(self, std: float, output_std: float) -> None:
        """Hook of ``vlm_transformer.init``: the gates back to ``gate_init``."""
        with torch.no_grad():
            self.gate_attn.fill_(self.gate_init)
            self.gate_ffn.fill_(self.gate_init)

    def _media_kv(self, state: TrunkInputs) -> tuple[Tensor, Tensor, Tensor | None] | None:
        cache: KVCache | None = state.cache
        if cache is not None and self.key in cache.state:
            return cache.state[self.key]  # type: ignore[no-any-return]
        ctx = state.context
        if ctx is None or ctx.image_features is None:
            return None
        media = self.media_norm(ctx.image_features)
        b, t, _ = media.shape
        k, v = self.kv_proj(media).view(b, t, 2 * self.kv_heads, self.head_dim).chunk(2, dim=2)
        entry = (k.transpose(1, 2), v.transpose(1, 2), ctx.image_mask)
        if cache is not None:
            cache.state[self.key] = entry
        return entry

    def forward(self, x: Tensor, state: TrunkInputs) -> Tensor:
        kv = self._media_kv(state)
        if kv is None:
            return x
        k, v, media_mask = kv
        b, s, _ = x.shape
        q = self.q_proj(self.norm(x)).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        ctx = state.context
        query_mask = None if ctx is None else ctx.image_query_mask
        sees: Tensor | None = None
        if query_mask is not None:  # images anywhere: per-position media mask
            mask = AttentionMask(dense=query_mask[:, None], guard_empty_rows=True)
            sees = query_mask.any(dim=-1, keepdim=True).to(x.dtype)
        elif media_mask is None:
            mask = AttentionMask.full()
        else:
            mask = AttentionMask.from_key_padding(media_mask)
        out = attention(q, k.to(q.dtype), v.to(q.dtype), mask).transpose(1, 2).reshape(b, s, -1)
        x = x + torch.tanh(self.gate_attn).to(x.dtype) * self.o_proj(out)
        ffn = torch.tanh(self.gate_ffn).to(x.dtype) * self.ffn(self.ffn_norm(x))
        return x + (ffn if sees is None else sees * ffn)


class GatedCrossAttentionTrunk(Trunk):
    """Decoder blocks with a gated block before blocks ``0, N, 2N, ...``, then the norm."""

    def __init__(self, config: ModelConfig, every: int, kv_heads: int, gate_init: float) -> None:
        super().__init__(config)
        self.layers = nn.ModuleDict({str(i): DecoderBlock(config) for i in range(config.n_layers)})
        self.gated_layers = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(config, kv_heads, gate_init, f"gated_xattn/{i}")
                for i in range(0, config.n_layers, every)
            }
        )
        self.norm = build_norm(config.norm_type, config.dim, config.norm_eps)

    def blocks(self) -> list[nn.Module]:
        units: list[nn.Module] = []
        for name, layer in self.layers.items():
            if name in self.gated_layers:
                units.append(self.gated_layers[name])
            units.append(layer)
        return units

    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        cache = state.cache
        for name, layer in self.layers.items():
            if name in self.gated_layers:
                hidden = self.gated_layers[name](hidden, state)
            hidden = layer(hidden, state, None if cache is None else cache.layer(name))
        return self.norm(hidden)


class GatedCrossAttention(ArchImplementation):
    """Strategy: visual tokens go to the gated blocks' keys/values; text-only stream.

    Raises:
        ValueError: ``kv_heads`` does not divide ``model.n_heads``.
    """

    config: GatedCrossAttentionConfig

    def __init__(self, config: GatedCrossAttentionConfig, model_config: ModelConfig) -> None:
        super().__init__(config, model_config)
        self.kv_heads = config.kv_heads or model_config.kv_heads
        if model_config.n_heads % self.kv_heads:
            raise ValueError(
                f"arch.kv_heads ({self.kv_heads}) must divide "
                f"model.n_heads ({model_config.n_heads})"
            )

    def build_trunk(self) -> GatedCrossAttentionTrunk:
        cfg = self.config
        return GatedCrossAttentionTrunk(
            self.model_config, cfg.every_n_layers, self.kv_heads, cfg.gate_init
        )

    def context(
        self, image_embeds: Tensor, image_valid: Tensor | None, input_ids: Tensor
    ) -> ModalityContext:
        return ModalityContext(image_features=image_embeds, image_mask=image_valid)

    def decode_context(
        self, image_embeds: Tensor, image_valid: Tensor | None, new_ids: Tensor, cache: KVCache
    ) -> ModalityContext:
        return self.context(image_embeds, image_valid, new_ids)

    def media_context(self, media: MediaEmbeds) -> ModalityContext:
        return ModalityContext(**side_fields(media))

    def media_decode_context(
        self, media: MediaEmbeds, new_ids: Tensor, cache: KVCache
    ) -> ModalityContext | None:
        # a decoded token comes after every image of its row: it reads all of them
        fields = side_decode_fields(media, new_ids.shape[1])
        return ModalityContext(**fields) if fields else None
