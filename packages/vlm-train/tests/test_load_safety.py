"""``load_trained`` (behind ``vlm generate`` / ``vlm eval``): model state only, never runs
code from a checkpoint, falls back past a corrupt newest checkpoint, and turns every
unreadable or mismatching file into one ``error:`` line naming it."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from train_helpers import tiny_job

from vlm_config import load_job_config, write_toml
from vlm_config.cli import main
from vlm_train import DIGIT_WORDS, digit_images, digits_split
from vlm_train.errors import VLMTrainError
from vlm_train.inference import load_trained
from vlm_train.tokenizer import TextTokenizer


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def saved_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """A run folder written through the checkpoint API (no training loop): job.toml,
    tokenizer.json, checkpoints at steps 3 and 6 (model + AdamW) and ``final/``; plus
    the parameters at each step."""
    from vlm_parallel import (
        CheckpointManager,
        build_parallel_vlm,
        export_consolidated,
        init_distributed,
    )

    run = tmp_path_factory.mktemp("saved") / "run"
    job = tiny_job(run)
    run.mkdir(parents=True)
    write_toml(job, run / "job.toml")
    TextTokenizer.train([" ".join(DIGIT_WORDS), job.data.prompt or ""]).save(run / "tokenizer.json")
    model = build_parallel_vlm(job, init_distributed(job.parallel, device="cpu"), 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(run / "checkpoints", keep_last=3)
    params = {}
    for step in (3, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * step)
        manager.save(step, model, optimizer, extra={"step": step})
        params[step] = _params(model)
    export_consolidated(model, job, run / "final")
    return run, params


@pytest.fixture
def run(saved_run: tuple[Path, Any], tmp_path: Path) -> Path:
    """A private copy of the saved run, free to damage."""
    copy = tmp_path / "run"
    shutil.copytree(saved_run[0], copy)
    return copy


def _truncate_distcp(ckpt: Path) -> None:
    shard = sorted(ckpt.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_loads_model_state_only(
    saved_run: tuple[Path, dict[int, dict[str, torch.Tensor]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, params = saved_run

    def no_optimizer(*_a: Any, **_k: Any) -> None:
        raise AssertionError("inference built an optimizer")

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", no_optimizer)
    loaded = load_trained(run)
    assert loaded.source == run / "checkpoints" / "step_000006"
    assert _same(_params(loaded.model), params[6]) and not loaded.model.training
    loaded = load_trained(run / "checkpoints" / "step_000003")
    assert _same(_params(loaded.model), params[3])
    assert _same(_params(load_trained(run / "final").model), params[6])


def test_truncated_latest_falls_back_with_a_warning(
    run: Path, saved_run: tuple[Path, dict[int, dict[str, torch.Tensor]]]
) -> None:
    _truncate_distcp(run / "checkpoints" / "step_000006")
    warnings: list[str] = []
    loaded = load_trained(run, warn=warnings.append)
    assert loaded.source.name == "step_000003"
    assert _same(_params(loaded.model), saved_run[1][3])
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"warning: checkpoint step_000006 is unreadable ({run}/checkpoints/step_000006/"
        "__0_0.distcp is truncated (100 bytes; .metadata expects at least "
    )
    assert warnings[0].endswith(")); falling back to step_000003")


def test_all_checkpoints_corrupt(run: Path) -> None:
    for step in ("step_000003", "step_000006"):
        _truncate_distcp(run / "checkpoints" / step)
    with pytest.raises(VLMTrainError, match="no checkpoint in .* can be loaded") as info:
        load_trained(run, warn=lambda _m: None)
    message = str(info.value)
    assert "step_000006 (" in message and "step_000003 (" in message
    assert message.endswith(f"the run's export {run / 'final'} can be loaded instead")


def test_deleted_metadata(run: Path) -> None:
    ckpt = run / "checkpoints" / "step_000006"
    (ckpt / ".metadata").unlink()
    with pytest.raises(VLMTrainError, match=r"step_000006/\.metadata is missing"):
        load_trained(ckpt)


def test_crafted_pickle_never_runs(run: Path, tmp_path: Path) -> None:
    ckpt = run / "checkpoints" / "step_000006"
    marker = tmp_path / "code-ran"
    torch.save({"step": 6, "world_size": 1, "x": _RunsCode(marker)}, ckpt / "trainer_state.pt")
    with pytest.raises(VLMTrainError, match=r"trainer_state\.pt: refused to load"):
        load_trained(ckpt)
    warnings: list[str] = []
    assert load_trained(run, warn=warnings.append).source.name == "step_000003"
    assert "trainer_state.pt: refused to load" in warnings[0]
    assert not marker.exists()


@pytest.mark.parametrize("cut", ["half", "empty"])
def test_unreadable_export(run: Path, cut: str) -> None:
    weights = run / "final" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if cut == "half" else b"")
    with pytest.raises(
        VLMTrainError, match=r"final/model\.safetensors is not a readable safetensors file \("
    ):
        load_trained(run / "final")


def test_edited_job_toml_is_named(run: Path) -> None:
    for folder in (run, run / "final"):
        job = load_job_config(folder / "job.toml")
        wider = job.model_copy(update={"model": job.model.model_copy(update={"dim": 48})})
        write_toml(wider, folder / "job.toml")
    with pytest.raises(VLMTrainError) as info:
        load_trained(run, warn=lambda m: pytest.fail(f"no fall back expected: {m}"))
    assert str(info.value).startswith(f"{run / 'job.toml'} does not match the saved weights")
    assert "has shape (32, " in str(info.value) and "in the model" in str(info.value)
    with pytest.raises(VLMTrainError, match=r"final/job\.toml does not match .*: tensor '"):
        load_trained(run / "final")


def test_cli_prints_one_line(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, _labels = digit_images(np.asarray(digits_split()["test"][:1]))
    png = tmp_path / "digit.png"
    images[0].save(png)
    (run / "final" / "model.safetensors").write_bytes(b"")
    for argv in (
        ["generate", str(run / "final"), "--image", str(png)],
        ["eval", str(run / "final")],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines == [
            f"error: {run}/final/model.safetensors is not a readable safetensors file "
            "(SafetensorError: Error while deserializing header: header too small)"
        ]
