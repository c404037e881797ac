"""Per-expert Python-loop reference of the MoMa expert layer (tests and benchmark).

:func:`loop_expert_forward` recomputes exactly what :class:`MoMaExperts.forward` does,
one expert, row and packed sample at a time (routing from the same router logits,
top-k per expert, a plain SwiGLU on the picked rows, ``index_add`` back), with no
batching over experts.
"""

from __future__ import annotations

import math
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
    segments: Tensor | None = None,
) -> Tensor:
    """Same inputs and weights as ``layer(x, modality_ids, valid, counts, noise,
    segments=segments)``; Python loops over modalities, experts, rows and (packed)
    samples: each expert takes the top ``min(k, ceil(capacity * n))`` of the ``n`` real
    candidates of every row (every sample with ``segments``; then without the static
    bound ``k``), as a plain ``topk`` on that row's (sample's) scores (no noise is
    drawn here: pass the same ``noise`` to both for a noisy comparison)."""
    b, s, _ = x.shape
    out = torch.zeros_like(x)
    ks = layer.capacities(counts, s)
    for m, name in enumerate(MOMA_MODALITIES):
        group = layer.group(name)
        if ks[m] == 0 and segments is None:
            continue
        cand = modality_ids == m
        if valid is not None:
            cand = cand & valid
        logits = F.linear(x, group.router).float()
        if noise is not None and noise[m] is not None:
            logits = logits + noise[m].float()  # type: ignore[union-attr]
        gate_ups = group.gate_up.to(x.dtype).unbind(0)  # per expert (D, 2H)
        downs = group.down.to(x.dtype).unbind(0)  # per expert (H, D)
        rows = []
        for r in range(b):
            row_out = out[r]
            spans = _spans(None if segments is None else segments[r], s)
            for e in range(group.num_experts):
                for lo, hi in spans:
                    c = cand[r, lo:hi]
                    k = math.ceil(layer.capacity * int(c.sum()) - 1e-9)
                    if segments is None:
                        k = min(k, ks[m])
                    if k == 0:
                        continue
                    scores = logits[r, lo:hi, e].masked_fill(~c, float("-inf"))
                    index = torch.topk(scores, k, sorted=True).indices + lo
                    gate = torch.sigmoid(logits[r, index, e])
                    h = x[r].index_select(0, index)
                    g, u = (h @ gate_ups[e]).chunk(2, dim=-1)
                    y = (F.silu(g) * u) @ downs[e]
                    row_out = row_out.index_add(0, index, y * gate[:, None].to(x.dtype))
            rows.append(row_out)
        out = torch.stack(rows)
    return out


def _spans(segments: Tensor | None, s: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of every contiguous run of one id (the whole row without ids)."""
    if segments is None:
        return [(0, s)]
    ids = segments.tolist()
    spans, lo = [], 0
    for i in range(1, s + 1):
        if i == s or ids[i] != ids[lo]:
            spans.append((lo, i))
            lo = i
    return spans
