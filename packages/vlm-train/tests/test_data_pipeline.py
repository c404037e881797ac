"""The Trainer's input pipeline: bad samples skipped and counted, or one clear error;
text-only samples train next to image samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_helpers import tiny_job

from vlm_data import DIGIT_WORDS, DataError, digit_images
from vlm_train import Trainer


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


def test_text_only_samples_train_through_a_media_batch(tmp_path: Path) -> None:
    """A batch mixing text-only records becomes a MediaBatch (an image row is
    ``[placeholders] text``, a text-only row ``text``); with every row holding an image
    that MediaBatch gives the prefix layout's loss."""
    import torch

    manifest = _manifest(tmp_path, {2: {"caption": "two"}, 9: {"caption": "nine"}})
    data = {"type": "jsonl", "train_file": str(manifest), "num_workers": 0}
    job = tiny_job(tmp_path / "run", "train.steps=3", data=data)
    with Trainer(job, log=lambda _m: None) as trainer:
        (batch,) = trainer.next_batches()
        mask = batch["image_mask"]
        assert mask.tolist().count(False) == 2 and len(mask) == 16
        model, device = trainer.model, trainer.dist.device
        with torch.no_grad():
            prefix = model.loss(batch["pixel_values"], batch["input_ids"], batch["labels"])
            every = trainer._media_batch(batch, torch.ones_like(mask), device)
            assert torch.allclose(model.loss(every), prefix, rtol=1e-5, atol=1e-6)
            mixed = trainer._media_batch(batch, mask, device)
            assert mixed.pixel_values.shape[0] == 14
        losses = [trainer.step() for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
