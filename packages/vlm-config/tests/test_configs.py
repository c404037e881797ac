from __future__ import annotations

import pytest
from pydantic import ValidationError

from vlm_config import JobConfig, ModelConfig, ParallelConfig, TrainConfig

from .conftest import base_job


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
