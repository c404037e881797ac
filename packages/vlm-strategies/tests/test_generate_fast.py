"""``VLMWrapper.generate`` on the batched fast path: every arch, left-padded batches,
interleaved multi-image prompts, per-row early stop; tokens equal full recomputation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from strategies_helpers import BUILTIN_ARCHS

from vlm_strategies.testing import (
    INTERLEAVED_PROMPTS,
    TinyVLM,
    _media_batch,
    _media_model,
    _media_sample,
)
from vlm_transformer import KVCache, StaticKVCache

IDS = [a["arch"] for a in BUILTIN_ARCHS]


def _prompts(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``(B,3,16,16)``, left-padded prompts of lengths 6, 3, 5, 1, ... and mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(6, 3, 5, 1)[r % 4] for r in range(batch)]
    ids = torch.zeros(batch, 6, dtype=torch.long)
    mask = torch.zeros(batch, 6, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, 6 - n :] = torch.randint(1, 64, (n,), generator=g)
        mask[r, 6 - n :] = 1
    return torch.randn(batch, 3, 16, 16, generator=g), ids, mask


@torch.no_grad()
def _recompute(model: Any, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, n: int):
    """Greedy decoding by full recomputation, one row at a time (no padding at all)."""
    rows = []
    for r in range(ids.shape[0]):
        seq = ids[r : r + 1, int((mask[r] == 0).sum()) :]
        for _ in range(n):
            logits, _ = model(pixels[r : r + 1], seq)
            seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), 1)
        rows.append(seq[0, -n:])
    return torch.stack(rows)


@pytest.mark.parametrize("arch", BUILTIN_ARCHS, ids=IDS)
def test_left_padded_batch_equals_each_row_recomputed(arch: dict[str, Any]) -> None:
    model = TinyVLM(arch).build(seed=1).eval()
    pixels, ids, mask = _prompts(5, seed=2)
    got = model.generate(pixels, ids, attention_mask=mask, max_new_tokens=7)
    assert got.shape == (5, 13)
    assert torch.equal(got[:, 6:], _recompute(model, pixels, ids, mask, 7))
    slow = model.generate(pixels, ids, attention_mask=mask, max_new_tokens=7, use_cache=False)
    assert torch.equal(got, slow)


@pytest.mark.parametrize("arch", BUILTIN_ARCHS, ids=IDS)
def test_rows_stop_at_their_eos_and_the_loop_ends_when_all_did(arch: dict[str, Any]) -> None:
    model = TinyVLM(arch).build(seed=3).eval()
    pixels, ids, mask = _prompts(4, seed=4)
    free = model.generate(pixels, ids, attention_mask=mask, max_new_tokens=8)[:, 6:]
    eos = int(free[1, 1])
    out = model.generate(
        pixels, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0
    )
    new = out[:, 6:]
    stops = [row.index(eos) + 1 if eos in row else None for row in free.tolist()]
    expected_len = 8 if None in stops else max(s for s in stops if s is not None)
    assert new.shape == (4, expected_len)
    for r, stop in enumerate(stops):
        upto = expected_len if stop is None else stop
        assert torch.equal(new[r, :upto], free[r, :upto])
        assert (new[r, upto:] == 0).all()


@pytest.mark.parametrize("arch", BUILTIN_ARCHS, ids=IDS)
def test_interleaved_multi_image_prompts_equal_recomputation(arch: dict[str, Any]) -> None:
    spec = TinyVLM(arch)
    model, placeholder = _media_model(spec, seed=5)
    gen = torch.Generator().manual_seed(6)
    samples = [_media_sample(model, p, gen, placeholder) for p in INTERLEAVED_PROMPTS]
    batch = _media_batch(samples, placeholder, left_pad=True)
    fast = model.generate(batch, max_new_tokens=6)
    slow = model.generate(batch, max_new_tokens=6, use_cache=False)
    assert torch.equal(fast, slow)
    seq = batch.input_ids
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(batch.extended(seq[:, batch.input_ids.shape[1] :]))
            seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(fast, seq)


@pytest.mark.parametrize("arch", BUILTIN_ARCHS, ids=IDS)
def test_cached_archs_decode_into_one_preallocated_cache(
    arch: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = TinyVLM(arch).build(seed=7).eval()
    pixels, ids, mask = _prompts(3, seed=8)
    caches: list[KVCache] = []
    original = model.strategy.decode_context

    def spy(*args: Any) -> Any:
        caches.append(args[-1])
        return original(*args)

    monkeypatch.setattr(model.strategy, "decode_context", spy)
    model.generate(pixels, ids, attention_mask=mask, max_new_tokens=5)
    if not model.strategy.incremental_decoding:  # moma: recomputes, never a cache
        assert caches == []
        return
    assert len(caches) == 4 and all(c is caches[0] for c in caches)
    cache = caches[0]
    assert isinstance(cache, StaticKVCache)
    # prefix + prompt + 4 fed tokens: the size it was allocated with, never grown
    assert cache.seq_len == cache.max_len == model.num_image_positions + 6 + 4


def test_compiled_decode_step_gives_the_same_tokens() -> None:
    from torch._dynamo.testing import CompileCounter

    model = TinyVLM({"arch": "cross_attention"}).build(seed=9).eval()
    pixels, ids, mask = _prompts(3, seed=10)
    eager = model.generate(pixels, ids, attention_mask=mask, max_new_tokens=6)
    counter = CompileCounter()
    compiled = model.generate(
        pixels, ids, attention_mask=mask, max_new_tokens=6, compile={"backend": counter}
    )
    assert torch.equal(compiled, eager)
    assert counter.frame_count >= 1
