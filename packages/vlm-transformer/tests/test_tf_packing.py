"""Packing (``ModalityContext.sequence_ids``) and placeholder scatter in the decoder."""

from __future__ import annotations

import pytest
import torch

from vlm_config import ModelConfig
from vlm_transformer import (
    KVCache,
    ModalityContext,
    Transformer,
    build_attention_mask,
    segment_positions,
)


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=64)
    model = Transformer(cfg)
    model.init_weights()
    return model.eval()


def test_segment_positions_restart_per_sample_and_skip_padding() -> None:
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    valid = torch.tensor([[True, True, True, True, True, False, True, True]])
    assert segment_positions(seq).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert segment_positions(seq, valid).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_block_diagonal_mask() -> None:
    seq = torch.tensor([[3, 3, 7, 7]])
    mask = build_attention_mask(q_len=4, kv_len=4, device="cpu", sequence_ids=seq).dense
    assert mask is not None
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    with pytest.raises(ValueError, match="no cached keys"):
        build_attention_mask(q_len=1, kv_len=4, device="cpu", sequence_ids=seq)


def test_packed_rows_equal_each_sample_alone() -> None:
    model = _model()
    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(0, 50, (1, n), generator=gen) for n in (5, 3, 6))
    packed = torch.cat((a, b, c), dim=1)
    seq = torch.tensor([[0] * 5 + [1] * 3 + [2] * 6])
    with torch.no_grad():
        got = model(packed, ModalityContext(sequence_ids=seq))
        alone = [model(x) for x in (a, b, c)]
    torch.testing.assert_close(got, torch.cat(alone, dim=1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot be used with a KV cache"):
        model(packed, ModalityContext(sequence_ids=seq), KVCache())


def test_placeholder_scatter_replaces_embeddings_in_row_major_order() -> None:
    model = _model()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    embeds = torch.randn(3, 32)
    manual = model.embed(ids).detach().clone()
    manual[0, 1], manual[0, 2], manual[1, 0] = embeds[0], embeds[1], embeds[2]
    with torch.no_grad():
        got = model(ids, ModalityContext(placeholder_mask=mask, placeholder_embeds=embeds))
        want = model(None, ModalityContext(inputs_embeds=manual))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"one row per True of placeholder_mask \(3\)"):
        model(ids, ModalityContext(placeholder_mask=mask, placeholder_embeds=embeds[:2]))
    with pytest.raises(ValueError, match="go together"):
        ModalityContext(placeholder_mask=mask)


def test_grad_anchor_changes_nothing_but_carries_gradient() -> None:
    model = _model()
    ids = torch.tensor([[1, 2, 3]])
    w = torch.randn(4, requires_grad=True)
    anchor = (w * 0.0).sum()
    with torch.no_grad():
        plain = model(ids)
    got = model(ids, ModalityContext(grad_anchor=anchor))
    assert torch.equal(got.detach(), plain)
    got.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros(4))
    with pytest.raises(ValueError, match="0-d floating"):
        ModalityContext(grad_anchor=torch.zeros(2))
