"""Greedy and sampled decoding with a KV cache (or full recomputation)."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vlm_transformer.cache import KVCache, StaticKVCache
from vlm_transformer.context import ModalityContext
from vlm_transformer.masks import AttentionMask
from vlm_transformer.model import DECODE_STEP_UNSUPPORTED, Transformer

__all__ = ["DecodeContextFn", "generate", "sample_next_token"]

DecodeContextFn = Callable[[int, Tensor, KVCache | None], ModalityContext | None]
"""``(step, input_ids, cache) -> ModalityContext | None`` for decode step ``step >= 1``.

With the cache, ``input_ids`` are the new tokens ``(B, 1)`` and the context describes
only them (e.g. ``modality_ids`` of text, ``image_features`` kept for cross-attention,
perhaps stashed in ``cache.state``). With ``use_cache=False`` ``input_ids`` is the whole
``(B, S + step)`` sequence and the context must describe the full forward (prefix
included). ``generate`` itself adds the key padding of left-padded prompts.
"""


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _pick(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """:func:`sample_next_token` without the argument checks (done once per call)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row from ``logits (B, V)`` -> ``(B,)`` long.

    ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by
    ``temperature``, restricted to the ``top_k`` largest and to the smallest set whose
    probability reaches ``top_p`` (the most likely token always survives), and sampled
    with ``generator``.

    Raises:
        ValueError: negative temperature, ``top_k < 1`` or ``top_p`` outside ``(0, 1]``.
    """
    _check_sampling(temperature, top_k, top_p)
    return _pick(logits, temperature, top_k, top_p, generator)


def _with_padding(
    ctx: ModalityContext | None, text_valid: Tensor | None, batch: int
) -> ModalityContext | None:
    """Merge the text key padding ``text_valid (B, S_text)`` into ``ctx`` (prefix = real)."""
    if text_valid is None:
        return ctx
    if ctx is None:
        return ModalityContext(key_padding_mask=text_valid)
    p = ctx.prefix_len
    full = torch.cat(
        (torch.ones(batch, p, dtype=torch.bool, device=text_valid.device), text_valid), dim=1
    )
    if ctx.key_padding_mask is not None:
        full = full & ctx.key_padding_mask
    return dataclasses.replace(ctx, key_padding_mask=full)


_PER_POSITION_FIELDS = (
    "modality_ids",
    "key_padding_mask",
    "inputs_embeds",
    "placeholder_mask",
    "sequence_ids",
    "image_query_mask",
)

_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[str, Callable[..., Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def _compiled_decode(model: Transformer, options: Mapping[str, Any]) -> Callable[..., Tensor]:
    """``torch.compile(model.decode_logits, dynamic=False, **options)``, one wrapper per
    model and options (so Dynamo's cache of compiled graphs is reused across calls)."""
    per_model = _COMPILED.setdefault(model, {})
    key = repr(sorted(options.items()))
    fn = per_model.get(key)
    if fn is None:
        fn = torch.compile(model.decode_logits, **{"dynamic": False, **options})
        per_model[key] = fn
    return fn


class _CachedDecoder:
    """The per-step half of cached decoding: feeds ``(B, 1)`` tokens into a prefilled
    :class:`StaticKVCache` and returns ``(B, V)`` logits.

    A :class:`Transformer` goes through :meth:`Transformer.decode_logits` (no
    re-validation: a context is validated when it is a new object; no mask building:
    the key validity is a view of the cache's buffer), eagerly on the filled part of the
    cache, or compiled with static shapes over the whole buffer.  Any other model, or a
    step context with a field the lean step does not handle, runs ``model(...)``.
    """

    def __init__(
        self,
        model: nn.Module,
        cache: StaticKVCache,
        batch: int,
        compile: Mapping[str, Any] | None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.batch = batch
        self.lean = isinstance(model, Transformer)
        self.compiled = (
            _compiled_decode(model, compile)
            if compile is not None and isinstance(model, Transformer)
            else None
        )
        self.checked: ModalityContext | None = None
        self.dim = model.config.dim if isinstance(model, Transformer) else 0

    def __call__(self, new: Tensor, ctx: ModalityContext | None) -> Tensor:
        model, cache = self.model, self.cache
        if not self.lean or (
            ctx is not None and any(getattr(ctx, f) is not None for f in DECODE_STEP_UNSUPPORTED)
        ):
            return model(new, ctx, cache, logits_to_keep=1)[:, -1]  # type: ignore[no-any-return]
        assert isinstance(model, Transformer)
        if ctx is not None and ctx is not self.checked:
            ctx.validate(self.batch, new.shape[1], self.dim)
            self.checked = ctx
        if self.compiled is not None:
            positions, _, valid = cache.begin_static_step(self.batch, new.device)
            try:
                return self.compiled(
                    new,
                    ctx,
                    cache,
                    positions,
                    AttentionMask(dense=valid[:, None, None, :]),
                    cache.max_len - 1,
                )
            finally:
                cache.end_static_step()
        step = cache.begin_step(self.batch, new.shape[1], new.device)
        mask = (
            AttentionMask.full()
            if step.key_valid is None
            else AttentionMask(dense=step.key_valid[:, None, None, :])
        )
        return model.decode_logits(new, ctx, cache, step.positions, mask, step.past_len)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    context: ModalityContext | None = None,
    decode_context_fn: DecodeContextFn | None = None,
    use_cache: bool = True,
    compile: bool | Mapping[str, Any] = False,
) -> Tensor:
    """Autoregressively extend a batch of prompts in one call.

    The first forward ("prefill") runs the prompt together with ``context`` (its image
    prefix, cross-attention features, ...). With ``use_cache=True`` (default) each
    later step feeds only the newly sampled token plus ``decode_context_fn(step, new_ids,
    cache)`` (default: no context). With ``use_cache=False`` every step recomputes the
    whole sequence (the route for archs that cannot decode incrementally); the context
    is then ``decode_context_fn(step, all_ids, None)``, or ``context`` reused when it has
    no per-position fields.

    Cached decoding keeps per-token overhead low: the cache is a
    :class:`StaticKVCache` sized ``P + S + max_new_tokens - 1`` (allocated once, written
    in place), the output is one preallocated ``(B, S + max_new_tokens)`` tensor, the
    key-padding mask is a view of one buffer, the sampling arguments and a step context
    are checked once, and a :class:`Transformer` decodes through
    :meth:`Transformer.decode_logits` (no re-validation, no mask building).  The tokens
    are those of :class:`KVCache` decoding, bitwise.  A row stops after its first EOS
    and then emits ``pad_token_id``; the loop ends when every row has stopped.

    Args:
        model: a ``Transformer`` (or anything with its ``forward(input_ids, context,
            cache, *, logits_to_keep)`` signature: it then runs ``forward`` every step).
        input_ids: ``(B, S)`` long prompts, left-padded when batched with padding.
        max_new_tokens: upper bound on generated tokens (>= 0).
        temperature, top_k, top_p, generator: see :func:`sample_next_token`.
        eos_token_id: one id or several; a row stops after producing one.
        pad_token_id: written after a row stopped (default: the first EOS id).
        attention_mask: ``(B, S)`` bool/int, 1 = real prompt token (left padding).
        context: :class:`ModalityContext` for the prefill.
        use_cache: ``False`` recomputes the whole sequence every step.
        compile: run the one-token decode step through ``torch.compile`` with static
            shapes (attention over the whole preallocated cache, the slots not written
            yet masked), compiled once per model and batch size.  Off by default: on a
            CPU the compilation (tens of seconds) outweighs the saving for short
            generations (see ``docs/performance.md``).  Tokens agree with eager decoding
            up to float rounding (attention reduces over a longer, masked key axis).  A
            mapping turns it on with those ``torch.compile`` keyword arguments (e.g.
            ``{"backend": "aot_eager"}``).  Models other than a :class:`Transformer`
            are not compiled.

    Returns:
        ``(B, S + T)`` long: the prompts followed by ``T <= max_new_tokens`` new tokens
        (``T < max_new_tokens`` only when every row hit EOS).

    Raises:
        ValueError: malformed ``input_ids`` / ``attention_mask``, negative
            ``max_new_tokens``, bad sampling arguments, ``compile=True`` with
            ``use_cache=False``, or per-position context fields with ``use_cache=False``
            and no ``decode_context_fn``.
    """
    if input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"input_ids must be (B, S) long, got {tuple(input_ids.shape)} {input_ids.dtype}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)
    if compile is not False and not use_cache:
        raise ValueError("compile=True compiles the cached decode step: it needs use_cache=True")
    options: Mapping[str, Any] | None = (
        None if compile is False else {} if compile is True else dict(compile)
    )
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    text_valid: Tensor | None = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must be {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        text_valid = attention_mask.to(torch.bool)
        if bool(text_valid.all()):
            text_valid = None  # keep the is_causal fast path
    eos_ids: list[int] = (
        []
        if eos_token_id is None
        else [eos_token_id]
        if isinstance(eos_token_id, int)
        else list(eos_token_id)
    )
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    eos_t = torch.tensor(eos_ids, dtype=torch.long, device=device)
    if (
        not use_cache
        and decode_context_fn is None
        and context is not None
        and any(getattr(context, f) is not None for f in _PER_POSITION_FIELDS)
    ):
        raise ValueError(
            "use_cache=False with per-position context fields (modality_ids, "
            "key_padding_mask, inputs_embeds, placeholder_mask, sequence_ids, "
            "image_query_mask) needs a decode_context_fn"
        )

    was_training = model.training
    model.eval()
    try:
        out = input_ids.new_full((batch, prompt_len + max_new_tokens), pad)
        out[:, :prompt_len] = input_ids
        prefix_len = 0 if context is None else context.prefix_len
        cache = (
            StaticKVCache(max(prefix_len + prompt_len + max_new_tokens - 1, 1))
            if use_cache
            else None
        )
        decoder = (
            None
            if cache is None
            else _CachedDecoder(model, cache, batch, options if max_new_tokens > 1 else None)
        )
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        produced = 0
        logits = model(
            input_ids, _with_padding(context, text_valid, batch), cache, logits_to_keep=1
        )[:, -1]
        for step in range(1, max_new_tokens + 1):
            token = _pick(logits, temperature, top_k, top_p, generator)
            if eos_ids:
                token.masked_fill_(finished, pad)
            out[:, prompt_len + step - 1] = token
            produced = step
            if eos_ids:
                finished |= torch.isin(token, eos_t)
                if bool(finished.all()):
                    break
            if step == max_new_tokens:
                break
            if decoder is not None:
                new = token[:, None]
                ctx = None if decode_context_fn is None else decode_context_fn(step, new, cache)
                logits = decoder(new, ctx)
            else:
                sequence = out[:, : prompt_len + step]
                ctx = (
                    decode_context_fn(step, sequence, None)
                    if decode_context_fn is not None
                    else context
                )
                valid = None
                if text_valid is not None:
                    ones = torch.ones(batch, step, dtype=torch.bool, device=device)
                    valid = torch.cat((text_valid, ones), dim=1)
                logits = model(sequence, _with_padding(ctx, valid, batch), None, logits_to_keep=1)[
                    :, -1
                ]
    finally:
        model.train(was_training)
    return out if produced == max_new_tokens else out[:, : prompt_len + produced].clone()
