"""The ``joint_decoder`` strategy: image prefix + dense trunk."""

from __future__ import annotations

import torch
from torch import Tensor

from vlm_strategies.api import PrefixArchImplementation
from vlm_strategies.archs.joint_decoder.config import JointDecoderConfig
from vlm_strategies.media import MediaEmbeds, scatter_fields
from vlm_transformer import ModalityContext


def prefix_key_padding(image_valid: Tensor | None, text_len: int) -> Tensor | None:
    """``(B, T)`` visual-token validity -> ``(B, T + text_len)`` key validity (text real)."""
    if image_valid is None:
        return None
    text = torch.ones(image_valid.shape[0], text_len, dtype=torch.bool, device=image_valid.device)
    return torch.cat((image_valid, text), dim=1)


class JointDecoder(PrefixArchImplementation):
    """Image embeddings enter as a prefix of the residual stream (dense trunk); a cached
    decode step feeds text only (:class:`PrefixArchImplementation`).

    Images anywhere: each image's visual tokens replace its placeholder embeddings
    (one placeholder per visual token), attention stays causal over the whole sequence
    (``prefix_bidirectional`` applies to the prefix layout only)."""

    config: JointDecoderConfig

    def context(
        self, image_embeds: Tensor, image_valid: Tensor | None, input_ids: Tensor
    ) -> ModalityContext:
        return ModalityContext(
            prefix_embeds=image_embeds,
            key_padding_mask=prefix_key_padding(image_valid, input_ids.shape[1]),
            prefix_bidirectional=self.config.prefix_bidirectional,
        )

    def media_context(self, media: MediaEmbeds) -> ModalityContext:
        return ModalityContext(**scatter_fields(media))
