"""The training loop: one process, or many under ``torchrun`` (FSDP2 via vlm-parallel).

Per optimiser step: the step's global batch (:class:`GlobalBatchSampler`) is split into
``grad_accum_steps`` micro-batches, each sharded over ranks; loss = causal LM loss +
weighted trunk auxiliary losses; gradients are clipped, AdamW steps, the warmup+cosine
schedule advances.  Freeze-schedule stages switch the trainable set at step boundaries.
Checkpoints go through ``vlm_parallel.CheckpointManager`` (atomic); rerunning the same
command resumes from the latest one.  SIGTERM / Ctrl-C save a checkpoint at the next
step boundary and stop.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_config import JobConfig, dump_toml, write_toml
from vlm_strategies import apply_freeze, freeze_specs_at
from vlm_train.data import GlobalBatchSampler, ImageTextCollator
from vlm_train.evaluate import EvalResult, evaluate, format_eval
from vlm_train.plot import plot_loss_curve, read_metrics
from vlm_train.schedule import lr_factor
from vlm_train.sources import build_datasets, build_tokenizer

__all__ = ["TrainResult", "build_optimizer", "train"]


@dataclass
class TrainResult:
    """What a call to :func:`train` did.

    Attributes:
        step: optimiser steps completed (== ``train.steps`` unless interrupted).
        interrupted: the signal number that stopped the run, or ``None``.
        eval: held-out result at the end (``None`` when interrupted or disabled).
    """

    run_dir: Path
    step: int
    resumed_from: int | None
    interrupted: int | None
    eval: EvalResult | None
    elapsed_s: float
    final_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def build_optimizer(model: nn.Module, job: JobConfig) -> torch.optim.Optimizer:
    """AdamW over every parameter (frozen ones get no gradient and stay untouched, and
    may be unfrozen later by the freeze schedule); no weight decay on 1-D parameters."""
    cfg = job.train
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, foreach=True
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, job: JobConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    cfg = job.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio
        ),
    )


class _StopFlag:
    """SIGTERM / SIGINT -> stop at the next step boundary (handlers restored on exit)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _sync_flag(value: int, world_size: int) -> int:
    if world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _mean_over_ranks(values: list[float], world_size: int) -> list[float]:
    if world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world_size).tolist()


class _Metrics:
    """metrics.jsonl on the main rank (records past the resume step dropped)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            kept = [r for r in kept if not (r.get("kind") == "eval" and r.get("final"))]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            tmp.replace(path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def train(
    job: JobConfig,
    *,
    log: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train ``job`` to ``train.steps`` (resuming from ``train.output_dir`` when possible),
    then evaluate on the held-out split, export the model and plot the loss curve.

    Every rank of a ``torchrun`` job calls this with the same config.

    Args:
        log: where the main rank's messages go.
        stop_after_steps: run at most this many steps in this call, then save a
            checkpoint and return as if interrupted (``interrupted == 0``); for
            time-sliced jobs and resume tests.
    """
    from vlm_parallel import (
        CheckpointManager,
        build_parallel_vlm,
        destroy_distributed,
        export_consolidated,
        init_distributed,
    )

    t0 = time.perf_counter()
    cfg = job.train
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    dist_ctx = init_distributed(job.parallel)
    try:
        rank, world, device = dist_ctx.rank, dist_ctx.world_size, dist_ctx.device
        is_main = dist_ctx.is_main
        say = log if is_main else (lambda _msg: None)
        micro_global = cfg.batch_size // cfg.grad_accum_steps
        if micro_global % world:
            from vlm_train.errors import VLMTrainError

            raise VLMTrainError(
                f"train.batch_size / grad_accum_steps = {micro_global} is not divisible by "
                f"the world size {world}"
            )
        run_dir = Path(cfg.output_dir)
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            saved_job = run_dir / "job.toml"
            if cfg.resume and saved_job.is_file() and saved_job.read_text() != dump_toml(job):
                say(
                    f"warning: {saved_job} differs from this config; resuming its checkpoints "
                    "anyway (train.resume=false or a new train.output_dir starts afresh)"
                )
            write_toml(job, saved_job)
        _barrier(world)

        torch.manual_seed(cfg.seed)
        model = build_parallel_vlm(job, dist_ctx, cfg.seed)
        preprocess = model.vision_encoder.preprocess
        datasets = build_datasets(job, preprocess)
        train_set, test_set = datasets["train"], datasets.get("test")
        tok_path = run_dir / "tokenizer.json"
        if is_main:
            tokenizer = build_tokenizer(job, train_set, saved=tok_path)
            tokenizer.save(tok_path)
        _barrier(world)
        if not is_main:
            tokenizer = build_tokenizer(job, None, saved=tok_path)
        collator = ImageTextCollator(tokenizer, job.arch.max_text_len)
        if job.data.source in ("digits", "digits_video"):
            # fail early on captions that do not fit (cheap for the embedded data)
            for caption in set(train_set.captions()):
                collator.encode(job.data.prompt, caption)

        optimizer = build_optimizer(model, job)
        scheduler = build_scheduler(optimizer, job)
        ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.keep_checkpoints)
        start = 0
        resumed_from: int | None = None
        latest = ckpt.latest() if cfg.resume else None
        if latest is not None:
            state = ckpt.load(latest, model, optimizer, scheduler)
            start = int(state["step"])
            resumed_from = start
            say(f"resumed from {latest} (step {start}/{cfg.steps})")
        stage = freeze_specs_at(job.arch, start)
        if start:
            apply_freeze(model, job.arch, start)
        metrics = _Metrics(run_dir / "metrics.jsonl", is_main, start)

        lengths = getattr(train_set, "lengths", None)
        sampler = GlobalBatchSampler(
            len(train_set),
            cfg.batch_size,
            seed=cfg.seed,
            lengths=lengths() if callable(lengths) else None,
            curriculum_steps=job.data.curriculum_steps,
        )
        autocast: Any = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if cfg.autocast_bf16
            else contextlib.nullcontext()
        )
        positions = getattr(model, "num_image_positions", 0) + job.arch.max_text_len
        params = [p for p in model.parameters()]
        if is_main:
            n_params = sum(p.numel() for p in params)
            say(
                f"training {job.name}: arch={job.arch.arch} params={n_params / 1e6:.2f}M "
                f"train={len(train_set)} test={len(test_set) if test_set else 0} "
                f"world={world} steps={cfg.steps} batch={cfg.batch_size}"
            )

        bar = None
        if is_main and cfg.progress and start < cfg.steps:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0
            )
        interrupted: int | None = None
        window_loss, window_n, window_tokens = 0.0, 0, 0
        window_t = time.perf_counter()
        last_loss: float | None = None
        model.train()
        step = start
        with _StopFlag() as stop:
            while step < cfg.steps:
                new_stage = freeze_specs_at(job.arch, step)
                if new_stage != stage:
                    apply_freeze(model, job.arch, step)
                    stage = new_stage
                    say(f"step {step}: freeze schedule stage applied")
                step_loss = 0.0
                aux_logged: dict[str, float] = {}
                for micro in range(cfg.grad_accum_steps):
                    idx = sampler.shard(step, micro, cfg.grad_accum_steps, rank, world)
                    batch = collator([train_set[i] for i in idx])
                    gen = torch.Generator().manual_seed(
                        (cfg.seed * 1_000_003 + step) * 1009 + micro * 31 + rank
                    )
                    batch["pixel_values"] = train_set.augment(batch["pixel_values"], gen)
                    frame_mask = batch["frame_mask"]
                    with autocast:
                        # LM head fused with the cross-entropy: no (B, S, V) logits held
                        loss = model.loss(
                            batch["pixel_values"].to(device),
                            batch["input_ids"].to(device),
                            batch["labels"].to(device),
                            None if frame_mask is None else frame_mask.to(device),
                        )
                        total = loss
                        for name, value in model.auxiliary_losses().items():
                            weight = cfg.aux_loss_weights.get(name, 1.0)
                            if weight:
                                total = total + weight * value.float()
                            aux_logged[name] = aux_logged.get(name, 0.0) + float(value.detach())
                    (total / cfg.grad_accum_steps).backward()
                    step_loss += float(loss.detach()) / cfg.grad_accum_steps
                    window_tokens += len(idx) * positions * world
                if not math.isfinite(step_loss):
                    from vlm_train.errors import VLMTrainError

                    raise VLMTrainError(f"the loss became {step_loss} at step {step}")
                trainable = [p for p in params if p.grad is not None]
                if cfg.grad_clip is not None and trainable:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                last_loss = step_loss
                window_loss += step_loss
                window_n += 1

                if step % cfg.log_every == 0 or step == cfg.steps:
                    (avg,) = _mean_over_ranks([window_loss / window_n], world)
                    dt = max(time.perf_counter() - window_t, 1e-9)
                    lr = optimizer.param_groups[0]["lr"]
                    record: dict[str, Any] = {
                        "kind": "train",
                        "step": step,
                        "loss": avg,
                        "lr": lr,
                        "tokens_per_s": window_tokens / dt,
                        "time_s": time.perf_counter() - t0,
                    }
                    if aux_logged:
                        record["aux"] = {k: v / cfg.grad_accum_steps for k, v in aux_logged.items()}
                    metrics.write(record)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{avg:.4f}",
                            tok_s=f"{window_tokens / dt:.0f}",
                            lr=f"{lr:.2e}",
                            refresh=False,
                        )
                    window_loss, window_n, window_tokens = 0.0, 0, 0
                    window_t = time.perf_counter()
                if bar is not None:
                    bar.update(1)

                stop_now = _sync_flag(stop.signum or 0, world)
                if (
                    not stop_now
                    and stop_after_steps is not None
                    and step - start >= stop_after_steps
                    and step < cfg.steps
                ):
                    stop_now = -1
                periodic = cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0
                if stop_now or (periodic and step < cfg.steps):
                    ckpt.save(step, model, optimizer, scheduler, extra={"loss": last_loss})
                if stop_now:
                    interrupted = max(stop_now, 0)
                    break
                if (
                    cfg.eval_every
                    and step % cfg.eval_every == 0
                    and step < cfg.steps
                    and test_set is not None
                ):
                    interim = _eval(model, test_set, collator, job, dist_ctx)
                    metrics.write({"kind": "eval", "step": step, **_short(interim)})
                    say(f"step {step}: " + format_eval(interim)[0])
                    model.train()
        if bar is not None:
            bar.close()
        if interrupted is not None:
            why = f"signal {interrupted}" if interrupted else "stop_after_steps"
            say(
                f"stopped by {why} at step {step}/{cfg.steps}; checkpoint saved "
                f"in {run_dir / 'checkpoints'}; rerun the same command to resume"
            )
            return TrainResult(
                run_dir, step, resumed_from, interrupted, None, time.perf_counter() - t0, last_loss
            )
        if start < cfg.steps:
            ckpt.save(step, model, optimizer, scheduler, extra={"loss": last_loss})

        result: EvalResult | None = None
        if cfg.eval_at_end and test_set is not None:
            result = _eval(model, test_set, collator, job, dist_ctx)
            metrics.write({"kind": "eval", "step": step, "final": True, **_short(result)})
            if is_main:
                (run_dir / "eval.json").write_text(
                    json.dumps({"step": step, **result.to_dict()}, indent=2), encoding="utf-8"
                )
        if cfg.export:
            export_consolidated(model, job, run_dir / "final")
            if is_main:
                tokenizer.save(run_dir / "final" / "tokenizer.json")
        if is_main:
            try:
                plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", title=job.name)
            except Exception as exc:  # a plotting problem must not lose a finished run
                say(f"warning: could not plot the loss curve: {exc}")
        _barrier(world)
        return TrainResult(
            run_dir, step, resumed_from, None, result, time.perf_counter() - t0, last_loss
        )
    finally:
        destroy_distributed()


def _short(result: EvalResult) -> dict[str, Any]:
    d = result.to_dict()
    d.pop("examples", None)
    return d


def _eval(
    model: nn.Module, dataset: Any, collator: ImageTextCollator, job: JobConfig, dist_ctx: Any
) -> EvalResult:
    return evaluate(
        model,
        dataset,
        collator,
        batch_size=job.data.eval_batch_size,
        max_samples=job.data.max_eval_samples,
        rank=dist_ctx.rank,
        world_size=dist_ctx.world_size,
        device=dist_ctx.device,
        autocast_bf16=job.train.autocast_bf16,
    )
