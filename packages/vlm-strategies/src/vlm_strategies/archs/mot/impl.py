"""The ``mot`` strategy and trunk (Mixture-of-Transformers, Liang et al. 2024).

Parameter names::

    transformer.trunk.layers.{i}.image.*   the image copy of decoder block i
    transformer.trunk.layers.{i}.text.*    the text copy of decoder block i
    transformer.trunk.norm.image.*         final norm of image positions
    transformer.trunk.norm.text.*          final norm of text positions

Each copy is a :class:`vlm_transformer.DecoderBlock` used as a parameter container
(``attn_norm``, ``attn.qkv_proj``, ``attn.o_proj``, ``attn.q_norm``/``k_norm``,
``mlp_norm``, ``mlp``), so ``layers.{i}.{image|text}.X`` corresponds to the dense
``layers.{i}.X`` (see :mod:`vlm_strategies.archs.mot.warm_start`).

A layer computes, for every position ``p`` with modality ``m = modality_ids[p]``::

    q, k, v = qkv_proj_m(attn_norm_m(x_p))          (+ q_norm_m / k_norm_m, RoPE)
    h_p = x_p + o_proj_m(global_causal_attention(q, k, v)_p)
    out_p = h_p + mlp_m(mlp_norm_m(h_p))

Routing never assumes the image block is contiguous: explicit
``ModalityContext.modality_ids`` may interleave modalities (``dispatch`` decides how
they are routed).  Without ``modality_ids`` in the context (what this arch's own
contexts use), the ``prefix_len`` prefix positions are image and the rest text, and
each copy runs on its own slice of the sequence only (:func:`route_by_split`: static
shapes, no wasted FLOPs).  The last layer honours ``TrunkInputs.output_from``: the
dropped (image prefix) positions skip their output projection, FFN and final norm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from vlm_config import ModelConfig
from vlm_strategies.api import PrefixArchImplementation
from vlm_strategies.archs.joint_decoder.impl import prefix_key_padding
from vlm_strategies.archs.mot.config import MoTConfig
from vlm_strategies.media import MediaEmbeds, scatter_fields
from vlm_transformer import (
    DecoderBlock,
    LayerKVCache,
    ModalityContext,
    Trunk,
    TrunkInputs,
    apply_rotary,
    attention,
    build_norm,
)

__all__ = [
    "IMAGE",
    "TEXT",
    "MixtureOfTransformers",
    "MoTBlock",
    "MoTNorm",
    "MoTTrunk",
    "route",
    "route_by_modality",
    "route_by_split",
]

IMAGE = 0
TEXT = 1
MODALITIES = ("image", "text")  # index = modality id

RowFn = Callable[[Tensor], Tensor]
Routing = Tensor | int  # (B, S) modality ids, or the image-prefix length


def route_by_split(x: Tensor, split: int, fns: Sequence[RowFn]) -> Tensor:
    """``fns[0]`` (image) on positions ``< split``, ``fns[1]`` (text) on the rest.

    Args:
        x: ``(B, S, ...)``; each ``fn`` maps ``(..., Din) -> (..., Dout)`` row-wise.
        split: the image-prefix length (clamped to ``[0, S]``).

    Returns:
        ``(B, S, ..., Dout)``; each function runs on its own slice only.
    """
    s = x.shape[1]
    if split <= 0:
        return fns[TEXT](x)
    if split >= s:
        return fns[IMAGE](x)
    return torch.cat((fns[IMAGE](x[:, :split]), fns[TEXT](x[:, split:])), dim=1)


def route_by_modality(
    x: Tensor, modality_ids: Tensor, fns: Sequence[RowFn], dispatch: str = "select"
) -> Tensor:
    """Apply ``fns[m]`` to the positions whose modality id is ``m``.

    Args:
        x: ``(B, S, ...)`` inputs; each ``fn`` maps ``(..., Din) -> (..., Dout)`` row-wise.
        modality_ids: ``(B, S)`` long, values in ``range(len(fns))``.
        dispatch: ``"select"`` runs every ``fn`` on every position and keeps the right
            result with ``torch.where`` (static shapes); ``"gather"`` runs each ``fn``
            on its own rows only (data-dependent shapes).

    Returns:
        ``(B, S, ..., Dout)``.
    """
    if dispatch == "select":
        out = fns[0](x)
        for m in range(1, len(fns)):
            pick = (modality_ids == m).view(*modality_ids.shape, *([1] * (x.ndim - 2)))
            out = torch.where(pick, fns[m](x), out)
        return out
    if dispatch != "gather":
        raise ValueError(f"dispatch must be 'select' or 'gather', got {dispatch!r}")
    lead = x.shape[:2]
    flat = x.flatten(0, 1)
    flat_ids = modality_ids.reshape(-1)
    result: Tensor | None = None
    for m, fn in enumerate(fns):
        idx = (flat_ids == m).nonzero().squeeze(1)
        y = fn(flat.index_select(0, idx))
        if result is None:
            result = y.new_zeros((flat.shape[0], *y.shape[1:]))
        result = result.index_copy(0, idx, y)
    assert result is not None
    return result.unflatten(0, lead)


def route(x: Tensor, routing: Routing, fns: Sequence[RowFn], dispatch: str = "select") -> Tensor:
    """:func:`route_by_split` for an int image-prefix length, else
    :func:`route_by_modality` with ``dispatch`` for ``(B, S)`` modality ids."""
    if isinstance(routing, int):
        return route_by_split(x, routing, fns)
    return route_by_modality(x, routing, fns, dispatch)


def _qkv(tower: DecoderBlock, x: Tensor) -> Tensor:
    """``attn_norm -> qkv_proj (-> per-head q_norm / k_norm)`` of one modality copy."""
    a = tower.attn
    qkv = a.qkv_proj(tower.attn_norm(x))
    if a.q_norm is None or a.k_norm is None:
        return qkv
    q, k, v = qkv.split([a.q_dim, a.kv_dim, a.kv_dim], dim=-1)
    q = a.q_norm(q.unflatten(-1, (a.n_heads, a.head_dim))).flatten(-2)
    k = a.k_norm(k.unflatten(-1, (a.n_kv_heads, a.head_dim))).flatten(-2)
    return torch.cat((q, k, v), dim=-1)


def _out(tower: DecoderBlock, x: Tensor) -> Tensor:
    return tower.attn.o_proj(x)  # type: ignore[no-any-return]


def _ffn(tower: DecoderBlock, x: Tensor) -> Tensor:
    return tower.mlp(tower.mlp_norm(x))  # type: ignore[no-any-return]


class MoTBlock(nn.Module):
    """One MoT layer: ``image`` and ``text`` copies of a decoder block, one global
    attention. Owns every parameter it uses (the FSDP2 / activation-checkpointing unit).

    ``forward(x (B,S,D), state, cache, routing, output_from=0) -> (B, S - output_from, D)``
    where ``routing`` is ``(B, S)`` long modality ids or an int image-prefix length
    (see :func:`route_by_split`); positions before ``output_from`` still attend and fill
    the cache but skip the output projection and the FFN.
    """

    def __init__(self, config: ModelConfig, dispatch: str = "select") -> None:
        super().__init__()
        self.dispatch = dispatch
        self.image = DecoderBlock(config)
        self.text = DecoderBlock(config)

    def towers(self) -> tuple[DecoderBlock, DecoderBlock]:
        """The modality copies, indexed by modality id."""
        return (self.image, self.text)

    def forward(
        self,
        x: Tensor,
        state: TrunkInputs,
        cache: LayerKVCache | None,
        routing: Routing,
        output_from: int = 0,
    ) -> Tensor:
        towers = self.towers()
        a = self.text.attn
        b, s, _ = x.shape

        def per_tower(
            h: Tensor, fn: Callable[[DecoderBlock, Tensor], Tensor], where: Routing
        ) -> Tensor:
            return route(h, where, [partial(fn, t) for t in towers], self.dispatch)

        q, k, v = per_tower(x, _qkv, routing).split([a.q_dim, a.kv_dim, a.kv_dim], dim=-1)
        q = q.view(b, s, a.n_heads, a.head_dim).transpose(1, 2)
        k = k.view(b, s, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = v.view(b, s, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q = apply_rotary(q, state.cos, state.sin)
        k = apply_rotary(k, state.cos, state.sin)
        if cache is not None:
            k, v = cache.update(k, v)
        attn = attention(q, k, v, state.mask).transpose(1, 2)
        if output_from:
            attn, x = attn[:, output_from:], x[:, output_from:]
        kept = shift_routing(routing, output_from)
        x = x + per_tower(attn.reshape(b, s - output_from, a.q_dim), _out, kept)
        return x + per_tower(x, _ffn, kept)


def shift_routing(routing: Routing, start: int) -> Routing:
    """The routing of positions ``start:`` (ids sliced, or the prefix length reduced)."""
    if not start:
        return routing
    if isinstance(routing, int):
        return max(routing - start, 0)
    return routing[:, start:]


class MoTNorm(nn.Module):
    """Per-modality final norm: ``image`` and ``text``.
    ``forward(x (B,S,D), routing: (B,S) ids | int prefix length) -> (B,S,D)``."""

    def __init__(self, config: ModelConfig, dispatch: str = "select") -> None:
        super().__init__()
        self.dispatch = dispatch
        self.image = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.text = build_norm(config.norm_type, config.dim, config.norm_eps)

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        return route(x, routing, [self.image, self.text], self.dispatch)


class MoTTrunk(Trunk):
    """``n_layers`` :class:`MoTBlock` s and a :class:`MoTNorm`.

    :meth:`blocks` (inherited) returns the :class:`MoTBlock` s: each holds both modality
    copies of its layer. Modality ids come from ``state.context.modality_ids``; without
    them the first ``state.prefix_len`` positions are image, the rest text.

    Raises:
        ValueError: (eager only) a modality id other than 0 (image) or 1 (text).
    """

    norm: MoTNorm

    def __init__(self, config: ModelConfig, dispatch: str = "select") -> None:
        super().__init__(config)
        self.layers = nn.ModuleDict(
            {str(i): MoTBlock(config, dispatch) for i in range(config.n_layers)}
        )
        self.norm = MoTNorm(config, dispatch)

    @staticmethod
    def routing(state: TrunkInputs) -> Routing:
        """The context's ``(B, S)`` modality ids (checked), or, without them, the
        image-prefix length ``state.prefix_len``."""
        ctx = state.context
        if ctx is None or ctx.modality_ids is None:
            return state.prefix_len
        ids = ctx.modality_ids
        if not torch.compiler.is_compiling() and bool(((ids != IMAGE) & (ids != TEXT)).any()):
            raise ValueError(
                f"mot modality_ids must be {IMAGE} (image) or {TEXT} (text), got values "
                f"{sorted(set(ids.unique().tolist()))}"
            )
        return ids

    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        routing = self.routing(state)
        for layer, layer_cache, output_from in self.layer_calls(state):
            hidden = layer(hidden, state, layer_cache, routing, output_from)
        return self.norm(hidden, shift_routing(routing, state.output_from))


class MixtureOfTransformers(PrefixArchImplementation):
    """Image prefix + :class:`MoTTrunk`; image positions trimmed before the LM head.

    A cached decode step feeds text only, with no context: without ``modality_ids`` and
    without a prefix, every new position routes to the text copies.

    Images anywhere: visual tokens replace their placeholder embeddings and
    ``modality_ids`` tag the placeholder positions image, everything else text (any
    layout, packed or not: the routing is per position)."""

    config: MoTConfig

    def build_trunk(self) -> MoTTrunk:
        return MoTTrunk(self.model_config, self.config.dispatch)

    def context(
        self, image_embeds: Tensor, image_valid: Tensor | None, input_ids: Tensor
    ) -> ModalityContext:
        s = input_ids.shape[1]
        # the image-prefix layout needs no modality ids: the trunk splits at prefix_len
        return ModalityContext(
            prefix_embeds=image_embeds,
            key_padding_mask=prefix_key_padding(image_valid, s),
        )

    def media_context(self, media: MediaEmbeds) -> ModalityContext:
        fields = scatter_fields(media)
        mask = fields["placeholder_mask"]
        ids = torch.where(mask, IMAGE, TEXT)
        return ModalityContext(**fields, modality_ids=ids)
