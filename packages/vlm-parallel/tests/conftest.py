"""Fixtures shared by the vlm-parallel tests (one thread per process: two-process tests
share the machine's cores)."""

from __future__ import annotations

import pytest
import torch
import vlmp_workers as w

import vlm_parallel as vp
from vlm_config import JobConfig, ParallelConfig

torch.set_num_threads(1)


@pytest.fixture
def job() -> JobConfig:
    """The tiny joint_decoder job of :func:`vlmp_workers.tiny_job_dict`."""
    return JobConfig.model_validate(w.tiny_job_dict())


@pytest.fixture
def ctx(monkeypatch: pytest.MonkeyPatch) -> vp.DistContext:
    """A single-process :class:`~vlm_parallel.DistContext` on CPU (no process group)."""
    for name in w.LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return vp.init_distributed(ParallelConfig(), device="cpu")
