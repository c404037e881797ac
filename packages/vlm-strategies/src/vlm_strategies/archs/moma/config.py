"""Torch-free config of the ``moma`` arch."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from vlm_config import ArchConfig

#: Modality index -> name, in ``modality_ids`` order (0 = image prefix, 1 = text).
MOMA_MODALITIES: tuple[str, ...] = ("image", "text")


class MoMaConfig(ArchConfig):
    """MoMa: image prefix, shared attention, per-modality expert-choice FFN experts.

    Every decoder layer is ``h = x + attn(norm(x)); out = h + experts(norm(h))`` where
    ``experts`` holds, for each modality (``image``, ``text``), ``experts_per_modality``
    SwiGLU experts with a sigmoid router.  Routing is expert choice, per sequence: expert
    ``e`` of modality ``m`` scores every position of the sequence (positions of other
    modalities and padded positions score ``-inf``), takes its top
    ``k_m = min(S, ceil(capacity * N_m))`` positions and adds
    ``sigmoid(logit) * expert(x)`` back to them; a token picked by several experts gets
    the sum, a token picked by none gets nothing from the experts (only the residual).
    ``N_m`` is the static number of positions of modality ``m`` in the layout (image:
    the prefix length ``P``; text: ``S - P``), so ``k`` is known from shapes alone (no
    host-device sync).  Padded positions (padded frames, left padding) count in ``N_m``
    but are never picked: a pick that would land on one is dropped.

    Routing is non-causal (a later token can change an earlier position's output), so
    the arch cannot decode incrementally; generation recomputes the full sequence every
    step, and teacher-forced accuracy overstates the model (evaluate by generation).

    Fields:
        experts_per_modality: experts in each modality's group (``E``).
        capacity: fraction of a modality's positions each expert takes; ``None`` means
            ``1 / E`` (on average one expert per token: FLOPs match one dense FFN of
            width ``expert_hidden_dim``).
        expert_hidden_dim: SwiGLU width of each expert; ``None`` means the decoder's
            FFN width (``model.hidden_dim``), the paper's FLOPs-matched setting
            (parameters grow ``E`` times, FLOPs per token stay those of the dense FFN
            at the default capacity).
        gumbel_noise: in training only, add logistic noise (the difference of two
            standard Gumbel samples: the Gumbel-sigmoid trick) to the router logits
            before the top-k selection and the sigmoid gate.
        aux_loss: report auxiliary losses through ``auxiliary_losses()`` at all.
        z_loss_weight: weight of the router z-loss, the mean over real tokens of
            ``logsumexp_e(logits)^2`` (ST-MoE), averaged over layers and modalities;
            keeps router logits small so the sigmoid gates do not saturate.  0 = off.
        selection_loss_weight: weight of the router selection loss: binary
            cross-entropy of each router's sigmoid against whether its expert picked
            the token (the Mixture-of-Depths / MoMa auxiliary-router objective, which
            trains the router to predict expert-choice selections causally); averaged
            over layers and modalities.  0 = off.

    Module aliases (for ``freeze``): ``moma_experts`` (every expert FFN and router),
    ``moma_routers`` (routers only), ``moma_image_experts`` / ``moma_text_experts`` (one
    modality's experts and routers), ``moma_attention`` (the shared attention and its
    norm).
    """

    arch: Literal["moma"] = "moma"
    implementation: ClassVar[str] = "vlm_strategies.archs.moma.impl:MoMa"
    module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "moma_experts": ("transformer.trunk.layers.*.experts.*",),
        "moma_routers": ("transformer.trunk.layers.*.experts.*.router",),
        "moma_image_experts": ("transformer.trunk.layers.*.experts.image.*",),
        "moma_text_experts": ("transformer.trunk.layers.*.experts.text.*",),
        "moma_attention": (
            "transformer.trunk.layers.*.attn.*",
            "transformer.trunk.layers.*.attn_norm.*",
        ),
    }

    experts_per_modality: int = Field(default=4, ge=1)
    capacity: float | None = Field(default=None, gt=0, le=1)
    expert_hidden_dim: int | None = Field(default=None, ge=1)
    gumbel_noise: bool = False
    aux_loss: bool = True
    z_loss_weight: float = Field(default=1e-3, ge=0)
    selection_loss_weight: float = Field(default=0.0, ge=0)

    @property
    def resolved_capacity(self) -> float:
        """``capacity`` or ``1 / experts_per_modality``."""
        return self.capacity if self.capacity is not None else 1.0 / self.experts_per_modality
