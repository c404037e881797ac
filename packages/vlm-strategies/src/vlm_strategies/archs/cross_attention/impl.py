"""The ``cross_attention`` strategy and trunk.

Trunk layout (parameter names)::

    transformer.trunk.layers.{i}.*         decoder blocks, named as in the dense trunk
    transformer.trunk.cross_layers.{i}.*   cross block run right after decoder block i
    transformer.trunk.norm.*               final norm

so a text-only (dense) checkpoint loads into ``layers``/``norm`` unchanged, and the
freshly initialised cross blocks are the identity (zero output projections).

Rows without any real visual token (an all-padded clip, or no image at all) skip the
cross blocks entirely: their attention has no key (zero output, see
:meth:`AttentionMask.from_key_padding`) and their MLP output is gated to zero, so such a
row computes exactly the text-only decoder.

Images anywhere: each row's images are stacked as ``image_features`` and
``image_query_mask`` (:func:`vlm_strategies.media.side_fields`) lets a position read
only the images whose placeholder is at or before it (and in its own packed sample).
A position that sees no image gets exactly nothing from a cross block: its attention
output is zeroed (no NaN from an all-masked softmax) and its MLP output is gated by 0
per position, so text before the first image computes the text-only decoder. Frames of
a clip stay in order inside their image's tokens.

Incremental decoding: the image K/V of every cross block are computed once, by the
first forward that sees ``image_features`` with a :class:`KVCache`, and kept (with
the image mask) in ``cache.state["cross_attention/<i>"]``; later steps reuse them (a
decoded token comes after every image of its row, so it reads all of them).
"""

from __future__ import annotations

from torch import Tensor, nn

from vlm_config import ModelConfig
from vlm_strategies.api import ArchImplementation
from vlm_strategies.archs.cross_attention.config import CrossAttentionConfig
from vlm_strategies.media import MediaEmbeds, side_decode_fields, side_fields
from vlm_transformer import (
    AttentionMask,
    DecoderBlock,
    KVCache,
    ModalityContext,
    RMSNorm,
    Trunk,
    TrunkInputs,
    attention,
    build_mlp,
    build_norm,
    mark_output_projection,
    mark_zero_init,
)

__all__ = ["CrossAttention", "CrossAttentionBlock", "CrossAttentionTrunk", "ImageCrossAttention"]

CACHE_PREFIX = "cross_attention/"


class ImageCrossAttention(nn.Module):
    """Text queries ``(B, S, D)`` attend to image keys/values from ``(B, T, D)``; no RoPE.

    Parameters: ``q_proj`` ``(Hq*hd, D)``, ``kv_proj`` fused ``[k | v]`` ``(2*Hkv*hd, D)``,
    ``o_proj`` (zero-initialised), and per-head ``q_norm``/``k_norm`` with
    ``config.qk_norm``.
    """

    def __init__(self, config: ModelConfig, kv_heads: int) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = kv_heads
        self.head_dim = config.head_dim
        self.q_dim = self.n_heads * self.head_dim
        self.kv_dim = kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.dim, self.q_dim, bias=False)
        self.kv_proj = nn.Linear(config.dim, 2 * self.kv_dim, bias=False)
        self.o_proj = mark_zero_init(
            mark_output_projection(nn.Linear(self.q_dim, config.dim, bias=False))
        )
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def image_kv(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """``image (B, T, D)`` (already normed) -> ``k, v (B, Hkv, T, hd)``."""
        b, t, _ = image.shape
        k, v = self.kv_proj(image).split([self.kv_dim, self.kv_dim], dim=-1)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        out = attention(q, k.to(q.dtype), v.to(q.dtype), mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.q_dim))


class CrossAttentionBlock(nn.Module):
    """``h = x + xattn(attn_norm(x), kv_norm(img)); out = h + gate * mlp(mlp_norm(h))``.

    ``gate`` is 1 for rows with at least one real visual token, else 0; with an
    ``image_query_mask`` in the context it is per position (1 where the position sees
    at least one image token). The block owns every parameter it uses.
    ``forward(x (B,S,D), state: TrunkInputs) -> (B,S,D)``; without image features in
    ``state.context`` (and none cached) it returns ``x``.
    """

    def __init__(self, config: ModelConfig, kv_heads: int, cache_key: str) -> None:
        super().__init__()
        self.cache_key = cache_key
        self.attn_norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.kv_norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.attn = ImageCrossAttention(config, kv_heads)
        self.mlp_norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.mlp = build_mlp(config)
        down_proj = self.mlp.down_proj
        assert isinstance(down_proj, nn.Module)
        mark_zero_init(down_proj)

    def _image_kv(self, state: TrunkInputs) -> tuple[Tensor, Tensor, Tensor | None] | None:
        cache: KVCache | None = state.cache
        if cache is not None and self.cache_key in cache.state:
            return cache.state[self.cache_key]  # type: ignore[no-any-return]
        ctx = state.context
        if ctx is None or ctx.image_features is None:
            return None
        k, v = self.attn.image_kv(self.kv_norm(ctx.image_features))
        entry = (k, v, ctx.image_mask)
        if cache is not None:
            cache.state[self.cache_key] = entry
        return entry

    def forward(self, x: Tensor, state: TrunkInputs) -> Tensor:
        kv = self._image_kv(state)
        if kv is None:
            return x
        k, v, image_mask = kv
        ctx = state.context
        query_mask = None if ctx is None else ctx.image_query_mask
        if query_mask is not None:
            mask = AttentionMask(dense=query_mask[:, None], guard_empty_rows=True)
            x = x + self.attn(self.attn_norm(x), k, v, mask)
            sees = query_mask.any(dim=-1, keepdim=True).to(x.dtype)
            return x + sees * self.mlp(self.mlp_norm(x))
        if image_mask is None:
            x = x + self.attn(self.attn_norm(x), k, v, AttentionMask.full())
            return x + self.mlp(self.mlp_norm(x))
        x = x + self.attn(self.attn_norm(x), k, v, AttentionMask.from_key_padding(image_mask))
        gate = image_mask.any(dim=-1).to(x.dtype)[:, None, None]
        return x + gate * self.mlp(self.mlp_norm(x))


class CrossAttentionTrunk(Trunk):
    """Decoder blocks ``layers`` with ``cross_layers[i]`` run after ``layers[i]`` for
    ``i = N-1, 2N-1, ...``, then the final ``norm``.

    :meth:`blocks` lists every decoder block and every cross block in execution order:
    each owns all parameters it uses, so FSDP2 shards and activation checkpointing
    recomputes each independently (a cross block's image K/V projection is recomputed
    with it).
    """

    def __init__(self, config: ModelConfig, every_n_layers: int, kv_heads: int) -> None:
        super().__init__(config)
        self.every_n_layers = every_n_layers
        self.layers = nn.ModuleDict({str(i): DecoderBlock(config) for i in range(config.n_layers)})
        self.cross_layers = nn.ModuleDict(
            {
                str(i): CrossAttentionBlock(config, kv_heads, f"{CACHE_PREFIX}{i}")
                for i in range(every_n_layers - 1, config.n_layers, every_n_layers)
            }
        )
        self.norm = build_norm(config.norm_type, config.dim, config.norm_eps)

    def blocks(self) -> list[nn.Module]:
        units: list[nn.Module] = []
        for name, layer in self.layers.items():
            units.append(layer)
            if name in self.cross_layers:
                units.append(self.cross_layers[name])
        return units

    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        cache = state.cache
        for name, layer in self.layers.items():
            hidden = layer(hidden, state, None if cache is None else cache.layer(name))
            if name in self.cross_layers:
                hidden = self.cross_layers[name](hidden, state)
        return self.norm(hidden)


class CrossAttention(ArchImplementation):
    """Images enter through cross-attention blocks; text-only residual stream.

    Raises:
        ValueError: ``cross_attention_every_n_layers`` exceeds ``model.n_layers``, or
            ``cross_attention_kv_heads`` does not divide ``model.n_heads``.
    """

    config: CrossAttentionConfig

    def __init__(self, config: CrossAttentionConfig, model_config: ModelConfig) -> None:
        super().__init__(config, model_config)
        n = config.cross_attention_every_n_layers
        if n > model_config.n_layers:
            raise ValueError(
                f"arch.cross_attention_every_n_layers ({n}) exceeds model.n_layers "
                f"({model_config.n_layers}): no cross-attention block would be inserted"
            )
        self.kv_heads = config.cross_attention_kv_heads or model_config.kv_heads
        if model_config.n_heads % self.kv_heads:
            raise ValueError(
                f"arch.cross_attention_kv_heads ({self.kv_heads}) must divide model.n_heads "
                f"({model_config.n_heads})"
            )

    def build_trunk(self) -> CrossAttentionTrunk:
        return CrossAttentionTrunk(
            self.model_config, self.config.cross_attention_every_n_layers, self.kv_heads
        )

    def context(
        self, image_embeds: Tensor, image_valid: Tensor | None, input_ids: Tensor
    ) -> ModalityContext:
        return ModalityContext(image_features=image_embeds, image_mask=image_valid)

    def decode_context(
        self,
        image_embeds: Tensor,
        image_valid: Tensor | None,
        new_ids: Tensor,
        cache: KVCache,
    ) -> ModalityContext | None:
        # The blocks reuse the image K/V cached at prefill; the features ride along so a
        # block whose cache entry is missing still computes the right thing.
        return self.context(image_embeds, image_valid, new_ids)

    def media_context(self, media: MediaEmbeds) -> ModalityContext:
        return ModalityContext(**side_fields(media))

    def media_decode_context(
        self, media: MediaEmbeds, new_ids: Tensor, cache: KVCache
    ) -> ModalityContext | None:
        # a decoded token comes after every image of its row: it reads all of them
        fields = side_decode_fields(media, new_ids.shape[1])
        return ModalityContext(**fields) if fields else None
