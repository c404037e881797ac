"""Shared test helpers: single-threaded torch, tiny configs and models (a uniquely named
module, not ``conftest``: several packages' tests run in one pytest)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vlm_config import ModelConfig
from vlm_transformer import Transformer

torch.set_num_threads(1)


def tiny_config(**kw: Any) -> ModelConfig:
    base: dict[str, Any] = {
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 64,
        "max_seq_len": 64,
    }
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw: Any) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**kw))
    model.init_weights()
    # non-trivial norm weights so norm mistakes show up
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def model() -> Transformer:
    return tiny_model()
