from __future__ import annotations

import json
from pathlib import Path

import torch
from train_helpers import tiny_job

from vlm_train import lr_factor, train


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule() -> None:
    kw = {"steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.1}
    assert lr_factor(0, **kw) == 0.5 and lr_factor(1, **kw) == 1.0
    assert lr_factor(2, **kw) == 1.0
    assert abs(lr_factor(10, **kw) - 0.1) < 1e-9
    assert lr_factor(5, **kw) > lr_factor(8, **kw)


def test_few_steps_lower_loss_and_write_artifacts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(tiny_job(out, "train.steps=12", "train.checkpoint_every=6"), log=print)
    assert result.step == 12 and result.interrupted is None
    train_recs = [r for r in _records(out) if r["kind"] == "train"]
    assert len(train_recs) == 12
    assert {"loss", "lr", "tokens_per_s", "step"} <= set(train_recs[0])
    first = sum(r["loss"] for r in train_recs[:2]) / 2
    last = sum(r["loss"] for r in train_recs[-2:]) / 2
    assert last < first
    final = [r for r in _records(out) if r["kind"] == "eval"]
    assert final and final[-1]["total"] == 40 and 0 <= final[-1]["accuracy"] <= 1
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "tokenizer.json").is_file() and (out / "job.toml").is_file()
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "eval.json").read_text())["total"] == 40
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert steps[-1].endswith("12")
    # rerunning a finished run resumes at the end: no more training, same evaluation
    again = train(tiny_job(out, "train.steps=12", "train.checkpoint_every=6"), log=print)
    assert again.resumed_from == 12 and again.eval is not None
    assert again.eval.correct == result.eval.correct


def test_resume_matches_uninterrupted(tmp_path: Path) -> None:
    over = ("train.steps=6", "train.checkpoint_every=100", "data.augment_shift=1")
    straight = train(tiny_job(tmp_path / "a", *over), log=print)
    part = train(tiny_job(tmp_path / "b", *over), log=print, stop_after_steps=3)
    assert part.interrupted == 0 and part.step == 3 and part.eval is None
    resumed = train(tiny_job(tmp_path / "b", *over), log=print)
    assert resumed.resumed_from == 3 and resumed.step == 6
    a = [r["loss"] for r in _records(tmp_path / "a") if r["kind"] == "train"]
    b = [r["loss"] for r in _records(tmp_path / "b") if r["kind"] == "train"]
    assert len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    assert resumed.eval is not None and straight.eval is not None
    assert resumed.eval.correct == straight.eval.correct
