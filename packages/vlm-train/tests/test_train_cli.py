from __future__ import annotations

import errno
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pytest
from train_helpers import tiny_dict, tiny_job

from vlm_config import AdapterConfig, get_registry
from vlm_config.cli import main
from vlm_train import DIGIT_WORDS, digit_images, digits_split, train


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture
def digit_png(tmp_path: Path) -> tuple[Path, str]:
    index = digits_split()["test"][:1]
    images, labels = digit_images(np.asarray(index))
    path = tmp_path / "digit.png"
    images[0].save(path)
    return path, DIGIT_WORDS[int(labels[0])]


def test_commands_registered(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out and "generate" in out


def test_generate_on_png(
    trained_run: Path, digit_png: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = digit_png
    captions = []
    for target in (trained_run, trained_run / "final"):
        code, out, err = run_cli(capsys, "generate", str(target), "--image", str(path))
        assert code == 0, err
        captions.append(out.strip())
    # one digit word (the tiny model is not accurate, but it has learnt the format), and
    # the checkpoint and the export of the same final step generate the same caption
    assert captions[0] in DIGIT_WORDS, captions
    assert captions[1] == captions[0]


def test_eval_run_and_export(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "eval", str(trained_run / "final"), "--max-samples", "20")
    assert code == 0, err
    assert "exact-match accuracy" in out and "/20)" in out
    code, out, err = run_cli(capsys, "eval", str(trained_run), "--max-samples", "20")
    assert code == 0, err
    assert "checkpoints" in out


def test_generate_bad_inputs(
    trained_run: Path,
    tmp_path: Path,
    digit_png: tuple[Path, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_cli(capsys, "generate", str(trained_run), "--image", "nope.png")
    assert code == 1 and "image file not found" in one_error_line(err)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = run_cli(capsys, "generate", str(trained_run), "--image", str(bad))
    assert code == 1 and "cannot read image" in one_error_line(err)
    png, _ = digit_png
    code, _, err = run_cli(
        capsys, "generate", str(trained_run), "--image", str(png), "--prompt", "one two three four"
    )
    assert code == 1 and "max_text_len" in one_error_line(err)
    code, _, err = run_cli(capsys, "generate", str(tmp_path), "--image", str(png))
    assert code == 1 and "not an export folder" in one_error_line(err)


def _write(path: Path, data: dict) -> Path:
    from vlm_config import JobConfig, write_toml

    write_toml(JobConfig.model_validate(data), path)
    return path


def test_train_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path / "job.toml", tiny_dict(tmp_path / "run"))
    code, _, err = run_cli(capsys, "train", str(cfg), "train.bogus_key=1")
    line = one_error_line(err)
    assert code == 1 and "train.bogus_key" in line and "Extra inputs" in line
    code, _, err = run_cli(capsys, "train", str(tmp_path / "missing.toml"))
    assert code == 1 and "missing.toml" in one_error_line(err)
    # an over-long caption in a files manifest
    images, _ = digit_images(np.arange(1))
    images[0].save(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "caption": "one two three four"}) + "\n")
    data = tiny_dict(tmp_path / "run2", data={"type": "jsonl", "train_file": str(manifest)})
    cfg = _write(tmp_path / "files.toml", data)
    code, _, err = run_cli(capsys, "train", str(cfg))
    assert code == 1 and "max_text_len is 4" in one_error_line(err)
    # a corrupt image in a manifest
    (tmp_path / "b.png").write_bytes(b"junk")
    manifest.write_text(json.dumps({"image": "b.png", "caption": "one"}) + "\n")
    code, _, err = run_cli(capsys, "train", str(cfg), f"train.output_dir={tmp_path / 'run3'}")
    assert code == 1 and "cannot read image" in one_error_line(err)


# ------------------------------------------------------ vlm train: nothing lost, one line


def test_train_empty_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, text in (("empty.toml", ""), ("comments.toml", "# my job\n# todo\n")):
        cfg = tmp_path / name
        cfg.write_text(text)
        code, out, err = run_cli(capsys, "train", str(cfg))
        line = one_error_line(err)
        assert code == 1 and line.startswith(f"error: {cfg}: the config file is empty")
        assert "training" not in out


def test_train_refuses_an_incompatible_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    cfg = _write(tmp_path / "job.toml", tiny_dict(run))
    train(tiny_job(run), log=lambda _m: None, stop_after_steps=2)
    saved = (run / "job.toml").read_bytes()
    code, _, err = run_cli(capsys, "train", str(cfg), "model.dim=64")
    line = one_error_line(err)
    assert code == 1 and line.startswith(f"error: {cfg}: cannot resume {run}:")
    assert "model.dim: 32 (run) vs 64 (this config)" in line
    assert "train.resume=false" in line
    assert (run / "job.toml").read_bytes() == saved


class BrokenAdapterConfig(AdapterConfig):
    """Test-only adapter whose builder rejects its dimensions (a build-time ValueError
    that config validation does not catch)."""

    type: Literal["test_broken_adapter"] = "test_broken_adapter"
    implementation: ClassVar[str] = f"{__name__}:build_broken_adapter"


def build_broken_adapter(config: Any, in_dim: int, out_dim: int) -> Any:
    raise ValueError(f"test_broken_adapter cannot project {in_dim} -> {out_dim} features")


@pytest.fixture
def broken_adapter() -> Iterator[None]:
    registry = get_registry()
    registry.register("adapters", BrokenAdapterConfig, replace=True)
    try:
        yield
    finally:
        registry.unregister("adapters", "test_broken_adapter")


def test_train_build_error_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], broken_adapter: None
) -> None:
    run = tmp_path / "run"
    data = tiny_dict(run)
    data["adapter"] = {"type": "test_broken_adapter"}
    cfg = _write(tmp_path / "job.toml", data)
    code, _, err = run_cli(capsys, "train", str(cfg))
    line = one_error_line(err)
    assert code == 1
    assert line == (
        f"error: {cfg}: cannot build the model: test_broken_adapter cannot project 16 -> 32 "
        "features"
    )
    assert not run.exists()  # nothing written for a model that cannot exist


def test_train_disk_full_during_a_save(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlm_parallel import CheckpointManager

    def full(self: CheckpointManager, step: int, *args: Any, **kwargs: Any) -> Path:
        where = self.directory / self.step_dir_name(step)
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(CheckpointManager, "save", full)
    run = tmp_path / "run"
    cfg = _write(tmp_path / "job.toml", tiny_dict(run))
    code, _, err = run_cli(capsys, "train", str(cfg))
    line = one_error_line(err)
    assert code == 1 and "No space left on device" in line and "step_000003" in line


def test_second_ctrl_c_waits_for_the_save(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlm_parallel import CheckpointManager

    real_save = CheckpointManager.save
    calls: list[int] = []

    def save_under_two_ctrl_c(self: CheckpointManager, step: int, *a: Any, **k: Any) -> Path:
        calls.append(step)
        os.kill(os.getpid(), signal.SIGINT)  # the first: stop at the step boundary
        os.kill(os.getpid(), signal.SIGINT)  # the second: would stop at once
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(CheckpointManager, "save", save_under_two_ctrl_c)
    run = tmp_path / "run"
    cfg = _write(tmp_path / "job.toml", tiny_dict(run))  # checkpoint_every=3
    code, out, err = run_cli(capsys, "train", str(cfg))
    assert code == 130, err
    assert "stopped by" not in out  # it stopped during the save, not at a step boundary
    assert err.strip().splitlines()[-1] == "interrupted; checkpoint step_000003 is complete"
    assert calls == [3] and (run / "checkpoints" / "step_000003" / "COMPLETE").is_file()
    assert not list((run / "checkpoints").glob("*.tmp")) and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
