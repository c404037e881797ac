"""What an arch plugin provides to the core: :class:`ArchImplementation`.

An arch's config class (torch-free, in ``vlm.archs``) names a builder
``(arch_config, model_config) -> ArchImplementation`` in its ``implementation``
class variable.  The implementation is plain Python (not an ``nn.Module``), so
sharding and checkpointing never see it.  It tells the core

(a) how image embeddings enter one decoder forward (:meth:`context`, and per decode
    step :meth:`decode_context`),
(b) how many image positions it puts into the residual stream
    (:meth:`image_positions`), and
(c) which decoder trunk it needs (:meth:`build_trunk`; ``None`` = the dense trunk).

Nothing in the core branches on which arch it holds.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from torch import Tensor

from vlm_config import ArchConfig, ModelConfig
from vlm_transformer import KVCache, ModalityContext, Trunk

if TYPE_CHECKING:
    from vlm_strategies.wrapper import VLMWrapper

__all__ = ["ArchImplementation"]


class ArchImplementation(abc.ABC):
    """Base of arch implementations.

    Attributes:
        config: the arch config it was built from.
        model_config: the decoder config.
        incremental_decoding: ``True`` when generation may feed one new token at a time
            with a KV cache; ``False`` makes :meth:`VLMWrapper.generate` recompute the
            whole sequence every step (for non-causal routing).
    """

    incremental_decoding: bool = True

    def __init__(self, config: ArchConfig, model_config: ModelConfig) -> None:
        self.config = config
        self.model_config = model_config

    def build_trunk(self) -> Trunk | None:
        """The decoder trunk this arch needs; ``None`` selects the dense trunk."""
        return None

    def image_positions(self, num_visual_tokens: int) -> int:
        """Image positions in the residual stream for ``num_visual_tokens`` visual tokens."""
        return self.config.residual_image_positions(num_visual_tokens)

    def prepare(
        self,
        wrapper: VLMWrapper,
        pixel_values: Tensor,
        input_ids: Tensor,
        frame_mask: Tensor | None = None,
    ) -> ModalityContext:
        """Turn one batch into the decoder's :class:`ModalityContext` (the strategy)."""
        embeds, valid = wrapper.encode_images(pixel_values, frame_mask)
        return self.context(embeds, valid, input_ids)

    @abc.abstractmethod
    def context(
        self, image_embeds: Tensor, image_valid: Tensor | None, input_ids: Tensor
    ) -> ModalityContext:
        """The context of a full forward.

        Args:
            image_embeds: ``(B, T, D)`` visual tokens in the decoder's dtype, frames
                concatenated in order (``T = frames * tokens_per_frame``).
            image_valid: ``(B, T)`` bool, False for tokens of padded frames; ``None``
                when every frame is real.
            input_ids: ``(B, S)`` long text tokens of this forward.
        """

    def decode_context(
        self,
        image_embeds: Tensor,
        image_valid: Tensor | None,
        new_ids: Tensor,
        cache: KVCache,
    ) -> ModalityContext | None:
        """The context of one cached decode step feeding ``new_ids (B, s)``."""
        return None
