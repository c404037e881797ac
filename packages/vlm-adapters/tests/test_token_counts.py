"""Property: config prediction == module.output_num_tokens == real forward length."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_adapters import (
    AttentionalPoolAdapterConfig,
    AvgPoolAdapterConfig,
    LinearAdapterConfig,
    MLP2LayerAdapterConfig,
    PixelShuffleAdapterConfig,
    build_adapter,
)
from vlm_config import AdapterConfig

IN_DIM, OUT_DIM = 4, 6


def _config(kind: str, window: int, factor: int, heads: int) -> AdapterConfig:
    if kind == "mlp_2layer":
        return MLP2LayerAdapterConfig(hidden_dim=5)
    if kind == "linear":
        return LinearAdapterConfig()
    if kind == "avgpool":
        return AvgPoolAdapterConfig(window=window)
    if kind == "attentional_pool":
        return AttentionalPoolAdapterConfig(window=window, num_heads=heads)
    return PixelShuffleAdapterConfig(factor=factor)


def _check(config: AdapterConfig, n: int, batch: int, override: int | None = None) -> str:
    """Returns "ok" or "rejected"; fails if config, module and forward disagree."""
    adapter = build_adapter(config, IN_DIM, OUT_DIM)
    kw = {} if override is None else {"window": override}
    x = torch.randn(batch, n, IN_DIM)
    try:
        predicted = config.predicted_num_tokens(n, **kw)  # type: ignore[call-arg]
    except ValueError:
        with pytest.raises(ValueError):
            adapter.output_num_tokens(n, **kw)
        with pytest.raises(ValueError):
            adapter(x, **kw)
        return "rejected"
    assert adapter.output_num_tokens(n, **kw) == predicted
    out = adapter(x, **kw)
    assert out.shape == (batch, predicted, OUT_DIM)
    assert torch.isfinite(out).all()
    return "ok"


@settings(max_examples=250, deadline=None)
@given(
    kind=st.sampled_from(["mlp_2layer", "linear", "avgpool", "attentional_pool", "pixel_shuffle"]),
    grid=st.integers(1, 12),
    extra=st.sampled_from([0, 0, 0, 1, 3]),  # 1: a CLS token left in; 3: arbitrary non-square
    window=st.integers(1, 5),
    factor=st.integers(1, 4),
    heads=st.sampled_from([1, 2, 4]),
    batch=st.integers(1, 3),
)
def test_predicted_equals_module_equals_forward(
    kind: str, grid: int, extra: int, window: int, factor: int, heads: int, batch: int
) -> None:
    n = grid * grid + extra
    config = _config(kind, window, factor, heads)
    result = _check(config, n, batch)
    # the rejections are exactly the documented ones
    side = math.isqrt(n)
    square = side * side == n  # e.g. 1 + 3 = 4 is a 2x2 grid
    grid = side
    if kind in ("mlp_2layer", "linear"):
        assert result == "ok"
    elif not square:
        assert result == "rejected"
    elif kind == "avgpool":
        assert result == "ok"
    elif kind == "attentional_pool":
        assert result == ("ok" if grid % window == 0 else "rejected")
    else:
        assert result == ("ok" if grid % factor == 0 else "rejected")


@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(["avgpool", "attentional_pool"]),
    grid=st.integers(1, 12),
    window=st.integers(1, 5),
    override=st.integers(1, 5),
)
def test_per_call_window_override(kind: str, grid: int, window: int, override: int) -> None:
    config = _config(kind, window, 1, 2)
    result = _check(config, grid * grid, 2, override=override)
    if kind == "avgpool":
        assert result == "ok"
    else:
        assert result == ("ok" if grid % override == 0 else "rejected")


def test_zero_tokens_rejected_everywhere() -> None:
    for kind in ["mlp_2layer", "linear", "avgpool", "attentional_pool", "pixel_shuffle"]:
        config = _config(kind, 2, 2, 1)
        adapter = build_adapter(config, IN_DIM, OUT_DIM)
        with pytest.raises(ValueError):
            config.predicted_num_tokens(0)
        with pytest.raises(ValueError):
            adapter.output_num_tokens(0)
        with pytest.raises(ValueError, match="at least one input token"):
            adapter(torch.randn(2, 0, IN_DIM))
