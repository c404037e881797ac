"""Small job configs shared by the strategies tests."""

from __future__ import annotations

from typing import Any

from vlm_config import JobConfig

# every arch this distribution ships (test_arch_conformance checks the list is complete)
BUILTIN_ARCHS: list[dict[str, Any]] = [
    {"arch": "joint_decoder"},
    {"arch": "cross_attention"},
    {"arch": "mot"},
    {"arch": "moma", "experts_per_modality": 2},
]
RANDOM_ENCODER = {"type": "random", "num_tokens": 16, "feature_dim": 32, "image_size": 16}
SIGLIP_ENCODER = {
    "type": "siglip",
    "tower": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 16,
        "patch_size": 4,
    },
}


def tiny_job(
    arch: dict[str, Any], encoder: dict[str, Any] | None = None, **model: Any
) -> JobConfig:
    return JobConfig.model_validate(
        {
            "model": {
                "dim": 32,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "vocab_size": 64,
                "max_seq_len": 128,
                **model,
            },
            "encoder": encoder or RANDOM_ENCODER,
            "adapter": {"type": "mlp_2layer"},
            "arch": {"max_text_len": 12, **arch},
        }
    )
