"""The Trainer's input pipeline: bad samples skipped and counted, or one clear error;
text-only samples in a batch stop with what the model must accept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_job

from vlm_data import DIGIT_WORDS, DataError, digit_images
from vlm_train import Trainer, VLMTrainError


def _manifest(tmp_path: Path, bad: dict[int, dict[str, str]]) -> Path:
    images, labels = digit_images(np.arange(16))
    rows = []
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        im.save(tmp_path / f"d{i}.png")
        rows.append(bad.get(i, {"image": f"d{i}.png", "caption": DIGIT_WORDS[int(y)]}))
    (tmp_path / "junk.png").write_bytes(b"junk")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_skip_logs_and_counts_bad_samples(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, {3: {"image": "junk.png", "caption": "one"}})
    data = {"type": "jsonl", "train_file": str(manifest), "on_bad_sample": "skip"}
    job = tiny_job(tmp_path / "run", "train.steps=3", "train.eval_at_end=false", data=data)
    lines: list[str] = []
    with Trainer(job, log=lines.append) as trainer:
        result = trainer.run()
        skipped = trainer.skipped_samples
    assert result.step == 3 and skipped >= 1  # 3 steps x 16 samples: drawn 3 times
    logged = [line for line in lines if "skipped a bad sample" in line]
    assert len(logged) == skipped
    assert f"cannot read image {tmp_path / 'junk.png'} ({manifest}:4)" in logged[0]
    records = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("skipped_samples", 0) for r in records) == skipped


def test_error_names_file_and_record(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, {5: {"image": "missing.png", "caption": "one"}})
    data = {"type": "jsonl", "train_file": str(manifest)}
    job = tiny_job(tmp_path / "run", "train.steps=2", data=data)
    with Trainer(job, log=lambda _m: None) as trainer, pytest.raises(DataError) as info:
        trainer.run()
    assert str(info.value) == f"image file not found: {tmp_path / 'missing.png'} ({manifest}:6)"


def test_text_only_sample_in_a_batch_says_what_the_model_needs(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, {2: {"caption": "two"}})
    data = {"type": "jsonl", "train_file": str(manifest), "num_workers": 0}
    job = tiny_job(tmp_path / "run", "train.steps=2", data=data)
    with Trainer(job, log=lambda _m: None) as trainer, pytest.raises(VLMTrainError) as info:
        trainer.step()
    assert "mixes text-only samples (1 of 16)" in str(info.value)
