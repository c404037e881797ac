"""A real SIGTERM through the CLI: checkpoint, exit 143, rerun resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import tiny_dict


@pytest.mark.slow
def test_sigterm_saves_and_rerun_resumes(tmp_path: Path) -> None:
    from vlm_config import JobConfig, write_toml

    run = tmp_path / "run"
    cfg = tmp_path / "job.toml"
    data = tiny_dict(run, train={"steps": 3000, "checkpoint_every": 1000, "log_every": 1})
    write_toml(JobConfig.model_validate(data), cfg)
    cmd = [sys.executable, "-m", "vlm_config.cli", "train", str(cfg)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    text = out.decode()
    assert proc.returncode == 143, text
    assert "stopped by signal 15" in text and "Traceback" not in text
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert saved
    step = int(saved[-1].name.split("_")[-1])
    # the same command (a few more steps so that the test stays short)
    again = subprocess.run(
        [*cmd, f"train.steps={step + 5}"], capture_output=True, text=True, env=env, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"step {step}/{step + 5}" in again.stdout
    assert "exact-match accuracy" in again.stdout
