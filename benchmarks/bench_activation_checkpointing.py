"""Activation checkpointing benchmark: peak memory and step time, none / selective / full.

One process, one model (by default a joint-decoder VLM: random encoder -> mlp_2layer
adapter -> decoder, dim 256, 4 layers, 64 image + 192 text = 256 positions, batch 8,
vocab 1024; ``--arch`` picks any installed arch), identical weights and batch for every
mode; AC applied with ``vlm_parallel.apply_activation_checkpointing`` ("full": each trunk
block recomputed; "selective": each trunk block under the op-level policy that keeps
matmul outputs and recomputes attention kernels and elementwise work).  Modes alternate
step by step so that machine drift hits all of them equally.

    OMP_NUM_THREADS=2 python benchmarks/bench_activation_checkpointing.py --threads 2
    OMP_NUM_THREADS=2 python benchmarks/bench_activation_checkpointing.py --threads 2 --arch mot

Two passes over the same models.  Timing first, under the default allocator: step
time is the median wall time of forward + backward + AdamW step.  Then memory: glibc is
switched to serve every block of 64 KiB or more with its own ``mmap`` and to return it
on free (:func:`peak_rss.mmap_large_allocations`), so the resident set size follows the
live tensor bytes; "peak" is the kernel's RSS high-water mark during forward + backward
(reset just before) minus the RSS just before the forward (parameters, gradients from
the previous step and optimizer state are already resident, so the number is the
activation + temporary memory of one step); "after fwd" is the RSS growth right after
the forward (the activations kept for backward).  Memory is measured after timing
because page-faulting fresh pages on every allocation slows a step down by tens of
percent.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import torch
from peak_rss import PeakRSS, malloc_trim, mmap_large_allocations, rss_bytes

from vlm_config import JobConfig
from vlm_parallel import apply_activation_checkpointing
from vlm_strategies import build_vlm, causal_lm_loss

MODES = ("none", "selective", "full")


def job_config(args: argparse.Namespace) -> JobConfig:
    image_tokens = 64
    return JobConfig.model_validate(
        {
            "model": {
                "dim": args.dim,
                "n_layers": args.layers,
                "n_heads": 8,
                "vocab_size": 1024,
                "max_seq_len": args.seq,
            },
            "encoder": {
                "type": "random",
                "num_tokens": image_tokens,
                "feature_dim": 128,
                "image_size": 32,
            },
            "adapter": {"type": "mlp_2layer"},
            "arch": {"arch": args.arch, "max_text_len": args.seq - image_tokens},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="joint_decoder", help="any installed arch")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    job = job_config(args)

    models = {}
    optimizers = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = build_vlm(job)
        apply_activation_checkpointing(model, mode)
        models[mode] = model
        optimizers[mode] = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, 32, 32, generator=gen)
    ids = torch.randint(0, 1024, (args.batch, job.arch.max_text_len), generator=gen)

    times: dict[str, list[float]] = {m: [] for m in MODES}
    peaks: dict[str, list[int]] = {m: [] for m in MODES}
    after_fwd: dict[str, list[int]] = {m: [] for m in MODES}
    losses: dict[str, float] = {}

    def step(mode: str, memory: bool) -> None:
        model, optimizer = models[mode], optimizers[mode]
        optimizer.zero_grad(set_to_none=False)  # grads stay resident: not counted
        if memory:
            gc.collect()
            malloc_trim()
        base = rss_bytes()
        start = time.perf_counter()
        with PeakRSS() if memory else contextlib.nullcontext() as peak:
            logits, labels = model(pixels, ids, labels=ids)
            loss = causal_lm_loss(logits, labels)
            fwd = rss_bytes() - base
            loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if memory:
            assert peak is not None
            peaks[mode].append(peak.peak - base)
            after_fwd[mode].append(fwd)
        else:
            times[mode].append(elapsed)
        losses[mode] = loss.item()

    for _ in range(args.warmup + args.steps):  # timing pass
        for mode in MODES:
            step(mode, memory=False)
    for mode in MODES:
        del times[mode][: args.warmup]
    mmap_large_allocations()
    for _ in range(1 + args.memory_steps):  # memory pass (the first step is not counted)
        for mode in MODES:
            step(mode, memory=True)
    for mode in MODES:
        del peaks[mode][0], after_fwd[mode][0]

    mib = 1024 * 1024
    print(
        f"model: {args.arch}, dim {args.dim}, {args.layers} layers, seq {args.seq}, "
        f"batch {args.batch}; "
        f"threads {torch.get_num_threads()}; {args.steps} measured steps per mode"
    )
    print(
        f"{'mode':<10} {'step ms':>9} {'x none':>7} {'peak MiB':>9} {'x none':>7} "
        f"{'after fwd MiB':>14} {'loss':>8}"
    )
    base_t = statistics.median(times["none"])
    base_m = statistics.median(peaks["none"])
    for mode in MODES:
        t = statistics.median(times[mode])
        m = statistics.median(peaks[mode])
        f = statistics.median(after_fwd[mode])
        print(
            f"{mode:<10} {t * 1e3:9.1f} {t / base_t:7.2f} {m / mib:9.1f} {m / base_m:7.2f} "
            f"{f / mib:14.1f} {losses[mode]:8.4f}"
        )


if __name__ == "__main__":
    main()
