"""Batched expert-choice, sigmoid-routed SwiGLU experts (one group per modality).

Everything is batched over experts (stacked ``(E, D, 2H)`` / ``(E, H, D)`` weights,
``torch.topk`` over the sequence, gather -> ``bmm`` -> ``index_add``); there is no
Python loop over experts and no host-device synchronisation, so the layer compiles
with ``fullgraph=True``.  :mod:`vlm_strategies.archs.moma.reference` holds the
per-expert loop it is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_strategies.archs.moma.config import MOMA_MODALITIES

__all__ = [
    "ExpertGroup",
    "GroupRouting",
    "MoMaExperts",
    "expert_capacity",
    "expert_choice_forward",
    "route_expert_choice",
    "route_expert_choice_segments",
    "router_noise",
    "row_capacity",
]


def expert_capacity(capacity: float, num_positions: int, seq_len: int) -> int:
    """Tokens each expert takes: ``min(seq_len, ceil(capacity * num_positions))``.

    ``num_positions`` is the static count of a modality's positions in the layout.
    A tiny tolerance keeps e.g. ``ceil((1/3) * 9)`` at 3.
    """
    return max(0, min(seq_len, math.ceil(capacity * num_positions - 1e-9)))


def row_capacity(capacity: float, num_positions: Tensor) -> Tensor:
    """``ceil(capacity * n)`` elementwise for a long tensor of real-position counts
    (float64, with the tolerance of :func:`expert_capacity`, so both agree)."""
    return torch.ceil(num_positions.double() * capacity - 1e-9).clamp_min(0).long()


def router_noise(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Logistic noise (difference of two standard Gumbels) for Gumbel-sigmoid routing."""
    u = torch.rand(*shape, device=device, dtype=dtype).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


@dataclass(frozen=True)
class GroupRouting:
    """The expert-choice decision of one group for one forward.

    Attributes:
        logits: ``(B, S, E)`` float32 router logits (noise included when used).
        index: ``(B, E, k)`` long picked positions per expert (descending score).
        keep: ``(B, E, k)`` bool, False for picks that landed on a non-candidate
            (other modality / padded) position; those contribute nothing.
        gate: ``(B, E, k)`` float32 ``sigmoid(logit)`` of kept picks, 0 for dropped ones.
    """

    logits: Tensor
    index: Tensor
    keep: Tensor
    gate: Tensor


def route_expert_choice(
    x: Tensor,
    router: Tensor,
    candidates: Tensor,
    k: int,
    noise: Tensor | None = None,
    limit: Tensor | None = None,
) -> GroupRouting:
    """Each of the ``E`` experts picks its top-``k`` candidate positions per sequence.

    Args:
        x: ``(B, S, D)`` (normed) hidden states.
        router: ``(E, D)`` router weights.
        candidates: ``(B, S)`` bool, positions this group may pick.
        k: picks per expert and sequence (``<= S``): a static upper bound when
            ``limit`` is given.
        noise: optional ``(B, S, E)`` added to the logits (Gumbel-sigmoid).
        limit: optional ``(B,)`` long, picks kept per row (``<= k``): the best
            ``limit[b]`` of the ``k`` (a row's own capacity, independent of the other
            rows' lengths).
    """
    logits = F.linear(x, router).float()
    if noise is not None:
        logits = logits + noise.float()
    masked = logits.masked_fill(~candidates[..., None], float("-inf")).transpose(1, 2)
    index = torch.topk(masked, k, dim=-1, sorted=True).indices  # (B, E, k)
    keep = candidates[:, None, :].expand_as(masked).gather(2, index)
    if limit is not None:
        rank = torch.arange(k, device=x.device)
        keep = keep & (rank[None, None, :] < limit[:, None, None])
    picked = logits.transpose(1, 2).gather(2, index)
    gate = torch.where(keep, torch.sigmoid(picked), torch.zeros_like(picked))
    return GroupRouting(logits=logits, index=index, keep=keep, gate=gate)


def route_expert_choice_segments(
    x: Tensor,
    router: Tensor,
    candidates: Tensor,
    segments: Tensor,
    capacity: float,
    noise: Tensor | None = None,
) -> GroupRouting:
    """Expert choice per packed sample: in every sample (a contiguous run of one id in
    ``segments``) each expert picks the top ``ceil(capacity * n)`` of the sample's
    ``n`` candidate positions, exactly what it picks when the sample runs alone.

    Data-dependent sizes: one host-device sync for the sample count and one for the
    largest number of picks per row (eager only; not for ``fullgraph`` compilation).

    Args:
        x, router, candidates, noise: see :func:`route_expert_choice`.
        segments: ``(B, S)`` long sample ids.
        capacity: fraction of a sample's candidates each expert takes.
    """
    logits = F.linear(x, router).float()
    if noise is not None:
        logits = logits + noise.float()
    b, s, e = logits.shape
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    seg = start.long().cumsum(dim=1) - 1  # (B, S) sample index 0..G-1 per row
    groups = int(seg.max()) + 1
    zeros = torch.zeros(b, groups, dtype=torch.long, device=x.device)
    k_seg = row_capacity(capacity, zeros.scatter_add(1, seg, candidates.long()))  # (B, G)
    seg_len = zeros.scatter_add(1, seg, torch.ones_like(seg))
    seg_off = seg_len.cumsum(dim=1) - seg_len
    masked = logits.masked_fill(~candidates[..., None], float("-inf")).transpose(1, 2)
    # positions grouped by sample, best score first within each sample
    order = masked.argsort(dim=-1, descending=True, stable=True)
    seg_e = seg[:, None, :].expand(b, e, s)
    regroup = seg_e.gather(2, order).argsort(dim=-1, stable=True)
    order = order.gather(2, regroup)
    seg_sorted = seg_e.gather(2, order).reshape(b, e * s)
    rank = torch.arange(s, device=x.device) - seg_off.gather(1, seg_sorted).view(b, e, s)
    take = rank < k_seg.gather(1, seg_sorted).view(b, e, s)
    chosen = torch.zeros_like(take).scatter(2, order, take) & candidates[:, None, :]
    k = max(1, int(chosen.sum(dim=-1).max()))
    scores = logits.transpose(1, 2).masked_fill(~chosen, float("-inf"))
    index = torch.topk(scores, k, dim=-1, sorted=True).indices
    keep = chosen.gather(2, index)
    picked = logits.transpose(1, 2).gather(2, index)
    gate = torch.where(keep, torch.sigmoid(picked), torch.zeros_like(picked))
    return GroupRouting(logits=logits, index=index, keep=keep, gate=gate)


def expert_choice_forward(
    x: Tensor, routing: GroupRouting, gate_up: Tensor, down: Tensor
) -> Tensor:
    """Run the ``E`` SwiGLU experts on their picks and scatter-add back.

    Args:
        x: ``(B, S, D)``.
        routing: from :func:`route_expert_choice` (``index (B, E, k)``).
        gate_up: ``(E, D, 2H)`` (``[gate | up]`` along the last dim).
        down: ``(E, H, D)``.

    Returns:
        ``(B, S, D)`` in ``x.dtype``: ``sum_e gate_e(t) * expert_e(x_t)`` over the experts
        that picked ``t`` (zero for tokens nobody picked).
    """
    b, s, d = x.shape
    e, k = routing.index.shape[1], routing.index.shape[2]
    # flat row index into (B*S, D), expert-major: (E, B*k)
    offsets = torch.arange(b, device=x.device)[:, None, None] * s
    flat = (routing.index + offsets).permute(1, 0, 2).reshape(e, b * k)
    # index_select (backward: index_add) is far faster on CPU than advanced indexing
    tokens = torch.index_select(x.reshape(b * s, d), 0, flat.reshape(-1)).view(e, b * k, d)
    # dropped picks (padded / other-modality positions) feed zeros: their gate is 0
    # anyway, and garbage in padded rows can then never reach the weights' gradients
    keep = routing.keep.permute(1, 0, 2).reshape(e, b * k, 1)
    tokens = tokens.masked_fill(~keep, 0.0)
    gu = torch.bmm(tokens, gate_up.to(x.dtype))
    gate, up = gu.chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, down.to(x.dtype))  # (E, B*k, D)
    weight = routing.gate.permute(1, 0, 2).reshape(e, b * k, 1).to(x.dtype)
    y = (y * weight).reshape(e * b * k, d)
    out = x.new_zeros(b * s, d).index_add(0, flat.reshape(-1), y)
    return out.view(b, s, d)


class ExpertGroup(nn.Module):
    """One modality's ``E`` expert-choice SwiGLU experts with a sigmoid router.

    Parameters: ``router (E, D)``, ``gate_up (E, D, 2H)`` (``[gate | up]``), ``down
    (E, H, D)``, initialised by :meth:`init_parameters` (the
    :func:`vlm_transformer.init_module_tree` hook): router and ``gate_up`` with
    ``normal(0, std)``, ``down`` (an output projection) with ``normal(0, output_std)``.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.router = nn.Parameter(torch.empty(num_experts, dim))
        self.gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    @torch.no_grad()
    def init_parameters(self, std: float, output_std: float) -> None:
        nn.init.normal_(self.router, mean=0.0, std=std)
        nn.init.normal_(self.gate_up, mean=0.0, std=std)
        nn.init.normal_(self.down, mean=0.0, std=output_std)

    def route(
        self,
        x: Tensor,
        candidates: Tensor,
        k: int,
        noise: Tensor | None = None,
        limit: Tensor | None = None,
    ) -> GroupRouting:
        return route_expert_choice(x, self.router, candidates, k, noise, limit)

    def forward(self, x: Tensor, routing: GroupRouting) -> Tensor:
        return expert_choice_forward(x, routing, self.gate_up, self.down)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, dim={self.dim}, hidden={self.hidden_dim}"


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1).to(values.dtype)


class MoMaExperts(nn.Module):
    """The per-modality expert groups of one MoMa layer (``experts.image``,
    ``experts.text``).

    ``forward(x (B,S,D), modality_ids (B,S) long, valid (B,S) bool | None, counts,
    segments=None)`` returns the summed expert outputs ``(B, S, D)``.  Capacity is per
    row: each expert of modality ``m`` keeps ``ceil(capacity * n_m)`` picks, ``n_m`` the
    row's *real* (``valid``) positions of modality ``m``, so padding and the other rows'
    lengths never change a row's routing; ``counts[m]`` is a static upper bound of
    ``n_m`` (the layout's positions of ``m``) that sizes the top-k (no host sync).
    With ``segments (B, S)`` long (packing) the capacity and the picks are per sample
    (:func:`route_expert_choice_segments`).  Rows with ``valid == False`` are zeroed
    before routing, never picked, and get zero output, so whatever they hold reaches
    neither real outputs nor any gradient.

    After each forward, :attr:`stats` holds detached per-modality routing statistics
    (``utilisation (E,)``: fraction of the modality's real tokens each expert
    processed; ``coverage``: fraction picked by at least one expert) and :attr:`aux`
    the (unweighted, differentiable) ``z_loss`` and ``selection_loss`` per modality.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        capacity: float,
        *,
        gumbel_noise: bool = False,
        selection_loss: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < capacity <= 1:
            raise ValueError(f"capacity must be in (0, 1], got {capacity}")
        self.capacity = capacity
        self.gumbel_noise = gumbel_noise
        self.selection_loss = selection_loss
        for name in MOMA_MODALITIES:  # submodules ``image``, ``text``: stable names
            self.add_module(name, ExpertGroup(dim, hidden_dim, num_experts))
        self.stats: dict[str, dict[str, Tensor]] = {}
        self.aux: dict[str, dict[str, Tensor]] = {}

    def group(self, name: str) -> ExpertGroup:
        """The :class:`ExpertGroup` of modality ``name``."""
        module = getattr(self, name)
        assert isinstance(module, ExpertGroup)
        return module

    def capacities(self, counts: Sequence[int], seq_len: int) -> list[int]:
        """``k`` per modality for static modality counts and sequence length."""
        return [expert_capacity(self.capacity, n, seq_len) for n in counts]

    def candidates(self, modality_ids: Tensor, valid: Tensor | None) -> list[Tensor]:
        """``(B, S)`` bool candidate masks per modality (tag matches and position real)."""
        out = []
        for m in range(len(MOMA_MODALITIES)):
            cand = modality_ids == m
            out.append(cand if valid is None else cand & valid)
        return out

    def forward(
        self,
        x: Tensor,
        modality_ids: Tensor,
        valid: Tensor | None,
        counts: Sequence[int],
        noise: Sequence[Tensor | None] | None = None,
        segments: Tensor | None = None,
    ) -> Tensor:
        """Sum of the modality groups' outputs.

        Args:
            noise: per modality an optional ``(B, S, E)`` router noise; by default
                drawn when training with ``gumbel_noise``.
            segments: ``(B, S)`` long packed-sample ids (routing per sample).
        """
        if len(counts) != len(MOMA_MODALITIES):
            raise ValueError(f"counts must give {len(MOMA_MODALITIES)} modality sizes")
        b, s, _ = x.shape
        if valid is not None:  # padded rows hold garbage: keep it out of every gradient
            x = x.masked_fill(~valid[..., None], 0.0)
        out = torch.zeros_like(x)
        stats: dict[str, dict[str, Tensor]] = {}
        aux: dict[str, dict[str, Tensor]] = {}
        for m, (name, cand, k) in enumerate(
            zip(MOMA_MODALITIES, self.candidates(modality_ids, valid), self.capacities(counts, s))
        ):
            group = self.group(name)
            e = group.num_experts
            if k == 0:
                continue
            if noise is not None:
                eps = noise[m]
            elif self.gumbel_noise and self.training:
                eps = router_noise((b, s, e), x.device, torch.float32)
            else:
                eps = None
            if segments is not None:
                routing = route_expert_choice_segments(
                    x, group.router, cand, segments, self.capacity, eps
                )
            else:
                limit = row_capacity(self.capacity, cand.sum(dim=1)).clamp_max(k)
                routing = group.route(x, cand, k, eps, limit)
            out = out + group(x, routing)
            clean = routing.logits if eps is None else routing.logits - eps.float()
            with torch.no_grad():
                picked = torch.zeros(b, e, s, device=x.device, dtype=torch.bool)
                picked = picked.scatter(2, routing.index, routing.keep)
                real = cand.sum().clamp_min(1).float()
                stats[name] = {
                    "utilisation": picked.sum(dim=(0, 2)).float() / real,
                    "coverage": (picked.any(dim=1) & cand).sum().float() / real,
                }
            entry = {"z_loss": _masked_mean(torch.logsumexp(clean, dim=-1).square(), cand)}
            if self.selection_loss:
                bce = F.binary_cross_entropy_with_logits(
                    clean, picked.transpose(1, 2).float(), reduction="none"
                ).mean(dim=-1)
                entry["selection_loss"] = _masked_mean(bce, cand)
            aux[name] = entry
        self.stats = stats
        self.aux = aux
        return out
