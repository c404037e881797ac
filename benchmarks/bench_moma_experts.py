"""Micro-benchmark: the batched MoMa expert layer vs a per-expert Python loop.

Both use the same weights, inputs and expert-choice routing
(:func:`vlm_strategies.archs.moma.reference.loop_expert_forward` is the loop).  Each
timed step is one forward + backward.  Prints both medians, the max abs difference of
outputs and input gradients, and the speed ratio (loop / batched).

    OMP_NUM_THREADS=2 python benchmarks/bench_moma_experts.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_seconds(
    steps_fns: dict[str, Callable[[], Tensor]], warmup: int, steps: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function; calls alternate between the functions
    so that load from other processes hits both alike."""
    for _ in range(warmup):
        for fn in steps_fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps_fns}
    for _ in range(steps):
        for name, fn in steps_fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=192, help="total positions (image + text)")
    parser.add_argument("--image", type=int, default=64, help="image-prefix positions")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=704, help="expert SwiGLU width")
    parser.add_argument("--experts", type=int, default=8, help="experts per modality")
    parser.add_argument("--capacity", type=float, default=None, help="default 1/experts")
    parser.add_argument("--device", default="cpu", help="e.g. cuda (timings synchronise)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vlm_strategies.archs.moma.experts import MoMaExperts
    from vlm_strategies.archs.moma.reference import loop_expert_forward

    torch.manual_seed(0)
    capacity = args.capacity if args.capacity is not None else 1.0 / args.experts
    device = torch.device(args.device)
    layer = MoMaExperts(args.dim, args.hidden, args.experts, capacity).to(device)
    for name in ("image", "text"):
        layer.group(name).init_parameters(0.02, 0.02)
    b, s = args.batch, args.seq
    x = torch.randn(b, s, args.dim, device=device, requires_grad=True)
    modality_ids = (torch.arange(s, device=device) >= args.image).long()[None].expand(b, s)
    valid = torch.ones(b, s, dtype=torch.bool, device=device)
    counts = (args.image, s - args.image)
    grad_out = torch.randn(b, s, args.dim, device=device)
    params = [x, *layer.parameters()]

    def batched() -> Tensor:
        out = layer(x, modality_ids, valid, counts)
        torch.autograd.grad(out, params, grad_out)
        return out

    def loop() -> Tensor:
        out = loop_expert_forward(layer, x, modality_ids, valid, counts)
        torch.autograd.grad(out, params, grad_out)
        return out

    out_b = layer(x, modality_ids, valid, counts)
    out_l = loop_expert_forward(layer, x, modality_ids, valid, counts)
    gx_b = torch.autograd.grad(out_b, x, grad_out)[0]
    gx_l = torch.autograd.grad(out_l, x, grad_out)[0]
    diff = (out_b - out_l).abs().max().item()
    gdiff = (gx_b - gx_l).abs().max().item()

    medians = median_step_seconds(
        {"batched": batched, "loop": loop}, args.warmup, args.steps, device
    )
    t_batched, t_loop = medians["batched"], medians["loop"]
    ks = layer.capacities(counts, s)
    print(
        f"MoMa experts: batch {b} x seq {s} (image {counts[0]}, text {counts[1]}), dim "
        f"{args.dim}, hidden {args.hidden}, {args.experts} experts/modality, k={ks}, "
        f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    n = args.steps
    print(
        f"batched (topk/index_select/bmm/index_add): {t_batched * 1e3:8.2f} ms/step (median of {n})"
    )
    print(f"per-expert Python loop:                    {t_loop * 1e3:8.2f} ms/step (median of {n})")
    print(f"outputs equal: max abs diff {diff:.2e} (input grad {gdiff:.2e})")
    print(f"speed ratio loop / batched: {t_loop / t_batched:.2f}x")


if __name__ == "__main__":
    main()
