"""Torch-free config of the ``mot`` arch."""

from __future__ import annotations

from typing import ClassVar, Literal

from vlm_config import ArchConfig


class MoTConfig(ArchConfig):
    """Mixture-of-Transformers: the visual tokens are a prefix of the residual stream and
    every layer holds one copy of the decoder block per modality (``image``: modality id
    0, ``text``: modality id 1), i.e. per-modality attention/MLP norms, Q/K/V/O
    projections and FFN; attention itself is one global causal attention over all
    positions. The final norm is per modality too.  In this arch's own image-prefix
    layout each copy runs on its own slice of the sequence (no wasted FLOPs, static
    shapes); a context with explicit ``ModalityContext.modality_ids`` (any layout, e.g.
    interleaved) is routed per position by ``dispatch``.

    Fields:
        dispatch: how positions reach their modality's weights when the context gives
            explicit ``modality_ids``.
            ``"select"`` (default): every copy runs on every position and
            ``torch.where`` keeps the right one (static shapes, ``fullgraph``
            compile-friendly, 2x the projection/FFN FLOPs).
            ``"gather"``: rows are gathered per modality and scattered back (no wasted
            FLOPs; data-dependent shapes, so a host sync and a graph break under
            ``torch.compile``).

    Freeze aliases: ``mot_image`` (the image copies: ``transformer.trunk.layers.*.image.*``
    and ``transformer.trunk.norm.image.*``), ``mot_text`` (the text copies, likewise),
    ``mot`` (both). E.g. ``[{module="mot_text"}, {module="transformer.embed.*"}]`` keeps
    the language model of a warm start intact and trains only the image copies.
    """

    arch: Literal["mot"] = "mot"
    dispatch: Literal["select", "gather"] = "select"

    implementation: ClassVar[str] = "vlm_strategies.archs.mot.impl:MixtureOfTransformers"
    module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "mot_image": ("transformer.trunk.layers.*.image.*", "transformer.trunk.norm.image.*"),
        "mot_text": ("transformer.trunk.layers.*.text.*", "transformer.trunk.norm.text.*"),
        "mot": (
            "transformer.trunk.layers.*.image.*",
            "transformer.trunk.norm.image.*",
            "transformer.trunk.layers.*.text.*",
            "transformer.trunk.norm.text.*",
        ),
    }
