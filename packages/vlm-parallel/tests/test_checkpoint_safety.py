"""Checkpoint hardening: loading never runs code, corrupt checkpoints are named and
skipped, failed or interrupted saves never lose the previous checkpoint."""

from __future__ import annotations

import errno
import os
import pickle
import shlex
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import vlmp_workers as w

import vlm_parallel as vp
import vlm_parallel.checkpoint as ckpt_mod
from vlm_config import JobConfig, write_toml


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _RunsCode:
    """Unpickling this touches ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture
def two_checkpoints(
    job: JobConfig, ctx: vp.DistContext, tmp_path: Path
) -> tuple[vp.CheckpointManager, dict[int, dict[str, torch.Tensor]]]:
    """Checkpoints at steps 1 and 2 (model + AdamW + LambdaLR) and the params at each."""
    model = vp.build_parallel_vlm(job, ctx, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    manager = vp.CheckpointManager(tmp_path / "ckpt", keep_last=3)
    params = {}
    for step in (1, 2):
        w.one_local_step(model, optimizer, job)
        scheduler.step()
        manager.save(step, model, optimizer, scheduler, extra={"pos": step})
        params[step] = w.state_copy(model)
    return manager, params


def _fresh(job: JobConfig, ctx: vp.DistContext) -> torch.nn.Module:
    return vp.build_parallel_vlm(job, ctx, seed=1)


# --------------------------------------------------------------- no code on load
def test_saved_state_is_plain_data(
    two_checkpoints: tuple[vp.CheckpointManager, dict[int, dict[str, torch.Tensor]]],
) -> None:
    manager, _ = two_checkpoints
    path = manager.latest()
    assert path is not None
    trainer = torch.load(path / "trainer_state.pt", weights_only=True)
    per_rank = torch.load(path / "rank_00000.pt", weights_only=True)
    # LambdaLR's state holds None for a lambda (the function itself is not saved)
    assert trainer["scheduler"]["lr_lambdas"] == [None]
    assert trainer["step"] == 2 and per_rank["extra"] == {"pos": 2}
    assert isinstance(per_rank["rng"]["numpy"]["keys"], torch.Tensor)
    assert isinstance(per_rank["rng"]["python"], list)


def test_rng_state_roundtrip_plain() -> None:
    import random

    import numpy as np

    state = vp.capture_rng_state()
    expected = (torch.rand(2), random.random(), np.random.rand(), np.random.randn())
    vp.restore_rng_state(state)
    got = (torch.rand(2), random.random(), np.random.rand(), np.random.randn())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    with pytest.raises(ValueError, match="malformed Python RNG state"):
        vp.restore_rng_state({"python": "garbage"})


@pytest.mark.parametrize("victim", ["trainer_state.pt", "rank_00000.pt"])
def test_crafted_pickle_is_refused(
    two_checkpoints: tuple[vp.CheckpointManager, dict[int, dict[str, torch.Tensor]]],
    job: JobConfig,
    ctx: vp.DistContext,
    tmp_path: Path,
    victim: str,
) -> None:
    manager, _ = two_checkpoints
    path = manager.latest()
    assert path is not None
    marker = tmp_path / "code-ran"
    torch.save({"step": 2, "world_size": 1, "evil": _RunsCode(marker)}, path / victim)
    model = _fresh(job, ctx)
    with pytest.raises(vp.CheckpointError, match=rf"{victim}: refused to load") as info:
        manager.load(path, model, None)
    assert "\n" not in str(info.value)
    assert "unsupported global " in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


def test_crafted_dcp_metadata_is_refused(
    two_checkpoints: tuple[vp.CheckpointManager, dict[int, dict[str, torch.Tensor]]],
    job: JobConfig,
    ctx: vp.DistContext,
    tmp_path: Path,
) -> None:
    manager, _ = two_checkpoints
    path = manager.latest()
    assert path is not None
    marker = tmp_path / "code-ran"
    with open(path / ".metadata", "wb") as fh:
        pickle.dump(_RunsCode(marker), fh)
    with pytest.raises(vp.CheckpointError, match=r"\.metadata: refused to load.*posix\.system"):
        manager.load_model(path, _fresh(job, ctx))
    assert not marker.exists()


def test_crafted_dcp_bytes_entry_is_refused(
    two_checkpoints: tuple[vp.CheckpointManager, dict[int, dict[str, torch.Tensor]]],
    job: JobConfig,
    ctx: vp.DistContext,
    tmp_path: Path,
) -> None:
    """DCP reads non-tensor entries (optimizer param_groups) with a full unpickler; the
    manager admits them only when they load with ``weights_only=True``."""
    manager, _ = two_checkpoints
    path = manager.latest()
    assert path is not None
    marker = tmp_path / "code-ran"
    metadata = ckpt_mod._read_metadata(path)
    key = next(k for k in metadata.storage_data if k.fqn == "optim.param_groups.0.lr")
    info = metadata.storage_data[key]
    blob = (path / info.relative_path).read_bytes()
    import io

    evil = io.BytesIO()
    torch.save(_RunsCode(marker), evil)
    # append the payload and point the entry at it (a consistent, crafted checkpoint)
    (path / info.relative_path).write_bytes(blob + evil.getvalue())
    info.offset, info.length = len(blob), len(evil.getvalue())
    with open(path / ".metadata", "wb") as fh:
        pickle.dump(metadata, fh)
    model = _fresh(job, ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(vp.CheckpointError, match="refused to load DCP data"):
        manager.load(path, model, optimizer)
    assert not marker.exists()


def test_old_format_is_refused(
    two_checkpoints: tuple[vp.CheckpointManager, dict[int, dict[str, torch.Tensor]]],
    job: JobConfig,
    ctx: vp.DistContext,
) -> None:
    import numpy as np

    manager, _ = two_checkpoints
    path = manager.latest()
    assert path is not None
    torch.save({"rng": {"numpy": np.random.get_state()}}, path / "rank_00000.pt")
    with pytest.raises(vp.CheckpointError, match="rank_00000.pt: refused to load"):
        manager.load(path, _fresh(job, ctx), None)
    (path / vp.COMPLETE_MARKER).write_text('{"step": 2, "world_size": 1, "format_version": 1}')
    with pytest.raises(vp.CheckpointError, match="written by an older vlm-parallel") as info:
        manager.load(path, _fresh(job, ctx), None)
    assert "trainer_state.pt" in str(info.value)


# ------------------------------------------------------------ corrupt checkpoints
def _truncate_distcp(path: Path) -> Path:
    shard = sorted(path.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    return shard


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate_distcp, r"__0_0\.distcp is truncated \(100 bytes"),
        (lambda p: (p / ".metadata").unlink(), r"\.metadata is missing"),
        (lambda p: (p / ".metadata").write_bytes(b"garbage"), r"\.metadata is not readable"),
        (lambda p: (p / "trainer_state.pt").write_bytes(b""), r"trainer_state\.pt is not a"),
        (lambda p: (p / "rank_00000.pt").unlink(), r"rank_00000\.pt is missing"),
    ],
)
def test_corrupt_latest_falls_back(
    two_checkpoints: tuple[vp.CheckpointManager, dict[int, dict[str, torch.Tensor]]],
    job: JobConfig,
    ctx: vp.DistContext,
    damage: Any,
    message: str,
) -> None:
    manager, params = two_checkpoints
    latest = manager.latest()
    assert latest is not None
    damage(latest)
    model = _fresh(job, ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(vp.CheckpointError, match=message):
        manager.load(latest, model, optimizer)

    warnings: list[str] = []
    info = manager.load_latest(model, optimizer, warn=warnings.append)
    assert info is not None and info["step"] == 1 and info["path"].name == "step_000001"
    assert _same(w.state_copy(model), params[1])
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: checkpoint step_000002 is unreadable (")
    assert warnings[0].endswith("); falling back to step_000001")
    assert "\n" not in warnings[0]


def test_all_corrupt_lists_every_checkpoint(
    two_checkpoints: tuple[vp.CheckpointManager, dict[int, dict[str, torch.Tensor]]],
    job: JobConfig,
    ctx: vp.DistContext,
) -> None:
    manager, _ = two_checkpoints
    for _step, path in manager.complete_checkpoints():
        _truncate_distcp(path)
    with pytest.raises(vp.CheckpointError, match="no checkpoint in .* can be loaded") as info:
        manager.load_latest(_fresh(job, ctx), model_only=True)
    assert "step_000002 (" in str(info.value) and "step_000001 (" in str(info.value)
    assert vp.CheckpointManager(manager.directory / "none").load_latest(_fresh(job, ctx)) is None


def test_another_ranks_failure_is_shared(
    two_checkpoints: tuple[vp.CheckpointManager, dict[int, dict[str, torch.Tensor]]],
    job: JobConfig,
    ctx: vp.DistContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rank whose own reads succeed still raises when another rank failed (the flag
    is all-reduced with max), so every rank falls back together."""
    manager, _ = two_checkpoints
    monkeypatch.setattr(ckpt_mod, "all_reduce_max", lambda value: max(value, 1))
    with pytest.raises(vp.CheckpointError, match="unreadable on another rank"):
        manager.load_model(manager.latest() or Path(), _fresh(job, ctx))


def test_model_only_load(
    two_checkpoints: tuple[vp.CheckpointManager, dict[int, dict[str, torch.Tensor]]],
    job: JobConfig,
    ctx: vp.DistContext,
) -> None:
    manager, params = two_checkpoints
    model = _fresh(job, ctx)
    before = torch.get_rng_state()
    info = manager.load_latest(model, model_only=True)
    assert info is not None and info["step"] == 2
    assert _same(w.state_copy(model), params[2])
    assert torch.equal(torch.get_rng_state(), before)  # inference keeps its RNG
    with pytest.raises(ValueError, match="model_only"):
        manager.load_latest(model, torch.optim.SGD(model.parameters(), lr=1.0), model_only=True)


def test_mismatching_model_is_named_and_not_skipped(
    two_checkpoints: tuple[vp.CheckpointManager, dict[int, dict[str, torch.Tensor]]],
    job: JobConfig,
    ctx: vp.DistContext,
) -> None:
    manager, _ = two_checkpoints
    wider = job.model_copy(update={"model": job.model.model_copy(update={"dim": 48})})
    other = vp.build_parallel_vlm(wider, ctx, seed=0)
    warnings: list[str] = []
    with pytest.raises(
        vp.CheckpointMismatchError,
        match=r"parameter '[\w.]+' has shape \(\d+, \d+\) in the checkpoint but \(\d+, \d+\) in",
    ):
        manager.load_latest(other, warn=warnings.append, model_only=True)
    assert warnings == []


# ----------------------------------------------------------------- consolidated
def test_consolidated_corrupt_and_mismatch(
    job: JobConfig, ctx: vp.DistContext, tmp_path: Path
) -> None:
    model = vp.build_parallel_vlm(job, ctx, seed=0)
    out = vp.export_consolidated(model, job, tmp_path / "export")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        vp.CheckpointError, match=r"model\.safetensors is not a readable safetensors file \("
    ):
        vp.load_consolidated(out)
    weights.write_bytes(b"")
    with pytest.raises(vp.CheckpointError, match="is not a readable safetensors file"):
        vp.load_consolidated(out)
    weights.write_bytes(data)
    write_toml(
        job.model_copy(update={"model": job.model.model_copy(update={"dim": 48})}), out / "job.toml"
    )
    with pytest.raises(
        vp.CheckpointMismatchError,
        match=r"job\.toml does not match .*: tensor '[\w.]+' is \(\d+, \d+\) in model\.safet",
    ):
        vp.load_consolidated(out)


# -------------------------------------------------------------------- saving
@pytest.mark.parametrize("where", ["dcp", "trainer_state"])
def test_disk_full_leaves_previous_checkpoint(
    job: JobConfig,
    ctx: vp.DistContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    model = vp.build_parallel_vlm(job, ctx, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = vp.CheckpointManager(tmp_path, keep_last=1)
    w.one_local_step(model, optimizer, job)
    manager.save(1, model, optimizer)
    at_1 = w.state_copy(model)
    w.one_local_step(model, optimizer, job)

    def full(*_a: Any, **_k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "dcp":
        monkeypatch.setattr(ckpt_mod.dcp, "save", full)
    else:
        real = ckpt_mod._write_bytes

        def write(path: Path, data: bytes) -> None:
            if path.name == "trainer_state.pt":
                full()
            real(path, data)

        monkeypatch.setattr(ckpt_mod, "_write_bytes", write)
    with pytest.raises(OSError, match=r"step_000002 failed .*No space left") as info:
        manager.save(2, model, optimizer)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert f"the previous checkpoint {tmp_path / 'step_000001'} is intact" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
    fresh = _fresh(job, ctx)
    assert manager.load(manager.latest() or Path(), fresh, None)["step"] == 1
    assert _same(w.state_copy(fresh), at_1)


def test_unsafe_extra_is_rejected_before_writing(
    job: JobConfig, ctx: vp.DistContext, tmp_path: Path
) -> None:
    model = vp.build_parallel_vlm(job, ctx, seed=0)
    manager = vp.CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="extra state of rank 0 cannot be checkpointed safely"):
        manager.save(1, model, None, extra={"obj": _RunsCode(tmp_path / "x")})
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_sigint_during_save_is_deferred(
    job: JobConfig, ctx: vp.DistContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = vp.build_parallel_vlm(job, ctx, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = vp.CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, model, optimizer)
    w.one_local_step(model, optimizer, job)
    real = ckpt_mod.dcp.save
    sent: list[bool] = []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)  # the user's second Ctrl-C, mid-write
        sent.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod.dcp, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, model, optimizer)
    monkeypatch.undo()
    assert sent == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]
    assert manager.load(tmp_path / "step_000002", _fresh(job, ctx), None)["step"] == 2


def test_sigterm_is_delivered_after_the_save(
    job: JobConfig, ctx: vp.DistContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = vp.build_parallel_vlm(job, ctx, seed=0)
    manager = vp.CheckpointManager(tmp_path)
    seen: list[bool] = []

    def handler(_signum: int, _frame: Any) -> None:  # a training loop's stop flag
        seen.append((tmp_path / "step_000003" / vp.COMPLETE_MARKER).is_file())

    previous = signal.signal(signal.SIGTERM, handler)
    real = ckpt_mod.dcp.save

    def terminated(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod.dcp, "save", terminated)
    try:
        manager.save(3, model, None)
    finally:
        restored = signal.signal(signal.SIGTERM, previous)
    assert seen == [True]  # once, and only after the checkpoint was complete
    assert restored is handler
