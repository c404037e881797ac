from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tf_helpers import tiny_config, tiny_model
from torch import Tensor, nn

from vlm_transformer import (
    DenseTrunk,
    GeluMLP,
    KVCache,
    LayerNorm,
    ModalityContext,
    Transformer,
    Trunk,
    TrunkInputs,
    apply_rotary,
    mark_zero_init,
)


def test_shapes_and_blocks(model: Transformer) -> None:
    ids = torch.randint(0, 64, (2, 7))
    assert model(ids).shape == (2, 7, 64)
    assert model(ids, logits_to_keep=1).shape == (2, 1, 64)
    assert len(model.blocks()) == 2
    assert model.auxiliary_losses() == {}
    names = {n for n, _ in model.named_parameters()}
    assert "trunk.layers.1.attn.qkv_proj.weight" in names
    assert "trunk.norm.weight" in names


def test_causality(model: Transformer) -> None:
    ids = torch.randint(0, 64, (2, 9))
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 64
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4


def test_padding_key_has_no_effect(model: Transformer) -> None:
    ids = torch.randint(0, 64, (2, 8))
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, 3] = False
    valid[1, 6:] = False
    ctx = ModalityContext(key_padding_mask=valid)
    other = ids.clone()
    other[0, 3] = (other[0, 3] + 7) % 64
    other[1, 6:] = (other[1, 6:] + 7) % 64
    a, b = model(ids, ctx), model(other, ctx)
    torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=1e-6)
    assert (a[~valid] - b[~valid]).abs().max() > 1e-4  # padded rows are different garbage
    # right padding == the unpadded shorter sequence
    torch.testing.assert_close(a[1, :6], model(ids[1:, :6])[0], atol=1e-5, rtol=1e-5)


def test_left_padding_equals_unpadded(model: Transformer) -> None:
    ids = torch.randint(0, 64, (1, 6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), 1)
    valid = torch.tensor([[False] * 3 + [True] * 6])
    out = model(padded, ModalityContext(key_padding_mask=valid))
    assert torch.isfinite(out).all()  # fully padded query rows stay finite (NaN guard)
    torch.testing.assert_close(out[:, 3:], model(ids), atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_finite_and_grad_finite(model: Transformer) -> None:
    model.train()
    ids = torch.randint(0, 64, (2, 5))
    valid = torch.zeros(2, 5, dtype=torch.bool)
    valid[1, 2:] = True
    out = model(ids, ModalityContext(key_padding_mask=valid))
    assert torch.isfinite(out).all()
    out[valid].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_prefix_trim_and_inputs_embeds(model: Transformer) -> None:
    ids = torch.randint(0, 64, (2, 5))
    prefix = torch.randn(2, 3, 32)
    out = model(ids, ModalityContext(prefix_embeds=prefix))
    assert out.shape == (2, 5, 64)
    # same as feeding the concatenated embeddings, trimmed by hand
    emb = torch.cat((prefix, model.embed(ids)), 1)
    full = model(None, ModalityContext(inputs_embeds=emb))
    torch.testing.assert_close(out, full[:, 3:], atol=1e-6, rtol=1e-6)
    partial = model(ids, ModalityContext(prefix_embeds=prefix, trim_prefix=1))
    assert partial.shape == (2, 7, 64)
    torch.testing.assert_close(partial[:, 2:], out, atol=1e-6, rtol=1e-6)


def test_prefix_lm(model: Transformer) -> None:
    ids = torch.randint(0, 64, (2, 4))
    prefix = torch.randn(2, 3, 32)
    ctx = ModalityContext(prefix_embeds=prefix, prefix_bidirectional=True, trim_prefix=0)
    out = model(ids, ctx)
    changed = prefix.clone()
    changed[:, 2] += 1.0
    out2 = model(
        ids, ModalityContext(prefix_embeds=changed, prefix_bidirectional=True, trim_prefix=0)
    )
    # earlier prefix positions see the later prefix position (bidirectional) ...
    assert (out[:, 0] - out2[:, 0]).abs().max() > 1e-4
    # ... while causal mode does not
    c1 = model(ids, ModalityContext(prefix_embeds=prefix, trim_prefix=0))
    c2 = model(ids, ModalityContext(prefix_embeds=changed, trim_prefix=0))
    torch.testing.assert_close(c1[:, :2], c2[:, :2], rtol=0, atol=0)
    # text stays causal under prefix-LM
    ids2 = ids.clone()
    ids2[:, 3] = (ids2[:, 3] + 1) % 64
    out3 = model(ids2, ctx)
    torch.testing.assert_close(out[:, :6], out3[:, :6], rtol=0, atol=0)


def test_context_validation() -> None:
    with pytest.raises(ValueError, match="image_mask given without image_features"):
        ModalityContext(image_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="exceeds the prefix length"):
        ModalityContext(prefix_embeds=torch.randn(1, 2, 4), trim_prefix=3)
    with pytest.raises(ValueError, match="needs prefix_embeds"):
        ModalityContext(prefix_bidirectional=True)
    with pytest.raises(ValueError, match="batch size"):
        ModalityContext(
            prefix_embeds=torch.randn(2, 2, 4), key_padding_mask=torch.ones(3, 4, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="int64"):
        ModalityContext(modality_ids=torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="bool"):
        ModalityContext(key_padding_mask=torch.ones(1, 3))


def test_forward_validation(model: Transformer) -> None:
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match="not both"):
        model(ids, ModalityContext(inputs_embeds=torch.randn(2, 5, 32)))
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        model(
            ids,
            ModalityContext(
                prefix_embeds=torch.randn(2, 3, 32),
                modality_ids=torch.zeros(2, 5, dtype=torch.long),
            ),
        )
    with pytest.raises(ValueError, match=r"\(2, 3, 32\)"):
        model(ids, ModalityContext(prefix_embeds=torch.randn(2, 3, 16)))
    with pytest.raises(ValueError, match="long"):
        model(ids.int())


def test_meta_init_and_bf16_rotary() -> None:
    cfg = tiny_config(tie_embeddings=True, qk_norm=True)
    with torch.device("meta"):
        m = Transformer(cfg)
    assert m.embed.weight.is_meta
    m.to_empty(device="cpu")
    m.init_weights()
    tensors = list(m.parameters()) + list(m.buffers())
    assert not any(t.is_meta for t in tensors)
    ref = Transformer(cfg).rotary.inv_freq
    torch.testing.assert_close(m.rotary.inv_freq, ref, rtol=0, atol=0)
    for name, p in m.named_parameters():
        if "norm" in name:
            assert (p == 1).all(), name
        else:
            assert 0.001 < p.std() < 0.05, name
    o = m.trunk.layers["0"].attn.o_proj.weight  # type: ignore[union-attr, index]
    assert abs(o.std().item() - 0.02 / math.sqrt(4)) < 0.003
    m.to(torch.bfloat16)
    assert m.rotary.inv_freq.dtype == torch.float32
    assert m.embed.weight.dtype == torch.bfloat16
    out = m(torch.randint(0, 64, (1, 4)))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


def test_tied_embeddings_single_parameter() -> None:
    m = tiny_model(tie_embeddings=True)
    assert m.lm_head is None
    assert m.output_weight is m.embed.weight
    assert "lm_head.weight" not in m.state_dict()
    h = torch.randn(1, 2, 32)
    torch.testing.assert_close(
        m(None, ModalityContext(inputs_embeds=h)),
        m(None, ModalityContext(inputs_embeds=h), head=lambda x: x @ m.embed.weight.T),
    )


class _ScaledTrunk(DenseTrunk):
    """A third-party trunk: dense layers + a zero-init gate + an aux loss."""

    def __init__(self, config) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config)
        self.gate = mark_zero_init(nn.Linear(config.dim, config.dim))
        self._aux: dict[str, Tensor] = {}

    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        hidden = hidden + self.gate(hidden)
        self._aux = {"z": hidden.pow(2).mean()}
        return super().forward(hidden, state)

    def auxiliary_losses(self) -> dict[str, Tensor]:
        return self._aux


def test_custom_trunk_and_zero_init() -> None:
    cfg = tiny_config()
    torch.manual_seed(0)
    trunk = _ScaledTrunk(cfg)
    m = Transformer(cfg, trunk)
    m.init_weights()
    assert (trunk.gate.weight == 0).all()
    assert (trunk.gate.bias == 0).all()
    out = m(torch.randint(0, 64, (1, 3)))
    assert out.shape == (1, 3, 64)
    assert set(m.auxiliary_losses()) == {"z"}
    assert isinstance(m.trunk, Trunk)


def test_trunk_is_abstract() -> None:
    with pytest.raises(TypeError):
        Trunk(tiny_config())  # type: ignore[abstract]


def test_gelu_layernorm_variant_uses_exact_gelu_and_layernorm() -> None:
    """Every norm is a mean-centring LayerNorm with bias, every MLP ``down(gelu(up(x)))``
    with the exact erf GELU: checked against a hand-written reference forward."""
    m = tiny_model(mlp="gelu", norm_type="layernorm", n_kv_heads=1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.bias"):  # non-zero biases so a missing bias shows up
                p.uniform_(-0.5, 0.5)
            elif ".mlp." in name:  # pre-activations of order 1, where tanh-GELU != erf-GELU
                p.normal_(0.0, 0.3)
    ids = torch.randint(0, 64, (2, 5))
    cfg = m.config

    def layer_norm(norm: nn.Module, x: Tensor) -> Tensor:
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + cfg.norm_eps) * norm.weight + norm.bias

    def gelu_mlp(mlp: nn.Module, x: Tensor) -> Tensor:
        h = x @ mlp.up_proj.weight.T
        return (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ mlp.down_proj.weight.T

    x = m.embed(ids)
    s = ids.shape[1]
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    cos, sin = m.rotary(torch.arange(s)[None])
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for block in m.trunk.layers.values():
        q, k, v = (layer_norm(block.attn_norm, x) @ block.attn.qkv_proj.weight.T).split(
            [nh * hd, nkv * hd, nkv * hd], dim=-1
        )
        q = apply_rotary(q.view(2, s, nh, hd).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(2, s, nkv, hd).transpose(1, 2), cos, sin)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.view(2, s, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, s, nh * hd)
        x = x + att @ block.attn.o_proj.weight.T
        x = x + gelu_mlp(block.mlp, layer_norm(block.mlp_norm, x))
    want = layer_norm(m.trunk.norm, x) @ m.output_weight.T
    with torch.no_grad():
        torch.testing.assert_close(m(ids), want, atol=1e-5, rtol=1e-5)
    # (the tanh-approximate GELU misses this reference by ~6e-5, an RMSNorm by far more)
    assert isinstance(m.trunk.norm, LayerNorm) and isinstance(m.trunk.layers["0"].mlp, GeluMLP)


class _AllPositionsTrunk(DenseTrunk):
    """A dense trunk that ignores ``output_from`` (returns every position)."""

    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        return super().forward(hidden, dataclasses.replace(state, output_from=0))


class _WrongCountTrunk(DenseTrunk):
    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        return super().forward(hidden, state)[:, 1:]


def _twin(model: Transformer, trunk_cls: type[DenseTrunk]) -> Transformer:
    twin = Transformer(model.config, trunk_cls(model.config))
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize(
    ("prefix_len", "trim", "keep"), [(3, None, 0), (3, 1, 0), (0, None, 2), (3, None, 4)]
)
def test_output_from_prunes_last_block_without_changing_results(
    prefix_len: int, trim: int | None, keep: int
) -> None:
    model = tiny_model().train()
    full = _twin(model, _AllPositionsTrunk).train()
    ids = torch.randint(0, 64, (2, 5))
    prefix = torch.randn(2, prefix_len, 32) if prefix_len else None
    ctx = ModalityContext(prefix_embeds=prefix, trim_prefix=trim)
    rows: list[int] = []
    last = list(model.trunk.layers.values())[-1]
    hook = last.mlp.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[1]))
    out = model(ids, ctx, logits_to_keep=keep)
    hook.remove()
    ref = full(ids, ctx, logits_to_keep=keep)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    # the last block's MLP saw only the positions that get logits
    assert rows == [out.shape[1]] and out.shape[1] < prefix_len + 5
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), full.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_output_from_keeps_the_cache_complete() -> None:
    model = tiny_model()
    full = _twin(model, _AllPositionsTrunk)
    ids, nxt = torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 1))
    caches = []
    for m in (model, full):
        cache = KVCache()
        m(ids, cache=cache, logits_to_keep=1)  # prefill: only the last position is kept
        caches.append((cache, m(nxt, cache=cache)))
    (c1, step1), (c2, step2) = caches
    torch.testing.assert_close(step1, step2, atol=1e-6, rtol=1e-6)
    for name in model.trunk.layers:
        k1, k2 = c1.layer(name).k, c2.layer(name).k
        assert k1 is not None and k2 is not None and k1.shape[2] == 7
        torch.testing.assert_close(k1, k2)


def test_trunk_returning_wrong_position_count_is_named() -> None:
    model = _twin(tiny_model(), _WrongCountTrunk)
    with pytest.raises(RuntimeError, match="output_from"):
        model(torch.randint(0, 64, (1, 4)))
