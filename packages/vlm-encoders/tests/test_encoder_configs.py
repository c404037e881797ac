"""Torch-free side: config validation, predictions, entry points, no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from pydantic import ValidationError

from vlm_config import EncoderConfig, load_implementation
from vlm_encoders.configs import (
    ClipEncoderConfig,
    HFVisionEncoderConfig,
    RandomEncoderConfig,
    Siglip2EncoderConfig,
    SiglipEncoderConfig,
    read_vision_config,
)

TOWER = {
    "hidden_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 96,
    "image_size": 64,
    "patch_size": 16,
}


def test_importing_configs_does_not_import_torch(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "siglip", "vision_config": {"image_size": 32, "patch_size": 8}})
    )
    code = textwrap.dedent(
        f"""
        import sys
        from importlib.metadata import entry_points
        import vlm_encoders.configs
        import vlm_encoders
        from vlm_encoders import SiglipEncoderConfig, RandomEncoderConfig
        for ep in entry_points(group="vlm.encoders"):
            if ep.value.startswith("vlm_encoders."):
                ep.load()
        assert SiglipEncoderConfig(path={str(tmp_path)!r}).predicted_num_tokens() == 16
        assert RandomEncoderConfig().predicted_num_tokens() == 64
        bad = sorted(m for m in ("torch", "transformers", "PIL") if m in sys.modules)
        print("IMPORTED", bad)
        sys.exit(1 if bad else 0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_entry_points_name_the_config_classes() -> None:
    eps = {
        ep.name: ep
        for ep in entry_points(group="vlm.encoders")
        if ep.value.startswith("vlm_encoders.")
    }
    expected = {
        "random": RandomEncoderConfig,
        "siglip": SiglipEncoderConfig,
        "siglip2": Siglip2EncoderConfig,
        "clip": ClipEncoderConfig,
    }
    assert set(eps) == set(expected)
    for name, cls in expected.items():
        loaded = eps[name].load()
        assert loaded is cls
        assert issubclass(loaded, EncoderConfig)
        assert loaded.plugin_name() == name


def test_implementations_resolve_to_builders() -> None:
    from vlm_encoders import build_hf_encoder, build_random_encoder

    assert load_implementation(RandomEncoderConfig) is build_random_encoder
    for cls in (SiglipEncoderConfig, Siglip2EncoderConfig, ClipEncoderConfig):
        assert load_implementation(cls) is build_hf_encoder


def test_random_config_predictions_and_validation() -> None:
    cfg = RandomEncoderConfig(num_tokens=9, feature_dim=5, image_size=12, seed=3)
    assert cfg.predicted_num_tokens() == 9
    assert cfg.predicted_feature_dim() == 5
    with pytest.raises(ValidationError, match="num_tokens"):
        RandomEncoderConfig(num_tokens=0)
    with pytest.raises(ValidationError, match=r"extra|unknown|not permitted"):
        RandomEncoderConfig(bogus=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("cls", [SiglipEncoderConfig, ClipEncoderConfig, Siglip2EncoderConfig])
def test_exactly_one_of_path_and_tower(cls: type[HFVisionEncoderConfig], tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one of 'path'"):
        cls()
    with pytest.raises(ValidationError, match="exactly one of 'path'"):
        cls(path=str(tmp_path), tower={"hidden_size": 8})
    with pytest.raises(ValidationError, match="from_config"):
        cls(tower={"hidden_size": 8}, from_config=True)
    with pytest.raises(ValidationError, match="dtype"):
        cls(path=str(tmp_path), dtype="int8")  # type: ignore[arg-type]


def test_tower_values_validated() -> None:
    with pytest.raises(ValidationError, match="patch_size"):
        SiglipEncoderConfig(tower={**TOWER, "patch_size": 0})
    with pytest.raises(ValidationError, match="vision_config"):
        SiglipEncoderConfig(tower={"vision_config": TOWER})
    with pytest.raises(ValidationError, match="feature_layer=-5"):
        SiglipEncoderConfig(tower=TOWER, feature_layer=-5)  # 3 layers: -4..3
    SiglipEncoderConfig(tower=TOWER, feature_layer=-4)
    SiglipEncoderConfig(tower=TOWER, feature_layer=3)
    with pytest.raises(ValidationError, match="feature_layer=4"):
        SiglipEncoderConfig(tower=TOWER, feature_layer=4)


def test_predictions_from_tower() -> None:
    assert SiglipEncoderConfig(tower=TOWER).predicted_num_tokens() == 16
    assert ClipEncoderConfig(tower=TOWER).predicted_num_tokens() == 16  # CLS not counted
    assert SiglipEncoderConfig(tower=TOWER).predicted_feature_dim() == 48
    # missing keys fall back to transformers' defaults
    assert SiglipEncoderConfig(tower={"hidden_size": 8}).predicted_num_tokens() == (224 // 16) ** 2
    assert ClipEncoderConfig(tower={"hidden_size": 8}).predicted_num_tokens() == (224 // 32) ** 2
    s2 = {"hidden_size": 32, "num_patches": 36, "patch_size": 4}
    assert Siglip2EncoderConfig(tower=s2).predicted_num_tokens() == 36
    assert Siglip2EncoderConfig(tower=s2).predicted_image_size() == 24
    assert Siglip2EncoderConfig(tower=s2, image_size=16).predicted_num_tokens() == 16
    with pytest.raises(ValidationError, match="multiple of patch_size"):
        Siglip2EncoderConfig(tower=s2, image_size=18)
    with pytest.raises(ValidationError, match="perfect square"):
        Siglip2EncoderConfig(tower={**s2, "num_patches": 20})


def test_predictions_from_folder(tmp_path: Path) -> None:
    dual = tmp_path / "dual"
    dual.mkdir()
    (dual / "config.json").write_text(
        json.dumps(
            {
                "model_type": "clip",
                "projection_dim": 512,
                "text_config": {"hidden_size": 7},
                "vision_config": {"hidden_size": 40, "image_size": 48, "patch_size": 12},
            }
        )
    )
    cfg = ClipEncoderConfig(path=str(dual))
    assert cfg.predicted_num_tokens() == 16
    assert cfg.predicted_feature_dim() == 40
    assert read_vision_config(dual) == {"hidden_size": 40, "image_size": 48, "patch_size": 12}

    only = tmp_path / "only"
    only.mkdir()
    (only / "config.json").write_text(
        json.dumps(
            {
                "model_type": "siglip_vision_model",
                "hidden_size": 24,
                "image_size": 30,
                "patch_size": 10,
            }
        )
    )
    assert SiglipEncoderConfig(path=str(only)).predicted_num_tokens() == 9
    assert SiglipEncoderConfig(path=str(only)).predicted_feature_dim() == 24

    missing = SiglipEncoderConfig(path=str(tmp_path / "nope"))
    assert missing.predicted_num_tokens() is None
    assert missing.predicted_feature_dim() is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert SiglipEncoderConfig(path=str(tmp_path / "broken")).predicted_num_tokens() is None


@pytest.mark.parametrize(
    ("cls", "hf_name"),
    [
        (SiglipEncoderConfig, "SiglipVisionConfig"),
        (ClipEncoderConfig, "CLIPVisionConfig"),
        (Siglip2EncoderConfig, "Siglip2VisionConfig"),
    ],
)
def test_tower_defaults_match_transformers(cls: type[HFVisionEncoderConfig], hf_name: str) -> None:
    transformers = pytest.importorskip("transformers")
    hf_default = getattr(transformers, hf_name)().to_dict()
    for key, value in cls.tower_defaults.items():
        assert hf_default[key] == value, key
