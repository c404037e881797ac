"""``torchrun --nproc_per_node=2`` (gloo, FSDP2) runs the same command as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import tiny_dict, tiny_job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes(tmp_path: Path) -> None:
    from vlm_config import JobConfig, write_toml

    run = tmp_path / "run"
    cfg = tmp_path / "job.toml"
    write_toml(JobConfig.model_validate(tiny_dict(run)), cfg)
    proc = _torchrun(cfg, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("exact-match accuracy") == 1  # printed by rank 0 only
    assert "world=2" in proc.stdout
    result = json.loads((run / "eval.json").read_text())
    assert result["total"] == 40
    assert (run / "final" / "model.safetensors").is_file()
    assert any((run / "checkpoints").glob("step_*"))


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def _torchrun(cfg: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``vlm train cfg overrides...`` under ``torchrun --nproc_per_node=2``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "vlm_config.cli",
        "train",
        str(cfg),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _max_rel(a: dict[int, float], b: dict[int, float], steps: range) -> list[float]:
    return [abs(a[s] - b[s]) / abs(a[s]) for s in steps]


@pytest.mark.slow
@pytest.mark.distributed
def test_augmented_one_and_two_processes_agree_and_reshard_on_resume(tmp_path: Path) -> None:
    """With augmentation on (a random shift per sample, seeded by (seed, sample, epoch)
    and never by the rank), 1 and 2 processes see the same pixels: their losses agree per
    step within float rounding; and a 2-process run resumed on 1 process continues the
    1-process run."""
    import shutil

    from vlm_config import JobConfig, write_toml
    from vlm_train import train

    # eval_at_end off: this test is about the training data, not generation
    sections = {"data": {"augment_shift": 1, "num_workers": 1}, "train": {"eval_at_end": False}}
    one = tmp_path / "one"
    job = JobConfig.model_validate(tiny_dict(one, **sections))
    result = train(job, log=lambda _m: None)
    assert result.step == 6
    two = tmp_path / "two"
    cfg = tmp_path / "two.toml"
    write_toml(JobConfig.model_validate(tiny_dict(two, **sections)), cfg)
    proc = _torchrun(cfg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    rel = _max_rel(a, b, range(1, 7))
    print("1 vs 2 processes, relative loss difference per step:", rel)
    assert max(rel) <= 1e-5, rel
    # the augmentation is on: a run without it has other losses
    plain = tmp_path / "plain"
    train(tiny_job(plain, "train.steps=2", "data.num_workers=0"), log=lambda _m: None)
    assert abs(_losses(plain)[2] - a[2]) / a[2] > 1e-4
    # resharded resume: the 2-process run's step-3 checkpoint, continued on 1 process
    three = tmp_path / "resumed"
    shutil.copytree(two, three)
    shutil.rmtree(three / "checkpoints" / "step_000006")
    resumed = JobConfig.model_validate(tiny_dict(three, **sections))
    result = train(resumed, log=lambda _m: None)
    assert result.resumed_from == 3 and result.step == 6
    rel = _max_rel(a, _losses(three), range(4, 7))
    print("2 processes resumed on 1 vs 1 process, steps 4-6:", rel)
    assert max(rel) <= 1e-5, rel
