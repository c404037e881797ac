"""The ``mot`` arch: per-modality routing (any layout), warm start, masking, cache, compile."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from strategies_helpers import tiny_job
from torch import Tensor

from vlm_config import JobConfig, ModelConfig
from vlm_strategies import VLMWrapper, build_vlm, trainable_parameter_names
from vlm_strategies.archs.mot.impl import MoTBlock, MoTTrunk
from vlm_strategies.archs.mot.warm_start import dense_name_for, warm_start_from_dense
from vlm_transformer import DecoderBlock, ModalityContext, Transformer, apply_rotary

VOCAB = 64


def job(n_layers: int = 2, frames: int = 1, **arch: Any) -> JobConfig:
    return tiny_job({"arch": "mot", "frames_per_clip": frames, **arch}, n_layers=n_layers)


@torch.no_grad()
def jitter_norms(module: torch.nn.Module, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "norm" in name:
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def build(seed: int = 0, n_layers: int = 2, frames: int = 1, **arch: Any) -> VLMWrapper:
    torch.manual_seed(seed)
    model = build_vlm(job(n_layers, frames, **arch))
    jitter_norms(model, seed)
    return model


def inputs(batch: int = 2, frames: int = 1, seq: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 16, 16) if frames == 1 else (batch, frames, 3, 16, 16)
    return torch.randn(shape, generator=gen), torch.randint(0, VOCAB, (batch, seq), generator=gen)


# ----------------------------------------------------------------------- layout


def test_forward_backward_shapes_and_layout() -> None:
    model = build()
    trunk = model.transformer.trunk
    assert isinstance(trunk, MoTTrunk)
    assert model.num_image_positions == 16
    blocks = model.transformer.blocks()
    assert len(blocks) == 2 and all(isinstance(b, MoTBlock) for b in blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    assert in_blocks | {id(p) for p in trunk.norm.parameters()} == {
        id(p) for p in trunk.parameters()
    }
    pixels, ids = inputs()
    logits, _ = model(pixels, ids, labels=ids)
    assert logits.shape == (2, 8, VOCAB)
    logits.float().pow(2).mean().backward()
    assert trunk.layers["0"].image.attn.qkv_proj.weight.grad is not None
    assert torch.count_nonzero(trunk.layers["0"].text.mlp.down_proj.weight.grad) > 0


# ----------------------------------------------------------------------- routing


def reference_forward(model: Transformer, tokens: Tensor, modality: Tensor) -> Tensor:
    """Position-by-position reference: every row uses the weights of its own modality."""
    trunk = model.trunk
    assert isinstance(trunk, MoTTrunk)
    cfg = model.config
    b, s = tokens.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    x = model.embed(tokens)

    def rowwise(h: Tensor, towers: Any, fn: Any) -> Tensor:
        rows = [
            torch.stack([fn(towers[int(modality[i, p])], h[i, p]) for p in range(s)])
            for i in range(b)
        ]
        return torch.stack(rows)

    def qkv(t: DecoderBlock, row: Tensor) -> Tensor:
        out = t.attn.qkv_proj(t.attn_norm(row))
        q, k, v = out.split([nh * hd, nkv * hd, nkv * hd])
        if t.attn.q_norm is not None:
            q = t.attn.q_norm(q.view(nh, hd)).flatten()
            k = t.attn.k_norm(k.view(nkv, hd)).flatten()
        return torch.cat((q, k, v))

    cos, sin = model.rotary(torch.arange(s)[None])
    for layer in trunk.layers.values():
        towers = (layer.image, layer.text)
        q, k, v = rowwise(x, towers, qkv).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = apply_rotary(q.view(b, s, nh, hd).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(b, s, nkv, hd).transpose(1, 2), cos, sin)
        v = v.view(b, s, nkv, hd).transpose(1, 2)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        att = att.transpose(1, 2).reshape(b, s, nh * hd)
        x = x + rowwise(att, towers, lambda t, r: t.attn.o_proj(r))
        x = x + rowwise(x, towers, lambda t, r: t.mlp(t.mlp_norm(r)))
    x = rowwise(x, (trunk.norm.image, trunk.norm.text), lambda n, r: n(r))
    return model.lm_head(x)


@pytest.mark.parametrize("dispatch", ["select", "gather"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_interleaved_modalities_use_their_own_weights(dispatch: str, qk_norm: bool) -> None:
    cfg = ModelConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=VOCAB,
        max_seq_len=64,
        qk_norm=qk_norm,
    )
    torch.manual_seed(0)
    model = Transformer(cfg, MoTTrunk(cfg, dispatch))
    model.init_weights()
    jitter_norms(model)
    model.eval()
    tokens = torch.randint(0, VOCAB, (2, 10))
    modality = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0, 1, 1], [0, 1, 0, 1, 0, 0, 0, 1, 1, 0]])
    with torch.no_grad():
        got = model(tokens, ModalityContext(modality_ids=modality))
        want = reference_forward(model, tokens, modality)
        all_text = model(tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, all_text, atol=1e-3)  # the image weights were used


@pytest.mark.parametrize("dispatch", ["select", "gather"])
def test_image_prefix_split_equals_explicit_modality_ids(dispatch: str) -> None:
    """The arch's own contexts carry no ids: each copy runs on its slice of the image-prefix
    layout; that equals routing explicit ids per position (values and gradients)."""
    model = build(dispatch=dispatch).train()
    pixels, ids = inputs()
    embeds, valid = model.encode_images(pixels)
    ctx = model.strategy.context(embeds, valid, ids)
    assert ctx.modality_ids is None
    b, p = embeds.shape[:2]
    explicit_ids = (torch.arange(p + ids.shape[1]) >= p).long()[None].expand(b, -1)
    got = model.transformer(ids, ctx)
    want = model.transformer(ids, ModalityContext(prefix_embeds=embeds, modality_ids=explicit_ids))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(got.square().mean(), params, allow_unused=True, retain_graph=True)
    g_want = torch.autograd.grad(want.square().mean(), params, allow_unused=True)
    for a, b_ in zip(g_got, g_want, strict=True):
        if a is None:  # skipped by the split path: the last layer's image output side
            assert b_ is None or not torch.count_nonzero(b_)
        else:
            assert b_ is not None
            torch.testing.assert_close(a, b_, atol=1e-6, rtol=1e-5)


def test_unknown_modality_id_raises() -> None:
    model = build()
    ids = torch.randint(0, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="modality_ids"):
        model.transformer(ids, ModalityContext(modality_ids=torch.tensor([[0, 1, 2, 1]])))


# ----------------------------------------------------------------------- warm start


def test_warm_start_reproduces_the_dense_joint_decoder() -> None:
    torch.manual_seed(3)
    dense = build_vlm(tiny_job({"arch": "joint_decoder", "frames_per_clip": 2}))
    jitter_norms(dense, seed=3)
    dense.eval()
    mot = build(seed=9, frames=2).eval()
    written = warm_start_from_dense(mot, dense.state_dict())
    assert "transformer.trunk.layers.1.image.attn.qkv_proj.weight" in written
    assert "adapter.fc1.weight" in written
    pixels, ids = inputs(frames=2)
    frame_mask = torch.tensor([[True, False], [True, True]])
    with torch.no_grad():
        want, _ = dense(pixels, ids, frame_mask=frame_mask)
        got, _ = mot(pixels, ids, frame_mask=frame_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_warm_start_from_a_text_only_transformer() -> None:
    cfg = job().model
    torch.manual_seed(4)
    dense = Transformer(cfg)
    dense.init_weights()
    jitter_norms(dense, seed=4)
    mot = build(seed=2)
    warm_start_from_dense(mot.transformer, dense.state_dict())
    layer = mot.transformer.trunk.layers["1"]
    for tower in (layer.image, layer.text):
        assert torch.equal(tower.mlp.down_proj.weight, dense.trunk.layers["1"].mlp.down_proj.weight)
    assert torch.equal(mot.transformer.trunk.norm.image.weight, dense.trunk.norm.weight)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(mot.transformer(ids), dense(ids), atol=1e-5, rtol=1e-5)
    assert dense_name_for("trunk.layers.12.text.attn.o_proj.weight") == (
        "trunk.layers.12.attn.o_proj.weight"
    )


def test_warm_start_rejects_a_mismatched_checkpoint() -> None:
    dense = Transformer(job(n_layers=3).model)
    with pytest.raises(ValueError, match="not used"):
        warm_start_from_dense(build(), dense.state_dict())
    small = Transformer(job(n_layers=1).model)
    with pytest.raises(ValueError, match="no dense source"):
        warm_start_from_dense(build(), small.state_dict())


# ----------------------------------------------------------------------- freezing


def test_freeze_aliases_and_gradients() -> None:
    freeze = [
        {"module": "mot_text"},
        {"module": "transformer.embed.*"},
        {"module": "transformer.lm_head.*"},
        {"module": "adapter"},
    ]
    model = build(freeze=freeze)
    expected = {n for n, _ in model.named_parameters() if ".image." in n}
    assert len(expected) == 2 * 6 + 1
    assert trainable_parameter_names(model) == expected
    pixels, ids = inputs()
    logits, _ = model(pixels, ids)
    logits.float().logsumexp(-1).mean().backward()
    # the last layer's image copy only feeds image positions' outputs, which get no
    # logits: its output side (o_proj, FFN) and the image final norm are skipped
    last = f"transformer.trunk.layers.{len(model.transformer.trunk.layers) - 1}.image."
    dead = {
        n
        for n in expected
        if n.startswith(last) and ".attn_norm." not in n and ".qkv_proj." not in n
    } | {n for n in expected if n.startswith("transformer.trunk.norm.image.")}
    assert len(dead) == 5
    for name, p in model.named_parameters():
        if name in expected and name not in dead:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # image copies of the first layer shape the text through attention
    assert torch.count_nonzero(model.transformer.trunk.layers["0"].image.mlp.down_proj.weight.grad)
    everything = build(freeze=[{"module": "mot"}])
    assert not any(".trunk.layers." in n for n in trainable_parameter_names(everything))
    assert "transformer.embed.weight" in trainable_parameter_names(everything)


# ----------------------------------------------------------------------- video / masks


def test_frame_count_mismatch_raises() -> None:
    model = build(frames=3)
    pixels, ids = inputs(frames=4)
    with pytest.raises(ValueError, match=r"(?s)4 frame.*frames_per_clip=3"):
        model(pixels, ids)


# ----------------------------------------------------------------------- generation


def test_generate_with_gather_dispatch_matches_greedy_recomputation() -> None:
    """(the default ``select`` dispatch is covered by the conformance kit)"""
    model = build(n_layers=2, frames=2, dispatch="gather").eval()
    pixels, ids = inputs(frames=2, seq=5, seed=4)
    frame_mask = torch.tensor([[True, False], [True, True]])
    out = model.generate(pixels, ids, frame_mask=frame_mask, max_new_tokens=6)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(pixels, seq, frame_mask=frame_mask)
            seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert out.shape == (2, 11)
    assert torch.equal(out, seq)


# ----------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compile_fullgraph_forward_backward() -> None:
    torch._dynamo.reset()
    model = build(n_layers=1, frames=2).train()
    pixels, ids = inputs(frames=2, seq=6)
    frame_mask = torch.tensor([[True, False], [True, True]])
    compiled = torch.compile(model, fullgraph=True)
    logits, _ = compiled(pixels, ids, frame_mask=frame_mask)
    logits.float().pow(2).mean().backward()
    eager, _ = model(pixels, ids, frame_mask=frame_mask)
    torch.testing.assert_close(logits, eager, atol=1e-5, rtol=1e-5)
    text_q = model.transformer.trunk.layers["0"].text.attn.qkv_proj.weight
    image_q = model.transformer.trunk.layers["0"].image.attn.qkv_proj.weight
    assert text_q.grad is not None and image_q.grad is not None
    assert torch.count_nonzero(image_q.grad) > 0
