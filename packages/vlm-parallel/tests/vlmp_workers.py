"""Workers run in 1 or 2 processes by the vlm-parallel tests.

Run as ``python vlmp_workers.py <worker> <rank> <world> <port> <outdir> <json-kwargs>``
(see :func:`launch`), or call a worker in-process with ``rank=0, world=1``.  Each worker
returns a picklable result that :func:`launch` collects from ``outdir/result_<rank>.pt``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

WORKER_TIMEOUT_S = 120


def tiny_job_dict(arch: str = "joint_decoder", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 64, "max_seq_len": 64},
        "encoder": {"type": "random", "num_tokens": 16, "feature_dim": 24, "image_size": 16},
        "adapter": {"type": "mlp_2layer"},
        "arch": {"arch": arch, "max_text_len": 16},
    }
    for key, value in overrides.items():
        if key != "encoder" and isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


SIGLIP_TOWER = {
    "type": "siglip",
    "tower": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 16,
        "patch_size": 8,
    },
}


def one_local_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, job: Any) -> None:
    """One optimizer step of ``model`` on :func:`make_batch` ``(2, job)``."""
    from vlm_strategies import causal_lm_loss

    pixels, ids = make_batch(2, job)
    logits, labels = model(pixels, ids, labels=ids)
    optimizer.zero_grad()
    causal_lm_loss(logits, labels).backward()
    optimizer.step()


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model.state_dict()``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: launcher variables a worker's parent must not pass on (each worker gets its own)
LAUNCHER_VARS = frozenset(
    {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    }
)


def worker_env() -> dict[str, str]:
    """This process's environment without launcher variables, one thread, no CUDA."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    return env


def wait_all(
    procs: list[subprocess.Popen[bytes]], what: str, timeout_s: float = WORKER_TIMEOUT_S
) -> list[str]:
    """Wait for every process (one deadline for all: a hang is a collective one process
    skipped, and then every process is killed); their outputs in order.

    Raises ``RuntimeError`` naming ``what`` with each process's last output when one
    fails or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    outputs, failed = [], False
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            failed = True
        outputs.append(out.decode(errors="replace"))
        failed = failed or proc.returncode != 0
    if failed:
        logs = "\n".join(f"--- process {r} ---\n{o[-6000:]}" for r, o in enumerate(outputs))
        raise RuntimeError(f"{what} failed in {len(procs)} processes:\n{logs}")
    return outputs


def launch(worker: str, world: int, outdir: Path, **kwargs: Any) -> list[Any]:
    """Run ``worker`` in ``world`` fresh processes (gloo); results ordered by rank."""
    outdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = worker_env()
    procs = []
    for rank in range(world):
        cmd = [
            sys.executable,
            __file__,
            worker,
            str(rank),
            str(world),
            str(port),
            str(outdir),
            json.dumps(kwargs),
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    wait_all(procs, f"worker {worker!r}")
    return [torch.load(outdir / f"result_{r}.pt", weights_only=False) for r in range(world)]


def _main(argv: list[str]) -> None:
    worker, rank, world, port, outdir, kwargs = argv
    os.environ.update(
        {
            "RANK": rank,
            "LOCAL_RANK": rank,
            "WORLD_SIZE": world,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
    )
    result = WORKERS[worker](**json.loads(kwargs))
    torch.save(result, Path(outdir) / f"result_{rank}.pt")
    from vlm_parallel import destroy_distributed

    destroy_distributed()
    # Skip interpreter teardown: under heavy load a gloo background thread still alive
    # at static destruction was seen to abort one rank ("terminate called without an
    # active exception") after its result had been written and the group destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------- helpers
def make_batch(global_batch: int, job: Any, generator: torch.Generator | None = None):
    """A global batch drawn from ``generator`` (or the global RNG)."""
    size = getattr(job.encoder, "image_size", None) or job.encoder.tower["image_size"]
    pixels = torch.randn(global_batch, 3, size, size, generator=generator)
    ids = torch.randint(
        0, job.model.vocab_size, (global_batch, job.arch.max_text_len), generator=generator
    )
    return pixels, ids


def local_slice(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = tensor.shape[0] // world
    return tensor[rank * per : (rank + 1) * per]


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) parameters on every rank, as CPU tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def train_step(model, optimizer, pixels, ids, ctx) -> float:
    import torch.distributed as tdist

    # the fused LM-head + cross-entropy path of `vlm train` (an FSDP forward method)
    loss = model.loss(pixels.to(ctx.device), ids.to(ctx.device), ids.to(ctx.device))
    aux = model.auxiliary_losses()
    if aux:
        loss = loss + 0.01 * sum(aux.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    value = loss.detach().clone()
    if ctx.distributed:
        tdist.all_reduce(value)
        value /= ctx.world_size
    return float(value)


def _setup(job_dict: dict[str, Any], seed: int = 0):
    from vlm_config import JobConfig
    from vlm_parallel import build_parallel_vlm, init_distributed

    job = JobConfig.model_validate(job_dict)
    ctx = init_distributed(job.parallel)
    model = build_parallel_vlm(job, ctx, seed=seed)
    return job, ctx, model


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


# ----------------------------------------------------------------------- workers
def w_parity(job: dict[str, Any], steps: int = 5, global_batch: int = 4) -> dict[str, Any]:
    """Init params + losses of ``steps`` AdamW steps on a fixed global batch sequence."""
    job_cfg, ctx, model = _setup(job)
    init = full_params(model)
    optimizer = _optimizer(model)
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(steps):
        pixels, ids = make_batch(global_batch, job_cfg, gen)
        pixels = local_slice(pixels, ctx.rank, ctx.world_size)
        ids = local_slice(ids, ctx.rank, ctx.world_size)
        losses.append(train_step(model, optimizer, pixels, ids, ctx))
    return {"init": init, "losses": losses, "final": full_params(model)}


def w_resume(
    job: dict[str, Any],
    ckpt_dir: str,
    start: int,
    stop: int,
    save_at: int | None = None,
    resume: bool = False,
    global_batch: int = 4,
    export_dir: str | None = None,
) -> dict[str, Any]:
    """Train steps ``start+1..stop`` drawing batches from the *global* RNG (so RNG restore
    matters) with a LambdaLR scheduler; optionally resume from the latest checkpoint
    and/or save after step ``save_at``."""
    from vlm_parallel import CheckpointManager, export_consolidated

    job_cfg, ctx, model = _setup(job)
    optimizer = _optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    manager = CheckpointManager(ckpt_dir, keep_last=2)
    step = start
    loaded: dict[str, Any] | None = None
    if resume:
        path = manager.latest()
        assert path is not None, "no checkpoint to resume from"
        loaded = manager.load(path, model, optimizer, scheduler)
        step = loaded["step"]
        assert step == start, (step, start)
    result: dict[str, Any] = {"losses": {}, "loaded": loaded}
    if resume:
        result["params_after_load"] = full_params(model)
    while step < stop:
        step += 1
        pixels, ids = make_batch(global_batch, job_cfg)
        pixels = local_slice(pixels, ctx.rank, ctx.world_size)
        ids = local_slice(ids, ctx.rank, ctx.world_size)
        result["losses"][step] = train_step(model, optimizer, pixels, ids, ctx)
        scheduler.step()
        if save_at == step:
            manager.save(
                step, model, optimizer, scheduler, extra={"position": step * 10 + ctx.rank}
            )
            result["params_at_save"] = full_params(model)
    result["final"] = full_params(model)
    result["lr"] = optimizer.param_groups[0]["lr"]
    if export_dir is not None:
        export_consolidated(model, job_cfg, export_dir)
    return result


def w_freeze(job: dict[str, Any], steps: int = 4) -> dict[str, Any]:
    """Which parameter groups get gradients at each step under a freeze schedule, and
    how the encoder is stored."""
    from torch.distributed.tensor import DTensor

    from vlm_strategies import apply_freeze

    job_cfg, ctx, model = _setup(job)
    optimizer = _optimizer(model)
    gen = torch.Generator().manual_seed(7)
    result: dict[str, Any] = {
        "encoder_dtensor": [isinstance(p, DTensor) for p in model.vision_encoder.parameters()],
        "adapter_dtensor": [isinstance(p, DTensor) for p in model.adapter.parameters()],
        "steps": [],
    }
    for step in range(steps):
        apply_freeze(model, job_cfg.arch, step)
        before = full_params(model)
        pixels, ids = make_batch(4, job_cfg, gen)
        pixels = local_slice(pixels, ctx.rank, ctx.world_size)
        ids = local_slice(ids, ctx.rank, ctx.world_size)
        from vlm_strategies import causal_lm_loss

        logits, labels = model(pixels, ids, labels=ids)
        loss = causal_lm_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = {
            "encoder": any(p.grad is not None for p in model.vision_encoder.parameters()),
            "adapter": any(p.grad is not None for p in model.adapter.parameters()),
            "transformer": any(p.grad is not None for p in model.transformer.parameters()),
        }
        optimizer.step()
        after = full_params(model)
        changed = {
            group: any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))
            for group, prefix in (
                ("encoder", "vision_encoder."),
                ("adapter", "adapter."),
                ("transformer", "transformer."),
            )
        }
        result["steps"].append(
            {"grads": grads, "changed": changed, "encoder_frozen": model.encoder_frozen}
        )
    return result


def w_resume_many(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several :func:`w_resume` runs one after another in the same processes (each
    builds a fresh model and optimizer)."""
    return [w_resume(**run) for run in runs]


WORKERS = {
    "parity": w_parity,
    "resume": w_resume,
    "resume_many": w_resume_many,
    "freeze": w_freeze,
}


if __name__ == "__main__":
    _main(sys.argv[1:])
