from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlm_transformer import (
    AttentionMask,
    LayerNorm,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary,
    attention,
    build_attention_mask,
    repeat_kv,
)


def test_rmsnorm_matches_reference() -> None:
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = torch.randn(3, 5, 8)
    ref = norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), ref)
    y = norm.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)


def test_layernorm_low_precision_stats() -> None:
    norm = LayerNorm(8)
    x = torch.randn(2, 8) * 100 + 1000
    y = norm(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.layer_norm(x, (8,)), atol=0.1, rtol=0.05)


def test_rotary_matches_hf_rotate_half() -> None:
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    apply_rotary_pos_emb = llama.apply_rotary_pos_emb

    rot = RotaryEmbedding(16, theta=500.0)
    pos = torch.arange(7)[None].expand(2, 7)
    cos, sin = rot(pos)
    q, k = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), hq)
    torch.testing.assert_close(apply_rotary(k, cos, sin), hk)


def test_rotary_is_relative() -> None:
    rot = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i: int, j: int) -> torch.Tensor:
        ci, si = rot(torch.tensor([[i]]))
        cj, sj = rot(torch.tensor([[j]]))
        return (apply_rotary(q, ci, si) * apply_rotary(k, cj, sj)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))


@pytest.mark.parametrize("x_batch", [1, 2])
def test_rotary_no_grad_path_is_bitwise_the_autograd_one(x_batch: int) -> None:
    # without an autograd graph apply_rotary writes into its temporaries: same bits,
    # including a strided view (a slice of a fused QKV) and cos/sin broadcasting x up
    rot = RotaryEmbedding(16)
    cos, sin = rot(torch.arange(7)[None].expand(2, 7))
    qkv = torch.randn(x_batch, 7, 5, 16)
    x = qkv[:, :, :3]
    with torch.enable_grad():
        ref = apply_rotary(x, cos, sin, head_axis=-2)
    before = qkv.clone()
    with torch.no_grad():
        out = apply_rotary(x, cos, sin, head_axis=-2)
    assert torch.equal(out, ref)
    assert torch.equal(qkv, before)  # the input is never written


def test_swiglu_no_grad_path_is_bitwise_and_leaves_projection_output() -> None:
    mlp = SwiGLU(16, 24)
    seen: list[torch.Tensor] = []
    mlp.gate_up_proj.register_forward_hook(lambda _m, _i, out: seen.append(out.clone()) or None)
    kept: list[torch.Tensor] = []
    mlp.gate_up_proj.register_forward_hook(lambda _m, _i, out: kept.append(out) or None)
    x = torch.randn(2, 5, 16)
    ref = mlp(x)
    with torch.no_grad():
        out = mlp(x)
    assert torch.equal(out, ref)
    assert torch.equal(kept[1], seen[1])  # the projection's output is not written to


def test_rotary_buffer_stays_float32() -> None:
    rot = RotaryEmbedding(16, theta=10000.0)
    ref = rot.inv_freq.clone()
    rot.to(torch.bfloat16)
    assert rot.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rot.inv_freq, ref, rtol=0, atol=0)
    assert "inv_freq" not in rot.state_dict()
    cos, _ = rot(torch.arange(4)[None])
    assert cos.dtype == torch.float32


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_gqa_equals_repeated_mha(hkv: int) -> None:
    q = torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, hkv, 6, 8), torch.randn(2, hkv, 6, 8)
    out = attention(q, k, v, AttentionMask.causal())
    kr, vr = k.repeat_interleave(4 // hkv, dim=1), v.repeat_interleave(4 // hkv, dim=1)
    torch.testing.assert_close(repeat_kv(k, 4 // hkv), kr)
    ref = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    torch.testing.assert_close(out, ref)
    # and the explicit reference: query head h uses kv head h // group
    scores = (q @ kr.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ vr, atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="Sq == Sk"):
        attention(
            torch.randn(1, 2, 1, 4),
            torch.randn(1, 2, 3, 4),
            torch.randn(1, 2, 3, 4),
            AttentionMask.causal(),
        )


def test_key_padding_guard_zeroes_empty_rows() -> None:
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    valid = torch.tensor([[True, True, False, False, False], [False] * 5])
    out = attention(q, k, v, AttentionMask.from_key_padding(valid))
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    ref = F.scaled_dot_product_attention(q[:1], k[:1, :, :2], v[:1, :, :2])
    torch.testing.assert_close(out[:1], ref)


def test_build_mask_cases() -> None:
    assert build_attention_mask(q_len=4, kv_len=4, device="cpu").is_causal
    full = build_attention_mask(q_len=1, kv_len=9, device="cpu")
    assert full.dense is None
    assert not full.is_causal
    m = build_attention_mask(q_len=2, kv_len=5, device="cpu").dense
    assert m is not None
    assert m[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]
    kv = torch.tensor([[False, True, True]])
    m = build_attention_mask(q_len=3, kv_len=3, device="cpu", key_valid=kv).dense
    assert m is not None
    # pad query 0 sees only itself; real queries never see the pad key
    assert m[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    m = build_attention_mask(
        q_len=4, kv_len=4, device="cpu", prefix_len=2, prefix_bidirectional=True
    ).dense
    assert m is not None
    assert m[0, 0].tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]
