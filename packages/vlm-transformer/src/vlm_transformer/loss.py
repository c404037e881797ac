"""Fused LM head + cross-entropy that never materialises the full ``(N, V)`` logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["linear_cross_entropy"]


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the mean loss *and* both gradients, ``chunk`` rows at a time;
    backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk: int
    ) -> Tensor:
        valid = targets != ignore_index
        count = valid.sum().clamp_min(1).to(torch.float32)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            v = valid[start : start + chunk]
            logits = torch.nn.functional.linear(h, weight).float()
            safe = torch.where(v, t, 0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            # one exp pass: p = exp(logits - max) in place, lse = max + log(sum p),
            # softmax = p / sum p
            peak = logits.amax(dim=-1, keepdim=True)
            grad = torch.exp_(logits.sub_(peak))
            norm = grad.sum(dim=-1, keepdim=True)
            lse = (peak + norm.log()).squeeze(1)
            total = total + torch.where(v, lse - picked, 0.0).sum()
            # d loss / d logits = (softmax - onehot) / count on real rows, 0 on ignored ones
            grad.mul_(v.to(grad.dtype)[:, None] / (norm * count))
            grad.scatter_add_(1, safe[:, None], (v.to(grad.dtype) / -count)[:, None])
            g = grad.to(h.dtype)
            torch.mm(g, weight.to(h.dtype), out=grad_h[start : start + chunk])
            if h.dtype == torch.float32:
                # accumulate in place, no (V, D) temporary (out= rather than addmm_,
                # which torch.utils.flop_counter does not count)
                torch.addmm(grad_w, g.t(), h, out=grad_w)
            else:
                grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return grad_out * grad_h, grad_out * grad_w, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 256,
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=...)``
    (mean over non-ignored rows) without holding the ``(N, V)`` logits or their gradient.

    The logits are computed ``chunk_size`` rows at a time; the gradients of ``hidden``
    and ``weight`` are computed in the same pass (three matmuls, as unfused) and kept
    until backward, so the extra memory is ``(N, D) + (V, D)`` instead of
    ``2 (N, V)`` float32.  Gradients flow to ``hidden`` and ``weight`` only.  The value
    equals the unfused loss up to float rounding (log-sum-exp per row in float32).

    Args:
        hidden: ``(N, D)`` final hidden states (any float dtype).
        weight: ``(V, D)`` LM-head weight.
        targets: ``(N,)`` long; ``ignore_index`` rows count neither in the sum nor in the
            mean (all ignored -> 0).
        chunk_size: rows per chunk.

    Raises:
        ValueError: shapes that do not fit together.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden (N, D) and weight (V, D), got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out: Tensor = _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_size)
    return out
