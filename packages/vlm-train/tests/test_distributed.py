"""``torchrun --nproc_per_node=2`` (gloo, FSDP2) runs the same command as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_dict


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
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("exact-match accuracy") == 1  # printed by rank 0 only
    assert "world=2" in proc.stdout
    result = json.loads((run / "eval.json").read_text())
    assert result["total"] == 40
    assert (run / "final" / "model.safetensors").is_file()
    assert any((run / "checkpoints").glob("step_*"))
