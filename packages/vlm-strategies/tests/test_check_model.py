"""The built-in archs' ``check_model`` hooks: what the builder rejects, validation rejects
first, at the offending field's path (and ``vlm validate`` says so in one error)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from strategies_helpers import tiny_job

from vlm_strategies import build_vlm

ROOT = Path(__file__).resolve().parents[3]


def field_errors(arch: dict[str, Any], **model: Any) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        tiny_job(arch, **model)
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in info.value.errors()]


@pytest.mark.parametrize(
    ("arch", "model", "loc", "needle"),
    [
        (
            {"arch": "cross_attention", "cross_attention_every_n_layers": 3},
            {"n_layers": 2},
            "arch.cross_attention_every_n_layers",
            "arch.cross_attention_every_n_layers (3) exceeds model.n_layers (2): no "
            "cross-attention block would be inserted; allowed: 1..2",
        ),
        (
            {"arch": "cross_attention", "cross_attention_kv_heads": 3},
            {"n_heads": 4},
            "arch.cross_attention_kv_heads",
            "arch.cross_attention_kv_heads (3) must divide model.n_heads (4); allowed: "
            "[1, 2, 4] or unset",
        ),
    ],
)
def test_rejected_at_validation_with_the_field_path(
    arch: dict[str, Any], model: dict[str, Any], loc: str, needle: str
) -> None:
    errors = field_errors(arch, **model)
    assert len(errors) == 1
    assert errors[0][0] == loc and needle in errors[0][1]


@pytest.mark.parametrize(
    "arch",
    [
        {"arch": "cross_attention", "cross_attention_every_n_layers": 2},  # == n_layers
        {"arch": "cross_attention", "cross_attention_kv_heads": 4},  # == n_heads, not kv
    ],
)
def test_the_boundary_validates_and_builds(arch: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = build_vlm(tiny_job(arch))
    logits, _ = model(torch.randn(1, 3, 16, 16), torch.randint(0, 64, (1, 12)))
    assert torch.isfinite(logits).all()


def test_the_builder_keeps_its_own_check() -> None:
    """A config that skipped validation (``model_construct``) still fails at build."""
    job = tiny_job({"arch": "cross_attention"})
    bad = type(job.arch).model_construct(
        **{**job.arch.model_dump(), "cross_attention_every_n_layers": 5}
    )
    with pytest.raises(ValueError, match=r"cross_attention_every_n_layers \(5\)"):
        build_vlm(job.model_copy(update={"arch": bad}))


def test_vlm_validate_prints_one_error() -> None:
    config = ROOT / "examples" / "digits" / "cross_attention.toml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlm_config.cli",
            "validate",
            str(config),
            "arch.cross_attention_every_n_layers=3",
            # vlm-data may be absent here (vlm-strategies' own venv): no dataset
            "data={type = 'none'}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [
        f"error: {config} is not a valid job config:"
    ]
    assert lines[1:] == [
        "  arch.cross_attention_every_n_layers: Value error, "
        "arch.cross_attention_every_n_layers (3) exceeds model.n_layers (2): no "
        "cross-attention block would be inserted; allowed: 1..2"
    ]
