"""Single-process tests (no process group): API contracts, AC, checkpoints, exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import vlmp_workers as w

import vlm_parallel as vp
from vlm_config import JobConfig, ParallelConfig
from vlm_strategies import build_vlm, causal_lm_loss


def test_public_api() -> None:
    assert vp.__version__ == "0.1.0"
    for name in vp.__all__:
        assert hasattr(vp, name)


def test_init_distributed_single_process(ctx: vp.DistContext) -> None:
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.mesh) == (0, 1, True, None)
    assert ctx.device == torch.device("cpu")
    assert not ctx.distributed
    assert not torch.distributed.is_initialized()
    vp.destroy_distributed()  # no-op


def test_mesh_shape_resolution() -> None:
    assert vp.resolve_mesh_shape(ParallelConfig(), 4) == (1, 4)
    assert vp.resolve_mesh_shape(ParallelConfig(dp_replicate=2), 4) == (2, 2)
    assert vp.resolve_mesh_shape(ParallelConfig(dp_replicate=2, dp_shard=3), 6) == (2, 3)
    with pytest.raises(ValueError, match="tensor parallelism"):
        vp.resolve_mesh_shape(ParallelConfig(tp=2), 4)
    with pytest.raises(ValueError, match="world size 4"):
        vp.resolve_mesh_shape(ParallelConfig(dp_shard=3), 4)
    with pytest.raises(ValueError, match="dp_replicate"):
        vp.resolve_mesh_shape(ParallelConfig(dp_replicate=3), 4)


def test_init_distributed_rejects_bad_mesh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="tensor parallelism"):
        vp.init_distributed(ParallelConfig(tp=2))


def test_build_single_process_equals_seeded_build_vlm(job: JobConfig, ctx: vp.DistContext) -> None:
    model = vp.build_parallel_vlm(job, ctx, seed=3)
    torch.manual_seed(3)
    reference = build_vlm(job)
    ref = reference.state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    for (name, a), (_, b) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(a, b), name
    assert not any(p.is_meta for p in model.parameters())
    assert vp.is_sharded(model)


def test_apply_fsdp_errors(job: JobConfig, ctx: vp.DistContext) -> None:
    model = vp.build_parallel_vlm(job, ctx, seed=0)
    with pytest.raises(RuntimeError, match="already applied"):
        vp.apply_fsdp(model, job.parallel, ctx)
    with pytest.raises(TypeError, match="VLMWrapper or a Transformer"):
        vp.apply_fsdp(torch.nn.Linear(2, 2), job.parallel, ctx)


def _grads(model: torch.nn.Module, job: JobConfig) -> tuple[float, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    pixels, ids = w.make_batch(2, job, gen)
    logits, labels = model(pixels, ids, labels=ids)
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    return loss.item(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("arch", ["joint_decoder", "cross_attention", "mot", "moma"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_gradients(arch: str, mode: str) -> None:
    job = JobConfig.model_validate(w.tiny_job_dict(arch))
    torch.manual_seed(0)
    plain = build_vlm(job)
    torch.manual_seed(0)
    checkpointed = build_vlm(job)
    n = vp.apply_activation_checkpointing(checkpointed, mode)
    assert n == len(checkpointed.transformer.trunk.blocks())
    loss_a, grads_a = _grads(plain, job)
    loss_b, grads_b = _grads(checkpointed, job)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-5)
    # Names are unchanged (no wrapper prefixes).
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    with pytest.raises(RuntimeError, match="already applied"):
        vp.apply_activation_checkpointing(checkpointed, mode)


def test_activation_checkpointing_targets(job: JobConfig) -> None:
    """Both modes wrap exactly the trunk blocks (the measured effect of each mode is in
    test_activation_memory.py)."""
    for mode in ("full", "selective"):
        model = build_vlm(job)
        blocks = model.transformer.trunk.blocks()
        assert vp.apply_activation_checkpointing(model, mode) == len(blocks)
        wrapped = [m for m in model.modules() if "forward" in vars(m)]
        assert wrapped == blocks
    model = build_vlm(job)
    assert vp.apply_activation_checkpointing(model, "none") == 0
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(ValueError, match="selective"):
        vp.apply_activation_checkpointing(model, "everything")
    with pytest.raises(TypeError, match="no vlm_transformer.Transformer"):
        vp.apply_activation_checkpointing(torch.nn.Linear(2, 2), "full")


def test_generation_unaffected_by_checkpointing(job: JobConfig) -> None:
    torch.manual_seed(0)
    plain = build_vlm(job)
    torch.manual_seed(0)
    ac = build_vlm(job)
    vp.apply_activation_checkpointing(ac, "full")
    pixels, ids = w.make_batch(1, job, torch.Generator().manual_seed(1))
    out_a = plain.generate(pixels, ids[:, :4], max_new_tokens=4)
    out_b = ac.generate(pixels, ids[:, :4], max_new_tokens=4)
    assert torch.equal(out_a, out_b)


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_roundtrip_rng_and_retention(
    job: JobConfig, ctx: vp.DistContext, tmp_path: Path
) -> None:
    import random

    import numpy as np

    model = vp.build_parallel_vlm(job, ctx, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = vp.CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None
    for step in (1, 2, 3):
        w.one_local_step(model, optimizer, job)
        path = manager.save(step, model, optimizer, extra={"pos": step})
        assert (path / vp.COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000003"]
    assert manager.latest() == tmp_path / "step_000003"
    saved = w.state_copy(model)
    expected = (torch.rand(3), random.random(), np.random.rand())
    w.one_local_step(model, optimizer, job)  # moves params and the RNG
    info = manager.load(manager.latest(), model, optimizer)
    assert info == {"step": 3, "extra": {"pos": 3}, "world_size": 1}
    assert all(torch.equal(saved[k], v) for k, v in w.state_copy(model).items())
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        manager.load(tmp_path / "nope", model, optimizer)


def test_interrupted_save_keeps_previous_checkpoint(
    job: JobConfig, ctx: vp.DistContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = vp.build_parallel_vlm(job, ctx, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = vp.CheckpointManager(tmp_path, keep_last=1)
    w.one_local_step(model, optimizer, job)
    manager.save(1, model, optimizer)
    at_step_1 = w.state_copy(model)
    w.one_local_step(model, optimizer, job)

    import vlm_parallel.checkpoint as ckpt_mod

    def boom() -> dict[str, object]:
        raise OSError("disk full (simulated)")

    # DCP has written the model/optimizer shards when the per-rank file write fails.
    monkeypatch.setattr(ckpt_mod, "capture_rng_state", boom)
    with pytest.raises(OSError, match="simulated"):
        manager.save(2, model, optimizer)
    monkeypatch.undo()
    partial = tmp_path / "step_000002.tmp"
    assert not partial.exists()  # the failed save removed its partial folder
    assert manager.latest() == tmp_path / "step_000001"
    # An unmarked folder with a final-looking name is ignored as well.
    (tmp_path / "step_000009").mkdir()
    assert manager.latest() == tmp_path / "step_000001"
    (tmp_path / "step_000009").rmdir()

    fresh = vp.build_parallel_vlm(job, ctx, seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert manager.load(manager.latest(), fresh, fresh_opt)["step"] == 1
    assert all(torch.equal(at_step_1[k], v) for k, v in w.state_copy(fresh).items())

    # A retry of the same step succeeds and replaces the partial folder.
    manager.save(2, model, optimizer)
    assert manager.latest() == tmp_path / "step_000002"
    assert not partial.exists()
    assert not (tmp_path / "step_000001").exists()  # keep_last=1


def test_scheduler_state_roundtrip(job: JobConfig, ctx: vp.DistContext, tmp_path: Path) -> None:
    model = vp.build_parallel_vlm(job, ctx, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        w.one_local_step(model, optimizer, job)
        scheduler.step()
    manager = vp.CheckpointManager(tmp_path)
    manager.save(3, model, optimizer, scheduler)
    model2 = vp.build_parallel_vlm(job, ctx, seed=0)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=1, gamma=0.5)
    manager.load(manager.latest(), model2, optimizer2, scheduler2)
    assert scheduler2.last_epoch == 3
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(0.125)


def test_export_and_load_consolidated(job: JobConfig, ctx: vp.DistContext, tmp_path: Path) -> None:
    model = vp.build_parallel_vlm(job, ctx, seed=5)
    out = vp.export_consolidated(model, job, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "job.toml").is_file()
    loaded, job2 = vp.load_consolidated(out)
    assert job2 == job
    assert not loaded.training
    ref = model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())
    pixels, ids = w.make_batch(2, job, torch.Generator().manual_seed(0))
    model.eval()
    torch.testing.assert_close(loaded(pixels, ids)[0], model(pixels, ids)[0])
    with pytest.raises(FileNotFoundError):
        vp.load_consolidated(tmp_path)


def _train_steps(model: torch.nn.Module, job: JobConfig, steps: int = 2) -> list[float]:
    # SGD, not Adam: Adam turns rounding-level gradients of zero-initialised gates into
    # full-size updates, which would compare noise
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        pixels, ids = w.make_batch(2, job, gen)
        logits, labels = model(pixels, ids, labels=ids)
        loss = causal_lm_loss(logits, labels) + sum(model.auxiliary_losses().values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ["joint_decoder", "cross_attention", "mot", "moma"])
def test_compile_blocks_same_training(arch: str, ctx: vp.DistContext) -> None:
    """``parallel.compile=true`` compiles every trunk block (Inductor) and trains like eager."""
    torch._dynamo.reset()
    eager_job = JobConfig.model_validate(w.tiny_job_dict(arch))
    job = JobConfig.model_validate(w.tiny_job_dict(arch, parallel={"compile": True}))
    eager = vp.build_parallel_vlm(eager_job, ctx, seed=0)
    compiled = vp.build_parallel_vlm(job, ctx, seed=0)
    blocks = compiled.transformer.trunk.blocks()
    assert blocks and all(vp.is_compiled(b) for b in blocks)
    assert not any(vp.is_compiled(b) for b in eager.transformer.trunk.blocks())
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    got, want = _train_steps(compiled, job), _train_steps(eager, eager_job)
    assert got == pytest.approx(want, abs=1e-5)
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(RuntimeError, match="already compiled"):
        vp.apply_compile(compiled)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compile_with_activation_checkpointing(ctx: vp.DistContext, mode: str) -> None:
    torch._dynamo.reset()
    base = w.tiny_job_dict("joint_decoder")
    eager_job = JobConfig.model_validate(base)
    job = JobConfig.model_validate(
        {**base, "parallel": {"compile": True, "activation_checkpointing": mode}}
    )
    got = _train_steps(vp.build_parallel_vlm(job, ctx, seed=0), job)
    want = _train_steps(vp.build_parallel_vlm(eager_job, ctx, seed=0), eager_job)
    assert got == pytest.approx(want, abs=1e-5)
    assert vp.apply_compile(build_vlm(eager_job), enabled=False) == 0
