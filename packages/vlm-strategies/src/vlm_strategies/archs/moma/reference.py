"""Per-expert Python-loop reference of the MoMa expert layer (tests and benchmark).

:func:`loop_expert_forward` recomputes exactly what :class:`MoMaExperts.forward` does,
one expert at a time (routing from the same router logits, top-k per expert, a plain
SwiGLU on the picked rows, ``index_add`` back), with no batching over experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm_strategies.archs.moma.config import MOMA_MODALITIES
from vlm_strategies.archs.moma.experts import MoMaExperts

__all__ = ["loop_expert_forward"]


def loop_expert_forward(
    layer: MoMaExperts,
    x: Tensor,
    modality_ids: Tensor,
    valid: Tensor | None,
    counts: Sequence[int],
    noise: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """Same inputs and weights as ``layer(x, modality_ids, valid, counts, noise)``;
    a Python loop over modalities and experts (batch rows vectorised) (no noise is drawn here:
    pass the same ``noise`` to both for a noisy comparison)."""
    b, s, _ = x.shape
    out = torch.zeros_like(x)
    ks = layer.capacities(counts, s)
    for m, name in enumerate(MOMA_MODALITIES):
        group = layer.group(name)
        k = ks[m]
        if k == 0:
            continue
        cand = modality_ids == m
        if valid is not None:
            cand = cand & valid
        logits = F.linear(x, group.router).float()
        if noise is not None and noise[m] is not None:
            logits = logits + noise[m].float()  # type: ignore[union-attr]
        rows = torch.arange(b, device=x.device)[:, None]
        flat_x = x.reshape(b * s, -1)
        flat_out = out.view(b * s, -1)
        gate_ups = group.gate_up.to(x.dtype).unbind(0)  # per expert (D, 2H)
        downs = group.down.to(x.dtype).unbind(0)  # per expert (H, D)
        for e in range(group.num_experts):
            scores = logits[..., e].masked_fill(~cand, float("-inf"))  # (B, S)
            index = torch.topk(scores, k, dim=1, sorted=True).indices  # (B, k)
            keep = cand.gather(1, index)
            gate = torch.where(keep, torch.sigmoid(logits[..., e].gather(1, index)), 0.0)
            flat = (index + rows * s).reshape(-1)
            h = torch.index_select(flat_x, 0, flat)  # (B*k, D)
            g, u = (h @ gate_ups[e]).chunk(2, dim=-1)
            y = (F.silu(g) * u) @ downs[e]
            y = y * gate.reshape(-1, 1).to(x.dtype)
            flat_out = flat_out.index_add(0, flat, y)
        out = flat_out.view(b, s, -1)
    return out
