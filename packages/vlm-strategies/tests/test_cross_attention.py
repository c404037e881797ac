"""The ``cross_attention`` arch: trunk layout, identity at init, masking, cache, compile."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError
from strategies_helpers import tiny_job
from torch import Tensor

from vlm_config import JobConfig
from vlm_strategies import VLMWrapper, build_vlm, trainable_parameter_names
from vlm_strategies.archs.cross_attention.impl import (
    CrossAttentionBlock,
    CrossAttentionTrunk,
    ImageCrossAttention,
)
from vlm_transformer import DecoderBlock, Transformer

VOCAB = 64


def job(n_layers: int = 2, frames: int = 1, **arch: Any) -> JobConfig:
    return tiny_job(
        {"arch": "cross_attention", "frames_per_clip": frames, **arch}, n_layers=n_layers
    )


def build(seed: int = 0, n_layers: int = 2, frames: int = 1, **arch: Any) -> VLMWrapper:
    torch.manual_seed(seed)
    return build_vlm(job(n_layers, frames, **arch))


@torch.no_grad()
def wake_cross_blocks(model: VLMWrapper, seed: int = 1) -> None:
    """Give the (zero-initialised) cross blocks weights large enough to matter."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.transformer.trunk.cross_layers.named_parameters():
        if "norm" in name:
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def inputs(batch: int = 2, frames: int = 1, seq: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 16, 16) if frames == 1 else (batch, frames, 3, 16, 16)
    return torch.randn(shape, generator=gen), torch.randint(0, VOCAB, (batch, seq), generator=gen)


# ----------------------------------------------------------------------- layout / config


def test_forward_backward_shapes_and_layout() -> None:
    model = build(n_layers=4, cross_attention_every_n_layers=2)
    trunk = model.transformer.trunk
    assert isinstance(trunk, CrossAttentionTrunk)
    assert sorted(trunk.cross_layers.keys()) == ["1", "3"]
    assert model.num_image_positions == 0
    assert model.num_image_tokens == 16
    pixels, ids = inputs()
    logits, labels = model(pixels, ids, labels=ids)
    assert logits.shape == (2, 8, VOCAB)
    assert labels is ids
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.transformer.trunk.layers.parameters())


def test_blocks_in_execution_order_and_own_their_parameters() -> None:
    model = build(n_layers=4, cross_attention_every_n_layers=2)
    trunk = model.transformer.trunk
    blocks = model.transformer.blocks()
    kinds = [type(b).__name__ for b in blocks]
    assert kinds == [
        "DecoderBlock",
        "DecoderBlock",
        "CrossAttentionBlock",
        "DecoderBlock",
        "DecoderBlock",
        "CrossAttentionBlock",
    ]
    assert blocks[2] is trunk.cross_layers["1"] and blocks[5] is trunk.cross_layers["3"]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    rest = {id(p) for p in trunk.norm.parameters()}
    assert in_blocks.isdisjoint(rest)
    assert in_blocks | rest == {id(p) for p in trunk.parameters()}


def test_kv_heads_configurable() -> None:
    model = build(cross_attention_kv_heads=1)
    attn = model.transformer.trunk.cross_layers["0"].attn
    assert isinstance(attn, ImageCrossAttention)
    assert attn.kv_proj.weight.shape == (2 * 1 * 8, 32)
    default = build().transformer.trunk.cross_layers["0"].attn
    assert default.n_kv_heads == 2


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"cross_attention_every_n_layers \(3\).*n_layers \(2\)"):
        build(n_layers=2, cross_attention_every_n_layers=3)
    with pytest.raises(ValueError, match=r"cross_attention_kv_heads \(3\).*n_heads \(4\)"):
        build(cross_attention_kv_heads=3)
    with pytest.raises(ValidationError, match="cross_attention_every_n_layers"):
        job(cross_attention_every_n_layers=0)
    cfg = job().arch
    assert cfg.residual_image_positions(48) == 0
    assert job().sequence_budget().total == 12


# ----------------------------------------------------------------------- identity at init


def test_fresh_model_equals_text_only_decoder() -> None:
    torch.manual_seed(5)
    dense = Transformer(job().model)
    dense.init_weights()
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    dense.eval()
    model = build(seed=0).eval()
    result = model.transformer.load_state_dict(dense.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(
        k.startswith("trunk.cross_layers.") for k in result.missing_keys
    )
    pixels, ids = inputs()
    with torch.no_grad():
        got, _ = model(pixels, ids)
        want = dense(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # ...and the image path is live once the zero-initialised projections move
    wake_cross_blocks(model)
    with torch.no_grad():
        moved, _ = model(pixels, ids)
        other, _ = model(torch.randn_like(pixels), ids)
    assert not torch.allclose(moved, want, atol=1e-3)
    assert not torch.allclose(moved, other, atol=1e-3)


def test_init_weights_zeroes_output_projections_again() -> None:
    model = build()
    wake_cross_blocks(model)
    model.init_weights()
    for block in model.transformer.trunk.cross_layers.values():
        assert isinstance(block, CrossAttentionBlock)
        assert torch.count_nonzero(block.attn.o_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.down_proj.weight) == 0
        assert torch.count_nonzero(block.attn.q_proj.weight) > 0


# ----------------------------------------------------------------------- freezing


@pytest.mark.parametrize(
    ("freeze", "trainable_prefixes"),
    [
        (
            [
                {"module": "transformer"},
                {"module": "cross_attention", "frozen": False},
            ],
            ("adapter.", "transformer.trunk.cross_layers."),
        ),
        (
            [{"module": "cross_attention"}, {"module": "adapter"}],
            (
                "transformer.embed.",
                "transformer.lm_head.",
                "transformer.trunk.layers.",
                "transformer.trunk.norm.",
            ),
        ),
    ],
)
def test_gradients_reach_exactly_the_trainable_parameters(
    freeze: list[dict[str, Any]], trainable_prefixes: tuple[str, ...]
) -> None:
    model = build(freeze=freeze)
    wake_cross_blocks(model)  # so every cross parameter gets a non-zero gradient
    expected = {n for n, _ in model.named_parameters() if n.startswith(trainable_prefixes)}
    assert expected and trainable_parameter_names(model) == expected
    pixels, ids = inputs()
    logits, _ = model(pixels, ids)
    logits.float().logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name


# ----------------------------------------------------------------------- video / masks


def test_all_padded_clip_is_finite_and_text_only() -> None:
    model = build(frames=3).eval()
    wake_cross_blocks(model)
    pixels, ids = inputs(frames=3)
    frame_mask = torch.tensor([[False, False, False], [True, True, True]])
    with torch.no_grad():
        logits, _ = model(pixels, ids, frame_mask=frame_mask)
        text_only = model.transformer(ids)  # no image features: cross blocks skipped
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0], text_only[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[1], text_only[1], atol=1e-3)


def test_frame_count_mismatch_raises() -> None:
    model = build(frames=3)
    pixels, ids = inputs(frames=2)
    with pytest.raises(ValueError, match=r"(?s)2 frame.*frames_per_clip=3"):
        model(pixels, ids)


# ----------------------------------------------------------------------- generation


@pytest.mark.parametrize("video", [False, True])
def test_generate_projects_image_kv_once(video: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens == greedy recomputation is the conformance kit's ``generation`` check; here:
    the cached image K/V are projected once per cross block, at prefill."""
    frames = 3 if video else 1
    model = build(n_layers=4, frames=frames, cross_attention_every_n_layers=2).eval()
    wake_cross_blocks(model, seed=3)
    pixels, ids = inputs(frames=frames, seq=5, seed=4)
    frame_mask = torch.tensor([[True, False, True], [True, True, False]]) if video else None
    calls: list[int] = []
    original = ImageCrossAttention.image_kv

    def counting(self: ImageCrossAttention, image: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(1)
        return original(self, image)

    monkeypatch.setattr(ImageCrossAttention, "image_kv", counting)
    out = model.generate(pixels, ids, frame_mask=frame_mask, max_new_tokens=6)
    assert len(calls) == 2
    assert out.shape == (2, 11)


# ----------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compile_fullgraph_forward_backward() -> None:
    torch._dynamo.reset()
    model = build(n_layers=1, frames=2).train()
    wake_cross_blocks(model)
    pixels, ids = inputs(frames=2, seq=6)
    frame_mask = torch.tensor([[True, False], [True, True]])
    compiled = torch.compile(model, fullgraph=True)
    logits, _ = compiled(pixels, ids, frame_mask=frame_mask)
    logits.float().pow(2).mean().backward()
    eager, _ = model(pixels, ids, frame_mask=frame_mask)
    torch.testing.assert_close(logits, eager, atol=1e-5, rtol=1e-5)
    cross = model.transformer.trunk.cross_layers["0"]
    assert isinstance(cross, CrossAttentionBlock)
    assert cross.attn.q_proj.weight.grad is not None
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.transformer.parameters()
    )
    assert not isinstance(cross, DecoderBlock)


def test_meta_construction_initialises_every_parameter() -> None:
    model = build_vlm(job(n_layers=2, frames=2), init_device="meta")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("vision_encoder."):
                p.fill_(float("nan"))
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    block = model.transformer.trunk.cross_layers["1"]
    assert torch.count_nonzero(block.attn.o_proj.weight) == 0
    pixels, ids = inputs(frames=2)
    with torch.no_grad():
        logits, _ = model(pixels, ids)
        torch.testing.assert_close(logits, model.transformer(ids), atol=1e-5, rtol=1e-5)
