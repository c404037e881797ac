"""``Transformer``: token embedding -> trunk -> LM head."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_config import ModelConfig
from vlm_transformer.cache import KVCache
from vlm_transformer.context import ModalityContext
from vlm_transformer.masks import AttentionMask, build_attention_mask
from vlm_transformer.rotary import RotaryEmbedding
from vlm_transformer.trunk import DenseTrunk, Trunk, TrunkInputs

__all__ = ["DECODE_STEP_UNSUPPORTED", "Transformer", "segment_positions"]

DECODE_STEP_UNSUPPORTED = (
    "prefix_embeds",
    "inputs_embeds",
    "placeholder_mask",
    "sequence_ids",
    "key_padding_mask",
    "trim_prefix",
    "grad_anchor",
)
"""``ModalityContext`` fields :meth:`Transformer.decode_logits` does not handle (a decode
step with one of them set goes through :meth:`Transformer.forward`)."""


def segment_positions(sequence_ids: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """Rotary positions that restart at every sample of a packed row.

    Args:
        sequence_ids: ``(B, S)`` long; a sample is a contiguous run of one id.
        key_valid: ``(B, S)`` bool, True = real position; padded positions do not advance
            the count (as in an unpacked row). ``None`` = all real.

    Returns:
        ``(B, S)`` long: the number of real positions of the same sample before each
        position (so the first real position of every sample is 0; padding clamps at 0).
    """
    valid = (
        torch.ones_like(sequence_ids, dtype=torch.long) if key_valid is None else key_valid.long()
    )
    count = valid.cumsum(dim=1)
    before = count - valid
    start = torch.ones_like(sequence_ids, dtype=torch.bool)
    start[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    base = torch.where(start, before, torch.zeros_like(before)).cummax(dim=1).values
    return (count - base - 1).clamp_min(0)


class Transformer(nn.Module):
    """Decoder-only language model with a pluggable trunk.

    Modules: ``embed`` (``nn.Embedding(vocab, dim)``), ``rotary``
    (:class:`RotaryEmbedding`, no parameters), ``trunk`` (:class:`Trunk`, default
    :class:`DenseTrunk`), ``lm_head`` (``nn.Linear(dim, vocab, bias=False)``, or ``None``
    with ``config.tie_embeddings``: the head then reuses ``embed.weight``, so there is a
    single parameter and nothing to re-tie after ``to_empty`` or sharding).

    Meta-device construction::

        with torch.device("meta"):
            model = Transformer(cfg)
        model.to_empty(device="cpu")
        model.init_weights()
    """

    def __init__(self, config: ModelConfig, trunk: Trunk | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.trunk = trunk if trunk is not None else DenseTrunk(config)
        self.lm_head: nn.Linear | None = (
            None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        )

    @property
    def output_weight(self) -> Tensor:
        """``(vocab, dim)`` weight of the LM head (``embed.weight`` when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def blocks(self) -> list[nn.Module]:
        """``trunk.blocks()``: the units to checkpoint / shard."""
        return self.trunk.blocks()

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """``trunk.auxiliary_losses()`` of the last forward."""
        return self.trunk.auxiliary_losses()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise everything in place: embedding and head ``normal(0, init_std)``,
        rotary tables recomputed (float32), then ``trunk.init_weights()``."""
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        self.rotary.reset_parameters()
        self.trunk.init_weights()

    def forward(
        self,
        input_ids: Tensor | None = None,
        context: ModalityContext | None = None,
        cache: KVCache | None = None,
        *,
        positions: Tensor | None = None,
        logits_to_keep: int = 0,
        head: Callable[[Tensor], Any] | None = None,
    ) -> Tensor:
        """Compute next-token logits.

        Args:
            input_ids: ``(B, S_text)`` long token ids, or ``None`` when
                ``context.inputs_embeds`` (or only a prefix) is given.
            context: a :class:`ModalityContext` (prefix, padding, modality tags ...).
            cache: a :class:`KVCache`; the new positions are appended to it and attend
                to everything cached before.
            positions: ``(B|1, S)`` long rotary positions of the ``S = P + S_text``
                residual positions; default ``arange`` (continuing the cache, per row),
                ``cumsum(key_padding_mask) - 1`` when a key padding mask is given, and
                restarting per sample (:func:`segment_positions`) with
                ``context.sequence_ids``.
            logits_to_keep: if > 0, only the last ``logits_to_keep`` positions get logits.
            head: if given, called with the final hidden states ``(B, S', D)`` instead
                of the LM head (e.g. a chunked cross-entropy); its result is returned.

        Returns:
            ``(B, S', vocab)`` logits in the activation dtype, ``S' = S - trim``
            (``trim = context.trim``: prefix positions get no logits), or the last
            ``logits_to_keep`` of them.

        Raises:
            ValueError: before any compute, for both/neither of ``input_ids`` and
                ``inputs_embeds``, non-long or non-2-D ``input_ids``, context shapes
                that disagree (see :meth:`ModalityContext.validate`), and
                ``context.sequence_ids`` with a ``cache``.
        """
        ctx = context
        embeds = None if ctx is None else ctx.inputs_embeds
        if input_ids is not None and embeds is not None:
            raise ValueError("pass input_ids or context.inputs_embeds, not both")
        if input_ids is not None:
            if input_ids.ndim != 2 or input_ids.dtype != torch.long:
                raise ValueError(
                    f"input_ids must be a (B, S) long tensor, got {tuple(input_ids.shape)} "
                    f"{input_ids.dtype}"
                )
            batch, text_len = input_ids.shape
        elif embeds is not None:
            batch, text_len = embeds.shape[0], embeds.shape[1]
        elif ctx is not None and ctx.prefix_embeds is not None:
            batch, text_len = ctx.prefix_embeds.shape[0], 0
        else:
            raise ValueError("Transformer.forward needs input_ids, inputs_embeds or prefix_embeds")
        dim = self.config.dim
        if ctx is not None:
            ctx.validate(batch, text_len, dim)
            if ctx.sequence_ids is not None and cache is not None:
                raise ValueError(
                    "context.sequence_ids (packing) cannot be used with a KV cache; generate "
                    "one sample per row"
                )
        prefix_len = 0 if ctx is None else ctx.prefix_len
        total = prefix_len + text_len
        if positions is not None and (
            positions.ndim != 2
            or positions.shape[-1] != total
            or positions.shape[0] not in (1, batch)
        ):
            raise ValueError(f"positions must be (B|1, {total}) long, got {tuple(positions.shape)}")

        if input_ids is not None:
            hidden = self.embed(input_ids)
        elif embeds is not None:
            hidden = embeds
        else:
            hidden = None
        if hidden is not None and ctx is not None and ctx.placeholder_mask is not None:
            assert ctx.placeholder_embeds is not None
            hidden = hidden.masked_scatter(
                ctx.placeholder_mask[..., None], ctx.placeholder_embeds.to(hidden.dtype)
            )
        if ctx is not None and ctx.prefix_embeds is not None:
            prefix = ctx.prefix_embeds
            if hidden is None:
                hidden = prefix
            else:
                hidden = torch.cat((prefix.to(hidden.dtype), hidden), dim=1)
        assert hidden is not None
        if ctx is not None and ctx.grad_anchor is not None:
            hidden = hidden + ctx.grad_anchor.to(hidden.dtype)
        device = hidden.device
        segments = None if ctx is None else ctx.sequence_ids

        key_valid = None if ctx is None else ctx.key_padding_mask
        bidir = ctx is not None and ctx.prefix_bidirectional
        if cache is not None:
            step = cache.begin_step(batch, total, device, key_valid)
            past_len, all_keys_valid, default_pos = step.past_len, step.key_valid, step.positions
        else:
            past_len, all_keys_valid = 0, key_valid
            if segments is not None:
                default_pos = segment_positions(segments, key_valid)
            elif key_valid is not None:
                default_pos = (key_valid.long().cumsum(dim=1) - 1).clamp_min(0)
            else:
                default_pos = torch.arange(total, device=device)[None, :]
        pos = default_pos if positions is None else positions
        # Nothing masked and no cache: build_attention_mask returns the is_causal fast path.
        mask = build_attention_mask(
            q_len=total,
            kv_len=past_len + total,
            device=device,
            key_valid=all_keys_valid,
            prefix_len=prefix_len,
            prefix_bidirectional=bidir,
            sequence_ids=segments,
        )
        cos, sin = self.rotary(pos)
        trim = 0 if ctx is None else ctx.trim
        output_from = max(trim, total - logits_to_keep) if logits_to_keep > 0 else trim
        state = TrunkInputs(
            cos=cos,
            sin=sin,
            mask=mask,
            positions=pos,
            context=ctx,
            cache=cache,
            prefix_len=prefix_len,
            past_len=past_len,
            output_from=output_from,
        )
        hidden = self.trunk(hidden, state)
        if hidden.shape[1] == total:
            hidden = hidden[:, output_from:]
        elif hidden.shape[1] != total - output_from:
            raise RuntimeError(
                f"{type(self.trunk).__name__} returned {hidden.shape[1]} positions; expected "
                f"{total} or {total - output_from} (TrunkInputs.output_from={output_from})"
            )
        if head is not None:
            return head(hidden)  # type: ignore[no-any-return]
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.embed.weight)

    def decode_logits(
        self,
        input_ids: Tensor,
        context: ModalityContext | None,
        cache: KVCache,
        positions: Tensor,
        mask: AttentionMask,
        past_len: int,
    ) -> Tensor:
        """The lean forward of one cached decode step: next-token logits of the last position.

        What :meth:`forward` computes for ``input_ids`` after the cache, minus the
        per-call bookkeeping: no validation (the caller validates ``context`` once with
        :meth:`ModalityContext.validate` and keeps the fields of
        :data:`DECODE_STEP_UNSUPPORTED` unset), no cache registration (the caller ran
        ``cache.begin_step`` / ``begin_static_step`` and passes what it returned), no mask
        construction.  Only tensors flow through it, so it compiles with static shapes.

        Args:
            input_ids: ``(B, S_new)`` long, the new tokens.
            context: side inputs of the step (``image_features``, ``modality_ids`` ...).
            cache: the cache the step's keys/values are written to.
            positions: ``(B, S_new)`` long rotary positions.
            mask: the self-attention mask of the new queries over the cached keys.
            past_len: slots before the new ones (``TrunkInputs.past_len``).

        Returns:
            ``(B, vocab)`` logits of the last new position, in the activation dtype.
        """
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(positions)
        state = TrunkInputs(
            cos=cos,
            sin=sin,
            mask=mask,
            positions=positions,
            context=context,
            cache=cache,
            prefix_len=0,
            past_len=past_len,
            output_from=input_ids.shape[1] - 1,
        )
        hidden = self.trunk(hidden, state)[:, -1]
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.embed.weight)
