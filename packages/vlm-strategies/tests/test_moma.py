"""The ``moma`` arch: expert-choice, sigmoid-routed per-modality experts."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
from strategies_helpers import tiny_job
from torch import Tensor

from vlm_config import JobConfig, get_registry
from vlm_strategies import build_vlm, causal_lm_loss, trainable_parameter_names
from vlm_strategies.archs.moma.config import MoMaConfig
from vlm_strategies.archs.moma.experts import MoMaExperts
from vlm_strategies.archs.moma.reference import loop_expert_forward
from vlm_strategies.archs.moma.trunk import MoMaTrunk
from vlm_strategies.wrapper import VLMWrapper
from vlm_transformer import KVCache


def moma_job(**arch: object) -> JobConfig:
    return tiny_job({"arch": "moma", **arch})


def build(seed: int = 0, **arch: object) -> VLMWrapper:
    torch.manual_seed(seed)
    return build_vlm(moma_job(**arch))


def trunk_of(model: VLMWrapper) -> MoMaTrunk:
    trunk = model.transformer.trunk
    assert isinstance(trunk, MoMaTrunk)
    return trunk


def batch(
    b: int = 2, s: int = 12, frames: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (b, 3, 16, 16) if frames is None else (b, frames, 3, 16, 16)
    return torch.randn(shape, generator=g), torch.randint(0, 64, (b, s), generator=g)


def tiny_layer(
    seed: int = 0, experts: int = 4, capacity: float = 0.25, **kw: object
) -> MoMaExperts:
    torch.manual_seed(seed)
    layer = MoMaExperts(16, 24, experts, capacity, **kw)  # type: ignore[arg-type]
    for name in ("image", "text"):
        layer.group(name).init_parameters(0.3, 0.2)
    return layer


# ----------------------------------------------------------------------------- config


def test_config_registered_and_validated() -> None:
    assert get_registry().load("vlm.archs", "moma") is MoMaConfig
    cfg = MoMaConfig()
    assert cfg.experts_per_modality == 4 and cfg.resolved_capacity == 0.25
    assert MoMaConfig(capacity=0.5).resolved_capacity == 0.5
    for bad in ({"experts_per_modality": 0}, {"capacity": 1.5}, {"capacity": 0.0}):
        with pytest.raises(pydantic.ValidationError):
            MoMaConfig.model_validate(bad)
    assert "moma_routers" in MoMaConfig.all_module_aliases()


# ------------------------------------------------------------------ forward / backward


def test_forward_backward_shapes_and_param_names() -> None:
    model = build(experts_per_modality=3)
    pixels, ids = batch()
    logits, labels = model(pixels, ids, labels=ids)
    assert logits.shape == (2, 12, 64) and labels is ids
    loss = causal_lm_loss(logits, ids) + sum(model.auxiliary_losses().values())
    loss.backward()
    names = dict(model.named_parameters())
    router = names["transformer.trunk.layers.1.experts.text.router"]
    assert router.shape == (3, 32)
    hidden = model.transformer.config.hidden_dim
    assert names["transformer.trunk.layers.0.experts.image.gate_up"].shape == (3, 32, 2 * hidden)
    assert names["transformer.trunk.layers.0.experts.image.down"].shape == (3, hidden, 32)
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert not any(n.endswith("mlp.gate_up_proj.weight") for n in names)


@pytest.mark.parametrize(
    "freeze",
    [
        [{"module": "transformer"}, {"module": "moma_experts", "frozen": False}],
        [{"module": "moma_routers"}, {"module": "adapter"}, {"module": "moma_text_experts"}],
        [{"module": "moma_attention"}, {"module": "moma_image_experts"}],
    ],
)
def test_gradients_reach_exactly_the_trainable_parameters(freeze: list[dict[str, object]]) -> None:
    model = build(freeze=freeze, selection_loss_weight=0.1)
    pixels, ids = batch()
    logits, _ = model(pixels, ids)
    loss = causal_lm_loss(logits, ids) + sum(model.auxiliary_losses().values())
    loss.backward()
    with_grad = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    trainable = trainable_parameter_names(model)
    assert trainable and trainable != {n for n, _ in model.named_parameters()}
    # the last layer's image-expert FFNs only write image positions, which are trimmed
    # before the head: no loss reaches them (their router still gets the aux losses)
    last = model.transformer.config.n_layers - 1
    dead = {f"transformer.trunk.layers.{last}.experts.image.{p}" for p in ("gate_up", "down")}
    assert with_grad == trainable - dead


# ------------------------------------------------------------- batched == Python loop


@pytest.mark.parametrize("noisy", [False, True])
def test_batched_experts_match_the_per_expert_loop(noisy: bool) -> None:
    layer = tiny_layer(capacity=0.3)
    g = torch.Generator().manual_seed(1)
    b, s = 3, 11
    x = torch.randn(b, s, 16, generator=g, requires_grad=True)
    modality_ids = torch.randint(0, 2, (b, s), generator=g)  # interleaved modalities
    valid = torch.rand(b, s, generator=g) > 0.2
    counts = (5, 6)
    noise = [torch.randn(b, s, 4, generator=g) for _ in range(2)] if noisy else None
    out = layer(x, modality_ids, valid, counts, noise)
    ref = loop_expert_forward(layer, x, modality_ids, valid, counts, noise)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.abs().sum() > 0
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tokens_picked_by_several_experts_sum_and_unpicked_get_zero() -> None:
    layer = tiny_layer(experts=3, capacity=0.5)
    x = torch.randn(1, 8, 16)
    ids = torch.ones(1, 8, dtype=torch.long)  # all text
    out = layer(x, ids, None, (0, 8))
    routing = layer.group("text").route(x, ids == 1, 4)
    picked = torch.zeros(8, dtype=torch.long).index_add(
        0, routing.index.flatten(), torch.ones(12, dtype=torch.long)
    )
    zero_rows = out[0].abs().sum(-1) == 0
    assert torch.equal(zero_rows, picked == 0)
    assert "image" not in layer.stats  # no image positions -> k = 0, group skipped


# ----------------------------------------------------------------------------- padding


def test_padded_positions_are_never_picked() -> None:
    layer = tiny_layer(capacity=1.0)  # k = all positions: picks must spill onto padding
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 10, 16, generator=g)
    ids = torch.cat((torch.zeros(2, 4), torch.ones(2, 6)), 1).long()
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, 1:3] = False
    valid[1, 7:] = False
    for m, name in enumerate(("image", "text")):
        cand = (ids == m) & valid
        k = layer.capacities((4, 6), 10)[m]
        routing = layer.group(name).route(x, cand, k)
        picked_positions_valid = cand[:, None, :].expand(-1, 4, -1).gather(2, routing.index)
        assert torch.equal(routing.keep, picked_positions_valid)
        assert (routing.gate[~routing.keep] == 0).all()
    out = layer(x, ids, valid, (4, 6))
    assert (out[~valid] == 0).all()
    # changing padded inputs changes nothing else
    x2 = x.clone().requires_grad_()
    with torch.no_grad():
        x2[~valid] = float("nan")  # garbage in padded rows stays there
    out2 = layer(x2, ids, valid, (4, 6))
    torch.testing.assert_close(out2[valid], out[valid], atol=0, rtol=0)
    out2[valid].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert (x2.grad[~valid] == 0).all()
    util = layer.stats["text"]["utilisation"]
    assert torch.allclose(util, torch.ones(4))  # every real text token, once per expert


def test_all_padded_clip_is_finite_and_frame_count_checked() -> None:
    model = build(frames_per_clip=3)
    pixels, ids = batch(frames=3)
    frame_mask = torch.tensor([[False, False, False], [True, True, False]])
    logits, _ = model(pixels, ids, frame_mask=frame_mask)
    loss = causal_lm_loss(logits, ids) + sum(model.auxiliary_losses().values())
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="frames_per_clip=3"):
        model(torch.randn(2, 2, 3, 16, 16), ids)


# ------------------------------------------------------------------ non-causal routing


def test_expert_choice_routing_is_non_causal() -> None:
    """Documents behaviour (not a bug): a later token can change an earlier output,
    because it can displace an earlier token from an expert's top-k."""
    model = build().eval()
    pixels, ids = batch(b=1)
    base, _ = model(pixels, ids)
    changed_earlier = False
    for token in range(64):
        ids2 = ids.clone()
        ids2[0, -1] = token
        logits, _ = model(pixels, ids2)
        if not torch.allclose(logits[:, :-1], base[:, :-1], atol=1e-6):
            changed_earlier = True
            break
    assert changed_earlier


def test_kv_cache_is_rejected() -> None:
    model = build().eval()
    pixels, ids = batch()
    embeds, valid = model.encode_images(pixels)
    ctx = model.strategy.context(embeds, valid, ids)
    assert model.strategy.incremental_decoding is False
    with pytest.raises(ValueError, match="non-causal"):
        model.transformer(ids, ctx, KVCache())


# ---------------------------------------------------------------- utilisation / losses


def test_expert_utilisation_and_aux_losses() -> None:
    model = build(selection_loss_weight=0.5, z_loss_weight=0.01)
    trunk = trunk_of(model)
    assert model.auxiliary_losses() == {}  # before any forward
    pixels, ids = batch()
    model(pixels, ids)
    util = trunk.expert_utilisation()
    assert set(util) == {f"layers.{i}.{m}" for i in range(2) for m in ("image", "text")}
    for key, u in util.items():
        n = 16 if key.endswith("image") else 12
        k = math.ceil(n / 4)
        assert u.shape == (4,) and not u.requires_grad
        torch.testing.assert_close(u, torch.full((4,), k / n))  # each expert: k of n tokens
    for c in trunk.token_coverage().values():
        assert 0 < float(c) <= 1
    losses = model.auxiliary_losses()
    assert set(losses) == {"moma_z_loss", "moma_selection_loss"}
    for value in losses.values():
        assert value.ndim == 0 and torch.isfinite(value) and value > 0 and value.requires_grad
    sum(losses.values()).backward()
    router = dict(model.named_parameters())["transformer.trunk.layers.0.experts.image.router"]
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert build(aux_loss=False).auxiliary_losses() == {}


def test_gumbel_noise_only_in_training() -> None:
    model = build(gumbel_noise=True)
    pixels, ids = batch()
    torch.manual_seed(0)
    a, _ = model(pixels, ids)
    b, _ = model(pixels, ids)
    assert not torch.allclose(a, b)
    model.eval()
    c, _ = model(pixels, ids)
    d, _ = model(pixels, ids)
    assert torch.equal(c, d)


# ----------------------------------------------------------------------- compile / meta


@pytest.mark.slow
def test_expert_layer_compiles_fullgraph_forward_backward() -> None:
    layer = tiny_layer(capacity=0.4)
    compiled = torch.compile(layer, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    ids = torch.cat((torch.zeros(2, 4), torch.ones(2, 5)), 1).long()
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :2] = False
    params = list(layer.parameters())
    out = compiled(x, ids, valid, (4, 5))
    z = layer.aux["text"]["z_loss"]  # side effects of the compiled forward are kept
    util = layer.stats["image"]["utilisation"]
    grads = torch.autograd.grad(out.square().sum() + z, [x, *params])
    ref = layer(x, ids, valid, (4, 5))
    ref_grads = torch.autograd.grad(ref.square().sum() + layer.aux["text"]["z_loss"], [x, *params])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(util, layer.stats["image"]["utilisation"])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_meta_construction_then_to_empty_and_init_weights() -> None:
    model = build_vlm(moma_job(), init_device="meta")
    assert dict(model.named_parameters())["transformer.trunk.layers.0.experts.text.down"].is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors)
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    params = dict(model.named_parameters())
    std = model.transformer.config.init_std
    gate_up = params["transformer.trunk.layers.0.experts.image.gate_up"]
    down = params["transformer.trunk.layers.1.experts.text.down"]
    assert abs(gate_up.std().item() - std) < 0.2 * std
    assert down.std().item() < gate_up.std().item()  # output projection: scaled init
    pixels, ids = batch()
    logits, _ = model(pixels, ids)
    assert torch.isfinite(logits).all()
