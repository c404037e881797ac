"""The trunk extension point: the layer stack + final norm an arch supplies."""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from vlm_config import ModelConfig
from vlm_transformer.block import DecoderBlock
from vlm_transformer.cache import KVCache, LayerKVCache
from vlm_transformer.context import ModalityContext
from vlm_transformer.init import init_module_tree
from vlm_transformer.masks import AttentionMask
from vlm_transformer.norms import build_norm

__all__ = ["DenseTrunk", "Trunk", "TrunkInputs"]


@dataclass(frozen=True)
class TrunkInputs:
    """Per-forward state shared by all layers of a trunk.

    Attributes:
        cos, sin: ``(B|1, S, head_dim)`` float32 rotary tables of this forward's positions.
        mask: the self-attention :class:`AttentionMask` over ``(S, past_len + S)``.
        positions: ``(B|1, S)`` long rotary positions.
        context: the forward's :class:`ModalityContext` (or ``None``).
        cache: the :class:`KVCache` (or ``None``); layers use ``cache.layer(key)``.
        prefix_len: ``P``, positions of this forward that came from ``prefix_embeds``.
        past_len: cached slots before this forward (0 without a cache).
        output_from: the caller reads only positions ``>= output_from`` of the trunk's
            output (prefix positions that get no logits, or all but the last
            ``logits_to_keep``).  A trunk may skip the last layer's work for the earlier
            positions and return ``(B, S - output_from, D)`` instead of ``(B, S, D)``
            (their keys and values still feed attention); a trunk whose last layer mixes
            positions beyond attention (e.g. expert-choice routing over the sequence)
            ignores it and returns all ``S``.
    """

    cos: Tensor
    sin: Tensor
    mask: AttentionMask
    positions: Tensor
    context: ModalityContext | None = None
    cache: KVCache | None = None
    prefix_len: int = 0
    past_len: int = 0
    output_from: int = 0


class Trunk(nn.Module, abc.ABC):
    """Abstract trunk: owns ``layers`` (``nn.ModuleDict`` keyed ``"0"``, ``"1"``, ... so
    parameter names stay stable) and the final ``norm``.

    Constructed as ``YourTrunk(config, ...)``; the base constructor only stores
    ``config``: the subclass's ``__init__`` calls ``super().__init__(config)`` and then
    creates ``self.layers`` and ``self.norm`` itself (e.g. ``nn.ModuleDict({str(i):
    DecoderBlock(config) for i in range(config.n_layers)})`` and
    ``build_norm(config.norm_type, config.dim, config.norm_eps)``). An arch returns the
    trunk from ``ArchImplementation.build_trunk()``; the model builder constructs it
    under the target device (``meta`` for deferred initialisation).

    Subclasses implement :meth:`forward` (which must apply ``self.norm`` last). The
    defaults of :meth:`blocks`, :meth:`auxiliary_losses` and :meth:`init_weights` fit
    most trunks.

    Args:
        config: the decoder config (``dim``, ``n_layers``, norms, ...).

    Attributes:
        scale_output_init: when ``True`` (default) output projections are initialised
            with ``init_std / sqrt(2 * n_layers)``.
    """

    layers: nn.ModuleDict
    norm: nn.Module
    scale_output_init: bool = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    @abc.abstractmethod
    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        """``hidden (B, S, D) -> (B, S, D)`` (or ``(B, S - state.output_from, D)``) after
        all layers and the final norm."""

    def blocks(self) -> list[nn.Module]:
        """The repeatable units (activation checkpointing / FSDP2 wrap each one)."""
        return list(self.layers.values())

    def layer_calls(
        self, state: TrunkInputs
    ) -> Iterator[tuple[nn.Module, LayerKVCache | None, int]]:
        """Each of ``layers`` in order with its KV-cache slot (``None`` without a cache)
        and the ``output_from`` it should honour: ``state.output_from`` for the last
        layer, 0 for the others."""
        cache = state.cache
        last = len(self.layers) - 1
        for i, (name, layer) in enumerate(self.layers.items()):
            layer_cache = None if cache is None else cache.layer(name)
            yield layer, layer_cache, state.output_from if i == last else 0

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Extra scalar losses collected during the last forward (MoE balance, z-loss).
        Dense trunks return ``{}``; the training loop adds each (already weighted) term."""
        return {}

    def init_weights(self) -> None:
        """(Re-)initialise every parameter of the trunk (see :mod:`vlm_transformer.init`)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers) if self.scale_output_init else std
        init_module_tree(self, std, out_std)


class DenseTrunk(Trunk):
    """``n_layers`` :class:`DecoderBlock` s followed by the final norm.

    Honours ``state.output_from``: the last block runs its attention output projection,
    MLP and the final norm on the kept positions only.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleDict({str(i): DecoderBlock(config) for i in range(config.n_layers)})
        self.norm = build_norm(config.norm_type, config.dim, config.norm_eps)

    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        for layer, layer_cache, output_from in self.layer_calls(state):
            hidden = layer(hidden, state, layer_cache, output_from)
        return self.norm(hidden)
