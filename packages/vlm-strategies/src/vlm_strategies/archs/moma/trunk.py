"""The MoMa trunk: shared attention + per-modality expert-choice FFN experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm_config import ModelConfig
from vlm_strategies.archs.moma.config import MOMA_MODALITIES, MoMaConfig
from vlm_strategies.archs.moma.experts import MoMaExperts
from vlm_transformer import Attention, Trunk, TrunkInputs, build_norm

__all__ = ["MoMaBlock", "MoMaTrunk"]


class MoMaBlock(nn.Module):
    """``h = x + attn(attn_norm(x)); out = h + experts(mlp_norm(h))``.

    ``attn`` is one dense :class:`~vlm_transformer.Attention` shared by all modalities;
    ``experts`` is a :class:`MoMaExperts` (one expert-choice group per modality).
    """

    def __init__(self, config: ModelConfig, arch: MoMaConfig) -> None:
        super().__init__()
        self.attn_norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.experts = MoMaExperts(
            config.dim,
            arch.expert_hidden_dim or config.hidden_dim,
            arch.experts_per_modality,
            arch.resolved_capacity,
            gumbel_noise=arch.gumbel_noise,
            selection_loss=arch.aux_loss and arch.selection_loss_weight > 0,
        )

    def forward(
        self,
        x: Tensor,
        state: TrunkInputs,
        modality_ids: Tensor,
        valid: Tensor | None,
        counts: tuple[int, int] | None = None,
    ) -> Tensor:
        """``counts``: static upper bounds of the (image, text) positions per row;
        default the prefix layout ``(prefix_len, S - prefix_len)``."""
        x = x + self.attn(self.attn_norm(x), state.cos, state.sin, state.mask, None)
        s = x.shape[1]
        if counts is None:
            counts = (state.prefix_len, s - state.prefix_len)
        ctx = state.context
        segments = None if ctx is None else ctx.sequence_ids
        return x + self.experts(self.mlp_norm(x), modality_ids, valid, counts, segments=segments)


class MoMaTrunk(Trunk):
    """``n_layers`` :class:`MoMaBlock` s (``layers."0"`` ...) and the final ``norm``.

    Modalities come from ``context.modality_ids`` (0 = image, 1 = text; default: the
    ``prefix_len`` prefix positions are image, the rest text) and real positions from
    ``context.key_padding_mask``.  Each expert keeps ``ceil(capacity * n)`` picks of
    the ``n`` real positions of its modality in its row, so a left-padded row routes
    exactly as the row alone; the top-k is sized by the static layout (image:
    ``prefix_len`` positions, text: the rest; ``S`` each for images anywhere), so no
    host-device sync is needed.  With ``context.sequence_ids`` (packing) capacity and
    picks are per sample, as if each sample ran alone (two host syncs per layer).

    Expert-choice routing is non-causal, so a :class:`~vlm_transformer.KVCache` is
    rejected: decode by recomputing the full sequence (``VLMWrapper.generate`` does).
    """

    def __init__(self, config: ModelConfig, arch: MoMaConfig) -> None:
        super().__init__(config)
        self.arch = arch
        self.layers = nn.ModuleDict(
            {str(i): MoMaBlock(config, arch) for i in range(config.n_layers)}
        )
        self.norm = build_norm(config.norm_type, config.dim, config.norm_eps)

    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        if state.cache is not None:
            raise ValueError(
                "MoMa's expert-choice routing is non-causal and cannot decode with a KV "
                "cache; recompute the full sequence each step (VLMWrapper.generate does)"
            )
        b, s, _ = hidden.shape
        ctx = state.context
        modality_ids = None if ctx is None else ctx.modality_ids
        counts = (state.prefix_len, s - state.prefix_len)
        if modality_ids is None:
            is_text = torch.arange(s, device=hidden.device) >= state.prefix_len
            modality_ids = is_text.long()[None].expand(b, s)
        elif state.prefix_len == 0:
            counts = (s, s)  # images anywhere: any position may hold either modality
        valid = None if ctx is None else ctx.key_padding_mask
        for layer in self.layers.values():
            hidden = layer(hidden, state, modality_ids, valid, counts)
        return self.norm(hidden)

    def _experts(self) -> list[tuple[str, MoMaExperts]]:
        out = []
        for name, layer in self.layers.items():
            experts = layer.experts
            assert isinstance(experts, MoMaExperts)
            out.append((name, experts))
        return out

    def expert_utilisation(self) -> dict[str, Tensor]:
        """Last forward's fraction of real tokens each expert processed:
        ``"layers.<i>.<modality>" -> (E,)`` (detached; sums to about
        ``E * capacity`` with no padding)."""
        return {
            f"layers.{name}.{m}": experts.stats[m]["utilisation"]
            for name, experts in self._experts()
            for m in MOMA_MODALITIES
            if m in experts.stats
        }

    def token_coverage(self) -> dict[str, Tensor]:
        """Last forward's fraction of real tokens picked by at least one expert:
        ``"layers.<i>.<modality>" -> ()`` (detached)."""
        return {
            f"layers.{name}.{m}": experts.stats[m]["coverage"]
            for name, experts in self._experts()
            for m in MOMA_MODALITIES
            if m in experts.stats
        }

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Weighted router losses of the last forward, each the mean over layers and
        modalities: ``moma_z_loss`` (``z_loss_weight > 0``) and ``moma_selection_loss``
        (``selection_loss_weight > 0``); ``{}`` with ``aux_loss=False`` or before any
        forward."""
        if not self.arch.aux_loss:
            return {}
        weights = {
            "z_loss": self.arch.z_loss_weight,
            "selection_loss": self.arch.selection_loss_weight,
        }
        losses: dict[str, Tensor] = {}
        for key, weight in weights.items():
            if weight <= 0:
                continue
            terms = [
                entry[key]
                for _, experts in self._experts()
                for entry in experts.aux.values()
                if key in entry
            ]
            if terms:
                losses[f"moma_{key}"] = weight * torch.stack(terms).mean()
        return losses
