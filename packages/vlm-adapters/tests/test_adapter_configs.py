"""Torch-free side: configs, entry points, predicted token counts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
from pydantic import ValidationError

from vlm_adapters import (
    AttentionalPoolAdapterConfig,
    AvgPoolAdapterConfig,
    LinearAdapterConfig,
    MLP2LayerAdapterConfig,
    PixelShuffleAdapterConfig,
    square_grid_side,
)
from vlm_config import AdapterConfig, load_implementation

EXPECTED = {
    "mlp_2layer": MLP2LayerAdapterConfig,
    "linear": LinearAdapterConfig,
    "avgpool": AvgPoolAdapterConfig,
    "attentional_pool": AttentionalPoolAdapterConfig,
    "pixel_shuffle": PixelShuffleAdapterConfig,
}


def test_configs_and_entry_points_import_no_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        from importlib.metadata import entry_points
        import vlm_adapters.configs
        assert "torch" not in sys.modules, "importing vlm_adapters.configs imported torch"
        import vlm_adapters
        names = {}
        for ep in entry_points(group="vlm.adapters"):
            if ep.dist is not None and ep.dist.name == "vlm-adapters":
                cls = ep.load()
                cfg = cls()
                names[ep.name] = cfg.predicted_num_tokens(16)
        assert len(names) == 5, names
        vlm_adapters.AvgPoolAdapterConfig.model_json_schema()
        assert "torch" not in sys.modules, "loading the entry points imported torch"
        print("OK", sorted(names))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK")


def test_lazy_torch_names_resolve() -> None:
    import vlm_adapters

    assert vlm_adapters.AvgPoolAdapter.__name__ == "AvgPoolAdapter"
    for name in vlm_adapters.__all__:
        assert getattr(vlm_adapters, name) is not None
    assert set(vlm_adapters.__all__) <= set(dir(vlm_adapters))
    with pytest.raises(AttributeError):
        vlm_adapters.NoSuchThing


def test_entry_points_match_discriminators() -> None:
    eps = {
        ep.name: ep
        for ep in entry_points(group="vlm.adapters")
        if ep.dist is not None and ep.dist.name == "vlm-adapters"
    }
    assert set(eps) == set(EXPECTED)
    for name, ep in eps.items():
        cls = ep.load()
        assert cls is EXPECTED[name]
        assert issubclass(cls, AdapterConfig)
        assert cls.plugin_name() == name == cls().type
        assert callable(load_implementation(cls))


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (AvgPoolAdapterConfig, {"window": 0}),
        (AttentionalPoolAdapterConfig, {"num_heads": 0}),
        (AttentionalPoolAdapterConfig, {"window": -1}),
        (PixelShuffleAdapterConfig, {"factor": 0}),
        (MLP2LayerAdapterConfig, {"activation": "tanh"}),
        (MLP2LayerAdapterConfig, {"hidden_dim": 0}),
        (LinearAdapterConfig, {"window": 2}),  # unknown key
        (AvgPoolAdapterConfig, {"type": "linear"}),
    ],
)
def test_bad_config_fields_are_validation_errors(cls: type, kwargs: dict) -> None:
    with pytest.raises(ValidationError) as info:
        cls(**kwargs)
    assert next(iter(kwargs)) in str(info.value)


def test_predicted_counts_examples() -> None:
    assert MLP2LayerAdapterConfig().predicted_num_tokens(197) == 197
    assert LinearAdapterConfig().predicted_num_tokens(5) == 5
    assert AvgPoolAdapterConfig(window=2).predicted_num_tokens(196) == 49
    assert AvgPoolAdapterConfig(window=3).predicted_num_tokens(196) == 25  # ceil(14/3) = 5
    assert AvgPoolAdapterConfig(window=2).predicted_num_tokens(196, window=7) == 4
    assert AvgPoolAdapterConfig(window=20).predicted_num_tokens(196) == 1
    assert AttentionalPoolAdapterConfig(window=7).predicted_num_tokens(196) == 4
    assert PixelShuffleAdapterConfig(factor=2).predicted_num_tokens(1024) == 256
    assert PixelShuffleAdapterConfig(factor=1).predicted_num_tokens(9) == 9


def test_indivisible_grid_rejected_at_predict_time() -> None:
    with pytest.raises(ValueError, match=r"window=3 to divide the patch grid side g=14"):
        AttentionalPoolAdapterConfig(window=3).predicted_num_tokens(196)
    with pytest.raises(ValueError, match=r"factor=4 to divide"):
        PixelShuffleAdapterConfig(factor=4).predicted_num_tokens(36)


@pytest.mark.parametrize(
    "config",
    [AvgPoolAdapterConfig(), AttentionalPoolAdapterConfig(), PixelShuffleAdapterConfig()],
    ids=lambda c: c.type,
)
def test_cls_token_rejected_with_fix(config: AdapterConfig) -> None:
    with pytest.raises(ValueError, match=r"CLS token.*strip") as info:
        config.predicted_num_tokens(197)
    assert "14x14" in str(info.value)
    with pytest.raises(ValueError, match=r"square patch grid"):
        config.predicted_num_tokens(200)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "9"])
def test_bad_token_counts(bad: object) -> None:
    for cls in EXPECTED.values():
        with pytest.raises(ValueError):
            cls().predicted_num_tokens(bad)  # type: ignore[arg-type]


def test_square_grid_side() -> None:
    assert square_grid_side(1) == 1
    assert square_grid_side(729) == 27
    with pytest.raises(ValueError, match="N=730"):
        square_grid_side(730)
