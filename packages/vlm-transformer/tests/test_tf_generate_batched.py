"""Batched generation with the preallocated cache: same tokens as the growing-cache loop."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tf_helpers import tiny_model
from torch._dynamo.testing import CompileCounter

from vlm_transformer import (
    KVCache,
    ModalityContext,
    StaticKVCache,
    Transformer,
    generate,
    sample_next_token,
)


def _left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, width - n :] = torch.randint(1, 64, (n,), generator=gen)
        mask[r, width - n :] = 1
    return ids, mask


@torch.no_grad()
def _growing_cache_loop(
    model: Transformer,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    steps: int,
    **sampling: Any,
) -> torch.Tensor:
    """The per-token path this package had before: a concatenating ``KVCache`` and a
    full ``Transformer.forward`` (validation, mask building) every step."""
    cache = KVCache()
    ctx = None if mask is None else ModalityContext(key_padding_mask=mask.bool())
    logits = model(ids, ctx, cache)[:, -1]
    seq = ids
    for _ in range(steps):
        token = sample_next_token(logits, **sampling)
        seq = torch.cat((seq, token[:, None]), 1)
        logits = model(token[:, None], None, cache)[:, -1]
    return seq


def test_static_cache_equals_growing_cache_bitwise() -> None:
    model = tiny_model(seed=3)
    ids, mask = _left_padded([7, 3, 5])
    valid = mask.bool()
    grow, static = KVCache(), StaticKVCache(12)
    chunks = [(0, 7), (7, 8), (8, 9), (9, 11)]
    full = torch.cat((ids, torch.randint(1, 64, (3, 4))), 1)
    for a, b in chunks:
        ctx = ModalityContext(key_padding_mask=valid) if a == 0 else None
        want = model(full[:, a:b], ctx, grow)
        got = model(full[:, a:b], ctx, static)
        assert torch.equal(got, want), (a, b)
    assert static.seq_len == grow.seq_len == 11 and static.max_len == 12
    pairs = [(static.key_valid, grow.key_valid), (static.next_position, grow.next_position)]
    for name, layer in grow.layers.items():
        pairs += [(static.layers[name].k, layer.k), (static.layers[name].v, layer.v)]
    for got_t, want_t in pairs:
        assert got_t is not None and want_t is not None and torch.equal(got_t, want_t)


def test_static_cache_grows_instead_of_failing() -> None:
    model = tiny_model(seed=4)
    ids = torch.randint(0, 64, (2, 9))
    grow, static = KVCache(), StaticKVCache(4)
    for a, b in ((0, 3), (3, 8), (8, 9)):  # the second forward needs 8 > 4 slots
        assert torch.equal(model(ids[:, a:b], None, static), model(ids[:, a:b], None, grow))
    assert static.max_len >= 9
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        StaticKVCache(0)
    with pytest.raises(ValueError, match="prefilled"):
        StaticKVCache(4).begin_static_step(2, torch.device("cpu"))


@pytest.mark.parametrize("lengths", [[6, 6, 6], [7, 2, 5, 1]])
def test_batched_greedy_equals_growing_cache_and_recompute(lengths: list[int]) -> None:
    model = tiny_model(seed=5)
    ids, mask = _left_padded(lengths, seed=1)
    want = _growing_cache_loop(model, ids, mask, 12, temperature=0.0)
    got = generate(model, ids, max_new_tokens=12, attention_mask=mask)
    assert torch.equal(got, want)
    assert torch.equal(
        generate(model, ids, max_new_tokens=12, attention_mask=mask, use_cache=False), want
    )
    for r, n in enumerate(lengths):  # each row as if alone (no padding)
        alone = generate(model, ids[r : r + 1, ids.shape[1] - n :], max_new_tokens=12)
        assert torch.equal(got[r, ids.shape[1] :], alone[0, n:])


def test_sampling_equals_growing_cache_loop() -> None:
    model = tiny_model(seed=6)
    ids, mask = _left_padded([5, 3, 4], seed=2)
    kw: dict[str, Any] = {"temperature": 0.8, "top_k": 20, "top_p": 0.9}
    want = _growing_cache_loop(
        model, ids, mask, 10, generator=torch.Generator().manual_seed(7), **kw
    )
    got = generate(
        model,
        ids,
        max_new_tokens=10,
        attention_mask=mask,
        generator=torch.Generator().manual_seed(7),
        **kw,
    )
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, max_new_tokens=2, temperature=1.0, top_p=1.5)


def test_rows_stop_at_eos_and_the_loop_ends_when_all_did() -> None:
    model = tiny_model(seed=7)
    ids, mask = _left_padded([4, 4, 2], seed=3)
    free = generate(model, ids, max_new_tokens=10, attention_mask=mask)[:, 4:]
    eos = int(free[0, 2])
    firsts = [row.index(eos) if eos in row else None for row in free.tolist()]
    out = generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_token_id=eos)
    new = out[:, 4:]
    if all(f is not None for f in firsts):
        assert new.shape[1] == max(f for f in firsts if f is not None) + 1
    for r, first in enumerate(firsts):
        upto = new.shape[1] if first is None else first + 1
        assert torch.equal(new[r, :upto], free[r, :upto])  # unchanged before the stop
        assert (new[r, upto:] == eos).all()  # then the pad (default: the EOS id)
    # a stop on the first token of every row: one new token, nothing decoded after it
    first_tokens = free[:, 0].tolist()
    out = generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_token_id=first_tokens)
    assert out.shape == (3, 5) and out.is_contiguous()


def test_one_forward_then_lean_steps_that_validate_a_context_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_model(seed=8)
    ids = torch.randint(0, 64, (2, 5))
    calls = {"forward": 0, "validate": 0}
    forward, validate = Transformer.forward, ModalityContext.validate

    def counting_forward(self: Transformer, *a: Any, **k: Any) -> torch.Tensor:
        calls["forward"] += 1
        return forward(self, *a, **k)

    def counting_validate(self: ModalityContext, *a: Any, **k: Any) -> None:
        calls["validate"] += 1
        validate(self, *a, **k)

    step_ctx = ModalityContext(modality_ids=torch.ones(2, 1, dtype=torch.long))
    buffers: set[int] = set()

    def ctx_fn(step: int, new: torch.Tensor, cache: KVCache | None) -> ModalityContext:
        assert isinstance(cache, StaticKVCache) and new.shape == (2, 1)
        if cache.layers:
            buffers.add(cache.layers["0"].k_buffer.data_ptr())  # type: ignore[attr-defined]
        return step_ctx

    monkeypatch.setattr(Transformer, "forward", counting_forward)
    monkeypatch.setattr(ModalityContext, "validate", counting_validate)
    out = generate(model, ids, max_new_tokens=8, decode_context_fn=ctx_fn)
    assert calls == {"forward": 1, "validate": 1}
    assert len(buffers) == 1  # the same preallocated buffer every step
    monkeypatch.undo()
    assert torch.equal(out, _growing_cache_loop(model, ids, None, 8, temperature=0.0))


def test_step_context_the_lean_step_does_not_handle_runs_forward() -> None:
    model = tiny_model(seed=9)
    ids, mask = _left_padded([5, 3], seed=4)

    def ctx_fn(step: int, new: torch.Tensor, cache: KVCache | None) -> ModalityContext:
        return ModalityContext(key_padding_mask=torch.ones(2, 1, dtype=torch.bool))

    got = generate(model, ids, max_new_tokens=6, attention_mask=mask, decode_context_fn=ctx_fn)
    assert torch.equal(got, _growing_cache_loop(model, ids, mask, 6, temperature=0.0))


def test_compiled_decode_step_has_static_shapes_and_the_same_tokens() -> None:
    model = tiny_model(seed=10)
    ids, mask = _left_padded([6, 2, 4], seed=5)
    eager = generate(model, ids, max_new_tokens=9, attention_mask=mask)
    counter = CompileCounter()
    got = generate(model, ids, max_new_tokens=9, attention_mask=mask, compile={"backend": counter})
    assert torch.equal(got, eager)
    assert counter.frame_count == 1  # one graph for all 8 decode steps: no recompiles
    ids2, mask2 = _left_padded([3, 6, 5], seed=6)  # same shapes: the graph is reused
    got2 = generate(
        model, ids2, max_new_tokens=9, attention_mask=mask2, compile={"backend": counter}
    )
    assert counter.frame_count == 1
    assert torch.equal(got2, generate(model, ids2, max_new_tokens=9, attention_mask=mask2))
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(model, ids, max_new_tokens=2, use_cache=False, compile=True)
