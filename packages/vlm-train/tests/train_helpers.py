"""Test helpers: tiny jobs (a 4-token SigLIP tower and a 1-layer decoder train in a few
seconds).  A uniquely named module, not ``conftest``: several packages' tests run in one
pytest."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from vlm_config import JobConfig, load_job_config

TINY: dict[str, Any] = {
    "name": "tiny",
    "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 32, "max_seq_len": 16},
    "encoder": {
        "type": "siglip",
        "tower": {
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "intermediate_size": 32,
            "image_size": 16,
            "patch_size": 8,
        },
    },
    "adapter": {"type": "mlp_2layer"},
    "arch": {"arch": "joint_decoder", "max_text_len": 4},
    "data": {"type": "digits", "max_eval_samples": 40, "eval_batch_size": 20},
    "train": {
        "steps": 6,
        "batch_size": 16,
        "lr": 1e-2,
        "warmup_steps": 1,
        "log_every": 1,
        "checkpoint_every": 3,
        "progress": False,
        "num_threads": 1,
    },
}


def tiny_dict(out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(TINY)
    data["train"]["output_dir"] = str(out)
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


def tiny_job(out: Path, *overrides: str, **sections: dict[str, Any]) -> JobConfig:
    return load_job_config(tiny_dict(out, **sections), list(overrides))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (checkpoints, final export, tokenizer) shared by CLI tests,
    trained for 30 steps: long enough that greedy decoding emits a digit word (after 6
    steps it may stop at once)."""
    from vlm_train import train

    out = tmp_path_factory.mktemp("run") / "tiny"
    result = train(tiny_job(out, "train.steps=30"), log=lambda _m: None)
    assert result.eval is not None
    return out
