"""The Trainer: every arch through setup / step / checkpoint / evaluate / finish, and
resuming a run folder only with a config that fits it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from train_helpers import tiny_job

from vlm_train import (
    SAFE_RESUME_FIELDS,
    ConfigError,
    Trainer,
    TrainResult,
    resume_differences,
    train,
)

ARCHS: dict[str, dict[str, Any]] = {
    "joint_decoder": {"arch": "joint_decoder"},
    "cross_attention": {"arch": "cross_attention", "cross_attention_every_n_layers": 1},
    "mot": {"arch": "mot"},
    "moma": {"arch": "moma", "experts_per_modality": 2, "capacity": 1.0},
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_trains_through_the_trainer(tmp_path: Path, arch: str) -> None:
    out = tmp_path / arch
    job = tiny_job(
        out,
        "train.steps=4",
        "data.max_eval_samples=8",
        "data.eval_batch_size=8",
        arch={"max_text_len": 4, **ARCHS[arch]},
    )
    with Trainer(job, log=lambda _m: None) as trainer:
        assert trainer.global_step == 0 and trainer.resumed_from is None
        losses = [trainer.step() for _ in range(3)]
        assert trainer.global_step == 3
        assert all(math.isfinite(v) and v > 0 for v in losses)
        with pytest.raises(ValueError, match="needs 1 micro-batches, got 2"):
            trainer.step([*trainer.next_batches(), *trainer.next_batches()])
        assert trainer.step(trainer.next_batches()) == trainer.last_loss
        saved = trainer.checkpoint()
        assert saved.name == "step_000004" and (saved / "COMPLETE").is_file()
        interim = trainer.evaluate()
        assert interim is not None and interim.total == 8
        result = trainer.finish()
    assert isinstance(result, TrainResult) and result.step == 4 and result.interrupted is None
    assert result.eval is not None and result.eval.total == 8
    assert (out / "final" / "model.safetensors").is_file() and (out / "loss.png").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


def _run_files(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and "checkpoints" not in p.parts
    }


def test_resume_refuses_a_config_that_changes_the_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    part = train(tiny_job(out), log=lambda _m: None, stop_after_steps=2)
    assert part.interrupted == 0 and part.step == 2
    before = _run_files(out)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ConfigError) as info:
        train(tiny_job(out, "model.dim=64", "train.lr=0.5"), log=lambda _m: None)
    message = str(info.value)
    assert message.startswith(f"cannot resume {out}: this config differs from the run's job.toml")
    assert "model.dim: 32 (run) vs 64 (this config)" in message
    assert "train.lr: 0.01 (run) vs 0.5 (this config)" in message
    assert "2 field(s)" in message
    assert "new train.output_dir or train.resume=false" in message
    # nothing in the run folder was touched
    assert _run_files(out) == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints
    # the way out the message names works: train.resume=false starts afresh, and the
    # earlier run's files move aside whole (nothing deleted, no mixed checkpoints)
    said: list[str] = []
    fresh = train(
        tiny_job(out, "model.dim=64", "train.resume=false", "train.steps=1"), log=said.append
    )
    assert fresh.resumed_from is None and fresh.step == 1
    assert "dim = 64" in (out / "job.toml").read_text()
    (aside,) = (out / "earlier_runs").iterdir()
    assert any("moved the earlier run's checkpoints, " in m and str(aside) in m for m in said)
    assert _run_files(aside) == {k: v for k, v in before.items()}
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == checkpoints
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]


def test_resume_applies_safe_differences_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_job(out), log=lambda _m: None, stop_after_steps=3)
    messages: list[str] = []
    over = ("train.steps=5", "train.log_every=2", "data.max_eval_samples=20")
    result = train(tiny_job(out, *over), log=messages.append)
    assert result.resumed_from == 3 and result.step == 5
    assert result.eval is not None and result.eval.total == 20
    (warning,) = [m for m in messages if m.startswith("warning:")]
    assert "data.max_eval_samples: 40 (run) vs 20 (this config)" in warning
    assert "train.log_every: 1 (run) vs 2 (this config)" in warning
    assert "train.steps: 6 (run) vs 5 (this config)" in warning
    saved = (out / "job.toml").read_text()
    assert "log_every = 2" in saved and "max_eval_samples = 20" in saved


def test_resume_differences_lists_each_field(tmp_path: Path) -> None:
    run = tiny_job(tmp_path)
    other = tiny_job(
        tmp_path,
        "train.progress=true",
        arch={"arch": "cross_attention", "cross_attention_every_n_layers": 1},
    )
    unsafe, safe = resume_differences(run, other)
    assert safe == ["train.progress: false (run) vs true (this config)"]
    assert 'arch.arch: "joint_decoder" (run) vs "cross_attention" (this config)' in unsafe
    assert "arch.cross_attention_every_n_layers: unset (run) vs 1 (this config)" in unsafe
    assert resume_differences(run, tiny_job(tmp_path)) == ([], [])
    assert "model.dim" not in SAFE_RESUME_FIELDS and "train.steps" in SAFE_RESUME_FIELDS


def test_resume_falls_back_past_an_unreadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_job(out), log=lambda _m: None, stop_after_steps=5)  # saves step 3 and 5
    newest = out / "checkpoints" / "step_000005"
    (newest / "trainer_state.pt").write_bytes(b"truncated")
    messages: list[str] = []
    result = train(tiny_job(out), log=messages.append)
    assert result.resumed_from == 3 and result.step == 6
    assert any(
        m.startswith("warning: checkpoint step_000005 is unreadable") and "step_000003" in m
        for m in messages
    ), messages
    assert f"resumed from {out / 'checkpoints' / 'step_000003'} (step 3/6)" in messages
