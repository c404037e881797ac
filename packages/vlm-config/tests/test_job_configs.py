from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from config_helpers import base_job
from pydantic import Field, ValidationError

from vlm_config import (
    AdapterConfig,
    ArchConfig,
    ComponentConfig,
    ConfigFieldError,
    JobConfig,
    ModelConfig,
    ParallelConfig,
    PluginRegistry,
    TrainConfig,
)


def errors(exc: ValidationError) -> list[tuple[str, str]]:
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in exc.errors()]


def test_model_defaults_and_hidden_dim() -> None:
    cfg = ModelConfig(dim=256, n_heads=8, n_kv_heads=2)
    assert cfg.kv_heads == 2 and cfg.head_dim == 32
    assert cfg.hidden_dim % cfg.multiple_of == 0 and cfg.hidden_dim >= 8 * 256 // 3
    assert ModelConfig(ffn_hidden_dim=100).hidden_dim == 100


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"dim": 100, "n_heads": 8}, "n_heads (8) must divide dim (100)"),
        ({"dim": 64, "n_heads": 8, "n_kv_heads": 3}, "n_kv_heads (3) must divide n_heads (8)"),
        ({"dim": 24, "n_heads": 8}, "must be even"),
    ],
)
def test_model_cross_field_errors(kwargs: dict[str, int], needle: str) -> None:
    with pytest.raises(ValidationError, match=None) as info:
        ModelConfig(**kwargs)
    assert needle in str(info.value)


def test_parallel_and_train_checks() -> None:
    with pytest.raises(ValidationError, match="dp_shard"):
        ParallelConfig(dp_shard=0)
    with pytest.raises(ValidationError, match="warmup_steps"):
        TrainConfig(steps=5, warmup_steps=10)
    with pytest.raises(ValidationError, match="grad_accum_steps"):
        TrainConfig(batch_size=10, grad_accum_steps=3)


def test_job_validates_plugin_specific_fields(registered: object) -> None:
    job = JobConfig.model_validate(base_job())
    assert type(job.adapter).__name__ == "StrideAdapterConfig"
    assert job.adapter.stride == 2  # type: ignore[attr-defined]
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(base_job(adapter={"type": "test_stride", "stride": 0}))
    assert any(loc.startswith("adapter.test_stride.stride") for loc, _ in errors(info.value))


def test_unknown_plugin_name_lists_installed(registered: object) -> None:
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(base_job(adapter={"type": "nope"}))
    text = str(info.value)
    assert "'nope'" in text and "test_stride" in text


def test_unknown_key_names_path(registered: object) -> None:
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(base_job(model={"dim": 64, "n_heads": 4, "bogus": 1}))
    assert ("model.bogus", "Extra inputs are not permitted") in errors(info.value)


def test_sequence_budget(registered: object) -> None:
    job = JobConfig.model_validate(base_job())
    budget = job.sequence_budget()
    assert (budget.encoder_tokens, budget.adapter_tokens, budget.image_positions) == (16, 8, 8)
    assert budget.total == 24
    with pytest.raises(ValidationError, match="sequence budget exceeded.*model.max_seq_len"):
        JobConfig.model_validate(base_job(arch={"arch": "test_prefix", "max_text_len": 57}))
    # 8 image positions + 56 text = 64 fits exactly
    JobConfig.model_validate(base_job(arch={"arch": "test_prefix", "max_text_len": 56}))
    # video frames multiply the visual tokens
    with pytest.raises(ValidationError, match="32 image positions"):
        JobConfig.model_validate(
            base_job(arch={"arch": "test_prefix", "max_text_len": 40, "frames_per_clip": 4})
        )
    # a cross-attention style arch puts no image positions in the stream
    side = JobConfig.model_validate(base_job(arch={"arch": "test_side", "max_text_len": 64}))
    assert side.sequence_budget().image_positions == 0


def test_adapter_rejection_surfaces_as_validation_error(registered: object) -> None:
    with pytest.raises(ValidationError, match="stride 3 must divide 16"):
        JobConfig.model_validate(base_job(adapter={"type": "test_stride", "stride": 3}))


def test_freeze_schedule_strictly_increasing(registered: object) -> None:
    stages = [{"step": 5, "freeze": []}, {"step": 5, "freeze": []}]
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(base_job(arch={"arch": "test_prefix", "freeze_schedule": stages}))
    assert any(
        loc == "arch.test_prefix.freeze_schedule" and "strictly increasing" in msg
        for loc, msg in errors(info.value)
    )


def test_freeze_aliases(registered: object) -> None:
    job = JobConfig.model_validate(
        base_job(arch={"arch": "test_prefix", "max_text_len": 8, "freeze": [{"module": "special"}]})
    )
    assert job.arch.resolve_freeze_patterns("special") == ("transformer.x.*",)
    assert job.arch.resolve_freeze_patterns("vision_encoder") == ("vision_encoder.*",)
    assert job.arch.resolve_freeze_patterns("adapter.proj.*") == ("adapter.proj.*",)
    with pytest.raises(ValidationError, match="neither an alias"):
        JobConfig.model_validate(
            base_job(arch={"arch": "test_prefix", "max_text_len": 8, "freeze": [{"module": "x"}]})
        )


def test_default_tags_fill_in(registered: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlm_config import job as job_module

    monkeypatch.setitem(job_module.PLUGIN_SECTIONS, "arch", ("vlm.archs", "test_side"))
    data = base_job()
    data["arch"] = {"max_text_len": 8}  # no tag: the section's default plugin name is used
    assert JobConfig.model_validate(data).arch.arch == "test_side"
    monkeypatch.setitem(job_module.PLUGIN_SECTIONS, "arch", ("vlm.archs", "not_installed"))
    with pytest.raises(ValidationError, match="no vlm.archs plugin named 'not_installed'"):
        JobConfig.model_validate(data)


def test_json_schema_includes_plugins(registered: object) -> None:
    schema = JobConfig.model_json_schema()
    text = str(schema)
    assert "StrideAdapterConfig" in text and "stride" in text and "test_side" in text


# --------------------------------------------------------------- check_model hook
class ModelCheckedArchConfig(ArchConfig):
    """A side-input arch whose builder would need ``every <= model.n_layers``."""

    arch: Literal["test_checked"] = "test_checked"
    every: int = Field(default=1, ge=1)
    needs_gelu: bool = False

    def residual_image_positions(self, num_visual_tokens: int) -> int:
        return 0

    def check_model(self, model: ModelConfig) -> None:
        if self.every > model.n_layers:
            raise ConfigFieldError(
                "every", f"{self.every} exceeds model.n_layers ({model.n_layers}); allowed: 1.."
            )
        if self.needs_gelu and model.mlp != "gelu":
            raise ValueError(f"this arch needs model.mlp = 'gelu', got {model.mlp!r}")


class ModelCheckedAdapterConfig(AdapterConfig):
    """An adapter whose builder would need ``heads`` to divide ``model.dim``."""

    type: Literal["test_heads"] = "test_heads"
    heads: int = Field(default=1, ge=1)

    def check_model(self, model: ModelConfig) -> None:
        if model.dim % self.heads:
            raise ConfigFieldError("heads", f"{self.heads} does not divide model.dim {model.dim}")


CHECKED: list[tuple[str, type[ComponentConfig]]] = [
    ("vlm.archs", ModelCheckedArchConfig),
    ("vlm.adapters", ModelCheckedAdapterConfig),
]


@pytest.fixture
def checked(registered: PluginRegistry) -> Iterator[PluginRegistry]:
    for group, cls in CHECKED:
        registered.register(group, cls, replace=True)
    yield registered
    for group, cls in CHECKED:
        registered.unregister(group, cls.plugin_name())


def checked_job(every: int = 1, heads: int = 1, **arch: object) -> dict[str, object]:
    return base_job(
        arch={"arch": "test_checked", "every": every, **arch},
        adapter={"type": "test_heads", "heads": heads},
    )


def test_base_check_model_accepts_any_model(registered: object) -> None:
    job = JobConfig.model_validate(base_job(model={"dim": 8, "n_layers": 1, "n_heads": 2}))
    job.arch.check_model(job.model)  # the base hook: no constraint, no error


def test_check_model_error_is_located_at_the_field(checked: object) -> None:
    assert JobConfig.model_validate(checked_job(every=2)).arch.every == 2  # type: ignore[attr-defined]
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(checked_job(every=3))
    assert errors(info.value) == [
        ("arch.every", "Value error, 3 exceeds model.n_layers (2); allowed: 1..")
    ]
    assert info.value.errors()[0]["input"] == 3


def test_check_model_reports_every_section(checked: object) -> None:
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(checked_job(every=5, heads=3))
    assert [loc for loc, _ in errors(info.value)] == ["adapter.heads", "arch.every"]
    assert "3 does not divide model.dim 64" in errors(info.value)[0][1]


def test_check_model_plain_value_error_is_located_at_the_section(checked: object) -> None:
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(checked_job(needs_gelu=True))
    assert errors(info.value) == [
        ("arch", "Value error, this arch needs model.mlp = 'gelu', got 'swiglu'")
    ]
    data = checked_job(needs_gelu=True)
    data["model"] = {**data["model"], "mlp": "gelu"}  # type: ignore[dict-item]
    JobConfig.model_validate(data)


def test_check_model_runs_only_on_valid_sections(checked: object) -> None:
    # an invalid model section reports its own error, not a hook failure on top of it
    data = checked_job(every=3)
    data["model"] = {"dim": 64, "n_layers": 0, "n_heads": 4}
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(data)
    assert [loc for loc, _ in errors(info.value)] == ["model.n_layers"]


def test_check_model_also_runs_on_assignment(checked: object) -> None:
    job = JobConfig.model_validate(checked_job(every=2))
    with pytest.raises(ValidationError, match="arch.every"):
        job.model = ModelConfig(dim=64, n_layers=1, n_heads=4, max_seq_len=64)


def test_validate_cli_prints_one_error_at_the_field(
    tmp_path: Path, checked: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlm_config.cli import main

    path = tmp_path / "job.toml"
    path.write_text(
        "[model]\ndim = 64\nn_layers = 2\nn_heads = 4\nmax_seq_len = 64\n"
        '[encoder]\ntype = "test_grid"\n[adapter]\ntype = "test_heads"\n'
        '[arch]\narch = "test_checked"\nevery = 2\n'
    )
    assert main(["validate", str(path)]) == 0
    capsys.readouterr()
    assert main(["validate", str(path), "model.n_layers=1"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""
    assert [line for line in lines if line.startswith("error:")] == [
        f"error: {path} is not a valid job config:"
    ]
    assert lines[1:] == ["  arch.every: Value error, 2 exceeds model.n_layers (1); allowed: 1.."]
