from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_dict

from vlm_config.cli import main
from vlm_train import DIGIT_WORDS, digit_images, digits_split


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
    for target in (trained_run, trained_run / "final"):
        code, out, err = run_cli(capsys, "generate", str(target), "--image", str(path))
        assert code == 0, err
        words = out.strip().split()
        assert len(words) <= 3 and all(w in DIGIT_WORDS for w in words)


def test_eval_run_and_export(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "eval", str(trained_run / "final"), "--max-samples", "20")
    assert code == 0, err
    assert "exact-match accuracy" in out and "/20)" in out
    code, out, err = run_cli(capsys, "eval", str(trained_run), "--max-samples", "20")
    assert code == 0, err and "checkpoints" in out


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
    data = tiny_dict(tmp_path / "run2", data={"source": "files", "train_file": str(manifest)})
    cfg = _write(tmp_path / "files.toml", data)
    code, _, err = run_cli(capsys, "train", str(cfg))
    assert code == 1 and "max_text_len is 4" in one_error_line(err)
    # a corrupt image in a manifest
    (tmp_path / "b.png").write_bytes(b"junk")
    manifest.write_text(json.dumps({"image": "b.png", "caption": "one"}) + "\n")
    code, _, err = run_cli(capsys, "train", str(cfg), f"train.output_dir={tmp_path / 'run3'}")
    assert code == 1 and "cannot read image" in one_error_line(err)
