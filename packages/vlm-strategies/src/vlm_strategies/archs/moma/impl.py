"""The ``moma`` strategy: image prefix tagged by ``modality_ids`` + the MoMa trunk."""

from __future__ import annotations

import torch
from torch import Tensor

from vlm_strategies.api import ArchImplementation
from vlm_strategies.archs.joint_decoder.impl import prefix_key_padding
from vlm_strategies.archs.moma.config import MoMaConfig
from vlm_strategies.archs.moma.trunk import MoMaTrunk
from vlm_strategies.media import MediaEmbeds, scatter_fields
from vlm_transformer import ModalityContext, Trunk

__all__ = ["MoMa", "prefix_modality_ids"]


def prefix_modality_ids(batch: int, image_len: int, text_len: int, device: torch.device) -> Tensor:
    """``(B, T + S)`` long: 0 for the image prefix, 1 for the text."""
    ids = torch.cat(
        (
            torch.zeros(image_len, dtype=torch.long, device=device),
            torch.ones(text_len, dtype=torch.long, device=device),
        )
    )
    return ids[None].expand(batch, -1)


class MoMa(ArchImplementation):
    """Image prefix + :class:`MoMaTrunk` (shared attention, per-modality expert-choice
    experts).

    ``incremental_decoding = False``: expert-choice routing is non-causal (a later
    token can change which earlier tokens an expert picks, hence earlier outputs), in
    training as in inference, so :meth:`VLMWrapper.generate` recomputes the full
    sequence every step, which is exactly the training-time forward.  Teacher-forced
    accuracy therefore overstates MoMa; evaluate it by generation.

    Images anywhere: visual tokens replace their placeholder embeddings and
    ``modality_ids`` tag placeholders 0 (image), the rest 1 (text). Each expert picks
    ``ceil(capacity * n)`` of the ``n`` real positions of its modality per row, or per
    packed sample with ``sequence_ids`` (see :class:`MoMaTrunk`).
    """

    config: MoMaConfig
    incremental_decoding = False

    def build_trunk(self) -> Trunk:
        return MoMaTrunk(self.model_config, self.config)

    def context(
        self, image_embeds: Tensor, image_valid: Tensor | None, input_ids: Tensor
    ) -> ModalityContext:
        batch, image_len = image_embeds.shape[:2]
        text_len = input_ids.shape[1]
        return ModalityContext(
            prefix_embeds=image_embeds,
            modality_ids=prefix_modality_ids(batch, image_len, text_len, image_embeds.device),
            key_padding_mask=prefix_key_padding(image_valid, text_len),
        )

    def media_context(self, media: MediaEmbeds) -> ModalityContext:
        fields = scatter_fields(media)
        ids = (~fields["placeholder_mask"]).long()  # 0 image, 1 text
        return ModalityContext(**fields, modality_ids=ids)
