"""Torch side: numerics of each adapter, meta-device init, gradients, shape errors."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlm_adapters import (
    AttentionalPoolAdapter,
    AttentionalPoolAdapterConfig,
    AvgPoolAdapter,
    AvgPoolAdapterConfig,
    LinearAdapterConfig,
    MLP2LayerAdapterConfig,
    PixelShuffleAdapter,
    PixelShuffleAdapterConfig,
    VisionAdapter,
    build_adapter,
    build_avgpool,
    pixel_shuffle,
    window_average,
)
from vlm_config import AdapterConfig

CONFIGS: list[AdapterConfig] = [
    MLP2LayerAdapterConfig(activation="silu"),
    LinearAdapterConfig(),
    AvgPoolAdapterConfig(window=3),  # ragged on the 4x4 grid used below
    AttentionalPoolAdapterConfig(window=2, num_heads=2),
    PixelShuffleAdapterConfig(factor=2, hidden_dim=12),
]
IDS = [c.type for c in CONFIGS]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- shape errors


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_shape_errors_name_expected_shape(config: AdapterConfig) -> None:
    adapter = build_adapter(config, 8, 16)
    expected = re.escape("(B, N, in_dim=8)")
    with pytest.raises(ValueError, match=expected):
        adapter(torch.randn(16, 8))
    with pytest.raises(ValueError, match=expected):
        adapter(torch.randn(2, 3, 16, 8))  # video not folded into the batch
    with pytest.raises(ValueError, match=expected + r".*last dim 7 != in_dim 8"):
        adapter(torch.randn(2, 16, 7))
    with pytest.raises(ValueError, match="floating-point"):
        adapter(torch.ones(2, 16, 8, dtype=torch.long))
    assert adapter(torch.randn(2, 16, 8)).shape[-1] == 16


@pytest.mark.parametrize(
    "config",
    [AvgPoolAdapterConfig(), AttentionalPoolAdapterConfig(), PixelShuffleAdapterConfig()],
    ids=lambda c: c.type,
)
def test_pooling_rejects_cls_token(config: AdapterConfig) -> None:
    adapter = build_adapter(config, 8, 8)
    x = torch.randn(1, 197, 8)
    with pytest.raises(ValueError, match=r"strip the CLS token"):
        adapter(x)
    with pytest.raises(ValueError, match=r"strip the CLS token"):
        adapter.output_num_tokens(197)
    assert adapter(x[:, 1:]).shape[1] == config.predicted_num_tokens(196)


def test_projection_adapters_accept_any_count() -> None:
    for config in CONFIGS[:2]:
        adapter = build_adapter(config, 8, 16)
        assert adapter(torch.randn(2, 197, 8)).shape == (2, 197, 16)
        assert adapter.output_num_tokens(197) == 197


def test_builder_errors() -> None:
    with pytest.raises(ValueError, match=r"num_heads=3 must divide .* in_dim=8"):
        build_adapter(AttentionalPoolAdapterConfig(num_heads=3), 8, 8)
    with pytest.raises(TypeError, match="AvgPoolAdapterConfig"):
        build_avgpool(LinearAdapterConfig(), 8, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_dim"):
        build_adapter(LinearAdapterConfig(), 0, 8)
    with pytest.raises(ValueError, match="window must be"):
        AvgPoolAdapter(4, 4)(torch.randn(1, 4, 4), window=0)


def _not_a_module(config: Any, in_dim: int, out_dim: int) -> object:
    return object()


class _BadConfig(AdapterConfig):
    implementation: ClassVar[str] = f"{__name__}:_not_a_module"
    type: Literal["bad"] = "bad"


def test_build_adapter_checks_builder_result() -> None:
    with pytest.raises(TypeError, match=r"must return an nn\.Module"):
        build_adapter(_BadConfig(), 4, 4)


# ---------------------------------------------------------------- avgpool


def _identity_avgpool(dim: int, window: int) -> AvgPoolAdapter:
    adapter = AvgPoolAdapter(dim, dim, window=window)
    with torch.no_grad():
        adapter.proj.weight.copy_(torch.eye(dim))
        adapter.proj.bias.zero_()
    return adapter


def test_avgpool_ragged_edges_average_real_patches_only() -> None:
    dim = 3
    x = torch.randn(2, 9, dim)  # 3x3 grid, patch p = row*3 + col
    out = _identity_avgpool(dim, 2)(x)
    assert out.shape == (2, 4, dim)
    p = x
    expected = torch.stack(
        [
            p[:, [0, 1, 3, 4]].mean(1),  # full window
            p[:, [2, 5]].mean(1),  # right edge: 2 real patches, not 4
            p[:, [6, 7]].mean(1),  # bottom edge
            p[:, 8],  # corner: the single real patch, not p8 / 4
        ],
        dim=1,
    )
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out[:, 3], p[:, 8] / 4)


@pytest.mark.parametrize(("grid", "window"), [(5, 2), (7, 3), (6, 4), (4, 4), (3, 5), (8, 1)])
def test_avgpool_matches_loop_reference(grid: int, window: int) -> None:
    x = torch.randn(3, grid * grid, 4, dtype=torch.float64)
    got = window_average(x, window)
    side = math.ceil(grid / window)
    img = x.reshape(3, grid, grid, 4)
    ref = torch.stack(
        [
            img[:, r * window : (r + 1) * window, c * window : (c + 1) * window].mean(dim=(1, 2))
            for r in range(side)
            for c in range(side)
        ],
        dim=1,
    )
    torch.testing.assert_close(got, ref)


def test_avgpool_pool_then_project_equals_project_then_pool() -> None:
    adapter = AvgPoolAdapter(6, 5, window=3).double()
    x = torch.randn(2, 49, 6, dtype=torch.float64)  # 7x7, ragged with window 3
    projected_first = window_average(adapter.proj(x), 3)
    torch.testing.assert_close(adapter(x), projected_first)


def test_avgpool_window_override_same_weights() -> None:
    adapter = _identity_avgpool(4, 2)
    x = torch.randn(2, 36, 4)
    assert adapter(x).shape == (2, 9, 4)
    coarse = adapter(x, window=3)
    assert coarse.shape == (2, 4, 4) == (2, adapter.output_num_tokens(36, window=3), 4)
    torch.testing.assert_close(coarse, window_average(x, 3))
    torch.testing.assert_close(adapter(x, window=6), x.mean(1, keepdim=True))


def test_avgpool_bf16_ragged() -> None:
    adapter = AvgPoolAdapter(4, 4, window=2).to(torch.bfloat16)
    out = adapter(torch.randn(1, 25, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert out.shape == (1, 9, 4)


# ---------------------------------------------------------------- attentional_pool


def test_attentional_pool_query_is_window_mean() -> None:
    dim, heads, window, grid = 8, 2, 2, 4
    adapter = AttentionalPoolAdapter(dim, 6, window=window, num_heads=heads).double()
    x = torch.randn(2, grid * grid, dim, dtype=torch.float64)
    out = adapter(x)
    assert out.shape == (2, 4, 6)

    # output token 2 = window (row 1, col 0): patch rows 2-3, cols 0-1
    idx = [8, 9, 12, 13]
    patches = x[:, idx]  # (B, 4, C)
    query = patches.mean(1, keepdim=True)

    # explicit math, head by head
    d = dim // heads
    q = adapter.q_proj(query)
    k = adapter.k_proj(patches)
    v = adapter.v_proj(patches)
    head_outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        head_outs.append(torch.softmax(scores, -1) @ v[..., sl])
    explicit = adapter.out_proj(torch.cat(head_outs, -1))[:, 0]
    torch.testing.assert_close(out[:, 2], explicit)

    # independent reference: torch's nn.MultiheadAttention with the same weights
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(
            torch.cat([adapter.q_proj.weight, adapter.k_proj.weight, adapter.v_proj.weight])
        )
        mha.in_proj_bias.copy_(
            torch.cat([adapter.q_proj.bias, torch.zeros(dim), adapter.v_proj.bias])
        )
        mha.out_proj.weight.copy_(torch.eye(dim))
        mha.out_proj.bias.zero_()
    attended, _ = mha(query, patches, patches)
    torch.testing.assert_close(out[:, 2], adapter.out_proj(attended)[:, 0])

    # and the query really is the mean: a different query changes the answer
    wrong, _ = mha(patches[:, :1], patches, patches)
    assert not torch.allclose(out[:, 2], adapter.out_proj(wrong)[:, 0])


def test_attentional_pool_all_windows_vectorised_match_loop() -> None:
    dim, window, grid = 4, 3, 6
    adapter = AttentionalPoolAdapter(dim, dim, window=window, num_heads=1).double()
    x = torch.randn(2, grid * grid, dim, dtype=torch.float64)
    img = x.reshape(2, grid, grid, dim)
    outs = []
    for r in range(grid // window):
        for c in range(grid // window):
            p = img[:, r * window : (r + 1) * window, c * window : (c + 1) * window]
            p = p.reshape(2, -1, dim)
            q = adapter.q_proj(p.mean(1, keepdim=True))
            att = F.scaled_dot_product_attention(q, adapter.k_proj(p), adapter.v_proj(p))
            outs.append(adapter.out_proj(att)[:, 0])
    torch.testing.assert_close(adapter(x), torch.stack(outs, 1))


def test_attentional_pool_window_override() -> None:
    adapter = AttentionalPoolAdapter(4, 4, window=2)
    x = torch.randn(1, 36, 4)
    assert adapter(x).shape == (1, 9, 4)
    assert adapter(x, window=3).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="window=4 to divide"):
        adapter(x, window=4)


# ---------------------------------------------------------------- pixel_shuffle


def _idefics3_pixel_shuffle(x: torch.Tensor, scale_factor: int = 2) -> torch.Tensor:
    """Idefics3Connector.pixel_shuffle from transformers, copied as the reference."""
    bsz, seq, embed_dim = x.size()
    height = width = int(seq**0.5)
    x = x.view(bsz, height, width, embed_dim)
    x = x.view(bsz, height, int(width / scale_factor), embed_dim * scale_factor)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(
        bsz, int(width / scale_factor), int(height / scale_factor), embed_dim * (scale_factor**2)
    )
    x = x.permute(0, 2, 1, 3)
    return x.reshape(bsz, int(seq / (scale_factor**2)), embed_dim * (scale_factor**2))


def test_pixel_shuffle_ordering_tiny_grid() -> None:
    # 4x4 grid, C=2: patch p carries channels (10p, 10p + 1)
    p = torch.arange(16, dtype=torch.float32)
    x = torch.stack([10 * p, 10 * p + 1], -1)[None]  # (1, 16, 2)
    out = pixel_shuffle(x, 2)
    assert out.shape == (1, 4, 8)
    blocks = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    expected = torch.tensor(
        [[v for q in block for v in (10 * q, 10 * q + 1)] for block in blocks],
        dtype=torch.float32,
    )[None]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, _idefics3_pixel_shuffle(x, 2))


@pytest.mark.parametrize(("grid", "factor"), [(6, 2), (6, 3), (8, 4), (3, 1)])
def test_pixel_shuffle_matches_idefics3(grid: int, factor: int) -> None:
    x = torch.randn(2, grid * grid, 5)
    torch.testing.assert_close(pixel_shuffle(x, factor), _idefics3_pixel_shuffle(x, factor))


def test_pixel_shuffle_adapter_is_shuffle_then_mlp() -> None:
    adapter = PixelShuffleAdapter(3, 7, factor=2, hidden_dim=5, activation="relu")
    assert adapter.fc1.in_features == 12
    x = torch.randn(2, 16, 3)
    ref = adapter.fc2(torch.relu(adapter.fc1(_idefics3_pixel_shuffle(x, 2))))
    torch.testing.assert_close(adapter(x), ref)


# ---------------------------------------------------------------- generic contract


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_meta_device_materialisation(config: AdapterConfig) -> None:
    with torch.device("meta"):
        adapter = build_adapter(config, 8, 16)
    assert all(t.is_meta for t in adapter.parameters())
    adapter.to_empty(device="cpu")
    with torch.no_grad():
        for t in adapter.parameters():
            t.fill_(float("nan"))  # to_empty memory may look finite by chance
    adapter.reset_parameters()
    tensors = list(adapter.parameters()) + list(adapter.buffers())
    assert tensors
    assert not any(t.is_meta for t in tensors)
    for name, t in adapter.named_parameters():
        assert torch.isfinite(t).all(), name
        assert t.device.type == "cpu"
    out = adapter(torch.randn(2, 16, 8))
    assert torch.isfinite(out).all()
    assert out.shape == (2, config.predicted_num_tokens(16), 16)
    # every parameter lives in a Linear re-drawn with its default init (|w|, |b| <= 1/sqrt(fan_in))
    for name, module in adapter.named_modules():
        if isinstance(module, nn.Linear):
            bound = 1 / math.sqrt(module.in_features) + 1e-6
            assert module.weight.abs().max() <= bound, name
            assert module.weight.std() > bound / 4, name  # not collapsed to a constant
            if module.bias is not None:
                assert module.bias.abs().max() <= bound, name
    linear_params = sum(
        p.numel() for m in adapter.modules() if isinstance(m, nn.Linear) for p in m.parameters()
    )
    assert linear_params == sum(p.numel() for p in adapter.parameters())


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gradient_reaches_every_parameter(config: AdapterConfig) -> None:
    adapter = build_adapter(config, 8, 16)
    x = torch.randn(3, 16, 8, requires_grad=True)
    adapter(x).square().mean().backward()
    for name, param in adapter.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    assert x.grad is not None
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_video_frames_folded_into_batch(config: AdapterConfig) -> None:
    adapter = build_adapter(config, 8, 16)
    batch, frames = 2, 3
    clip = torch.randn(batch, frames, 16, 8)
    folded = adapter(clip.reshape(batch * frames, 16, 8))
    per_frame = torch.cat([adapter(clip[b, f][None]) for b in range(batch) for f in range(frames)])
    torch.testing.assert_close(folded, per_frame)
    m = adapter.output_num_tokens(16)
    video_tokens = folded.reshape(batch, frames * m, 16)  # frame order kept
    torch.testing.assert_close(video_tokens[1, m : 2 * m], per_frame[frames + 1])


def test_adapters_are_vision_adapters() -> None:
    for config in CONFIGS:
        adapter = build_adapter(config, 8, 16)
        assert isinstance(adapter, VisionAdapter)
        assert (adapter.in_dim, adapter.out_dim) == (8, 16)
        assert "in_dim=8, out_dim=16" in repr(adapter)


def test_readme_example_runs() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    exec(compile(code.group(1), "README.md", "exec"), {})
