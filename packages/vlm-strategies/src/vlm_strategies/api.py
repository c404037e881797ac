"""What an arch plugin provides to the core: :class:`ArchImplementation`.

An arch's config class (torch-free, in ``vlm.archs``) names a builder
``(arch_config, model_config) -> ArchImplementation`` in its ``implementation``
class variable; usually the builder is the :class:`ArchImplementation` subclass itself,
so :func:`vlm_strategies.build_arch` calls ``YourArch(arch_config, model_config)``.  The
implementation is plain Python (not an ``nn.Module``), so sharding and checkpointing
never see it.  It tells the core

(a) how image embeddings enter one decoder forward: :meth:`~ArchImplementation.prepare`
    is the single entry point, used by the training forward, the fused loss, the
    prefill of generation and every step of full-recompute generation; by default it
    encodes the images with the wrapper and calls :meth:`~ArchImplementation.context`.
    Each step of cached (incremental) generation calls
    :meth:`~ArchImplementation.decode_context` instead;
(b) how many image positions it puts into the residual stream
    (:meth:`~ArchImplementation.image_positions`), and
(c) which decoder trunk it needs (:meth:`~ArchImplementation.build_trunk`; ``None`` =
    the dense trunk).

Two bases:

- :class:`PrefixArchImplementation` for archs whose images live only in the residual
  stream (an image prefix): a cached decode step feeds text only, so it implements
  :meth:`~ArchImplementation.decode_context` for you.
- :class:`ArchImplementation` for every other arch (images read from the side, per-step
  modality tags, ...): it must implement :meth:`~ArchImplementation.decode_context`, or
  set ``incremental_decoding = False``; forgetting is a ``TypeError`` when the arch is
  built, naming the class and the method.

Images anywhere (a :class:`~vlm_strategies.MediaBatch`: 0..k images per sample at
placeholder positions, packing): :meth:`~ArchImplementation.prepare_media` is the entry
point (forward, loss, prefill and every full-recompute step), which by default encodes
the images with ``wrapper.encode_media`` and calls
:meth:`~ArchImplementation.media_context`; a cached decode step calls
:meth:`~ArchImplementation.media_decode_context`.  An arch that does not override
:meth:`~ArchImplementation.media_context` supports only the image-prefix layout and
raises a ``ValueError`` naming itself for a ``MediaBatch``.

Nothing in the core branches on which arch it holds.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Self

from torch import Tensor

from vlm_config import ArchConfig, ModelConfig
from vlm_strategies.media import MediaBatch, MediaEmbeds, placeholders_per_image
from vlm_transformer import KVCache, ModalityContext, Trunk

if TYPE_CHECKING:
    from vlm_strategies.wrapper import VLMWrapper

__all__ = ["ArchImplementation", "PrefixArchImplementation", "side_inputs"]


def side_inputs(context: ModalityContext | None) -> list[str]:
    """The fields of ``context`` that a cached decode step cannot recover from the KV
    cache alone: ``image_features``, ``image_mask``, ``modality_ids``, ``inputs_embeds``
    and non-empty ``extras``.  ``prefix_embeds``, ``trim_prefix``,
    ``prefix_bidirectional`` and ``key_padding_mask`` are not side inputs: after the
    prefill they live in the cache.

    Returns:
        The names of the side-input fields that are set, in field order (empty for
        ``None``).
    """
    if context is None:
        return []
    names = [
        name
        for name in ("image_features", "image_mask", "modality_ids", "inputs_embeds")
        if getattr(context, name) is not None
    ]
    if context.extras:
        names.append("extras")
    return names


class ArchImplementation(abc.ABC):
    """Base of arch implementations (one per built model).

    Constructed as ``YourArch(config, model_config)`` by
    :func:`vlm_strategies.build_arch` (through the config's ``implementation`` import
    string); a subclass that adds validation overrides ``__init__`` with the same two
    arguments, calls ``super().__init__(config, model_config)`` and raises
    ``ValueError`` for configs it cannot build.

    Subclasses implement :meth:`context` and, when ``incremental_decoding`` is ``True``
    (the default), :meth:`decode_context` (or inherit it from
    :class:`PrefixArchImplementation`).

    Args:
        config: the validated arch config (an instance of the arch's ``ArchConfig``
            subclass).
        model_config: the decoder config.

    Attributes:
        config: the arch config it was built from.
        model_config: the decoder config.
        incremental_decoding: class variable. ``True`` when the arch is causal, so
            generation may feed one new token at a time with a KV cache (through
            :meth:`decode_context`); ``False`` for non-causal archs (e.g. expert-choice
            routing over the sequence): :meth:`VLMWrapper.generate` then recomputes the
            whole sequence through :meth:`prepare` every step and
            :meth:`decode_context` is never called.

    Raises:
        TypeError: at construction, when the class leaves :meth:`context` abstract, or
            keeps ``incremental_decoding = True`` without implementing
            :meth:`decode_context`; the message names the class and the method.
    """

    incremental_decoding: ClassVar[bool] = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if cls.incremental_decoding and cls.decode_context is ArchImplementation.decode_context:
            missing.append("decode_context")
        if missing:
            hints = {
                "context": "the ModalityContext of a full forward",
                "decode_context": (
                    "the ModalityContext of one cached decode step; an arch whose images "
                    "live only in the residual-stream prefix subclasses "
                    "vlm_strategies.PrefixArchImplementation instead, and a non-causal "
                    "arch sets incremental_decoding = False"
                ),
            }
            detail = "; ".join(f"{name}() ({hints.get(name, 'abstract')})" for name in missing)
            raise TypeError(
                f"arch implementation {cls.__module__}.{cls.__qualname__} must implement {detail}"
            )
        return super().__new__(cls)

    def __init__(self, config: ArchConfig, model_config: ModelConfig) -> None:
        self.config = config
        self.model_config = model_config

    @property
    def supports_media(self) -> bool:
        """Whether the arch overrides :meth:`media_context` (images anywhere)."""
        return type(self).media_context is not ArchImplementation.media_context

    def image_placeholders(self, num_visual_tokens: int) -> int:
        """Placeholder ids per image in a :class:`MediaBatch`: the residual image
        positions, or 1 for archs that read images from the side
        (:func:`~vlm_strategies.media.placeholders_per_image`)."""
        return placeholders_per_image(self.image_positions(num_visual_tokens))

    def prepare_media(self, wrapper: VLMWrapper, batch: MediaBatch) -> ModalityContext:
        """The strategy for images anywhere: a :class:`MediaBatch` -> the
        :class:`ModalityContext` of a full forward over ``batch.input_ids``.

        Used by :meth:`VLMWrapper.forward`, :meth:`VLMWrapper.loss`, the prefill of
        :meth:`VLMWrapper.generate` and every full-recompute step (then ``batch`` is the
        prompt batch extended with the generated tokens).  The default encodes with
        ``wrapper.encode_media(batch, self.image_placeholders(...))`` and returns
        :meth:`media_context`.

        Raises:
            ValueError: the arch supports only the image-prefix layout, or the batch's
                placeholders do not match its images.
        """
        if not self.supports_media:
            raise ValueError(self._prefix_only_message())
        media = wrapper.encode_media(batch, self.image_placeholders(wrapper.num_image_tokens))
        return self.media_context(media)

    def _prefix_only_message(self) -> str:
        cls = type(self)
        return (
            f"arch {getattr(self.config, 'arch', '?')!r} ({cls.__module__}.{cls.__qualname__})"
            " supports only the image-prefix layout (pixel_values (B,3,H,W) + input_ids): "
            "it does not implement media_context(), so a MediaBatch (images at placeholder "
            "positions, text-only rows, packing) cannot be used with it"
        )

    def media_context(self, media: MediaEmbeds) -> ModalityContext:
        """The context of a full forward over ``media.batch.input_ids`` with the images
        at their placeholders (override to support images anywhere; see
        :mod:`vlm_strategies.media` for helpers).

        Contract: a row (or packed sample) with no image must compute exactly the
        text-only decoder; a text-only batch must still route :attr:`MediaEmbeds.dummy`
        into the forward (e.g. as ``grad_anchor``) so every parameter gets a (zero)
        gradient; no attention, position or routing state may cross a
        ``sequence_ids`` boundary.

        Raises:
            ValueError: always, in the base class (prefix layout only).
        """
        raise ValueError(self._prefix_only_message())

    def media_decode_context(
        self, media: MediaEmbeds, new_ids: Tensor, cache: KVCache
    ) -> ModalityContext | None:
        """The context of one cached decode step after a :meth:`prepare_media`
        prefill; the new tokens are text and come after every image of their row.
        :class:`PrefixArchImplementation` returns ``None`` (the images live in the KV
        cache); an arch that reads images from the side overrides it.

        Args:
            media: what ``wrapper.encode_media`` returned for the prompt batch.
            new_ids: ``(B, s)`` long tokens of this step.
            cache: the generation's :class:`KVCache`.

        Raises:
            TypeError: in this base class: an arch with ``media_context`` and
                ``incremental_decoding`` must implement it.
        """
        cls = type(self)
        raise TypeError(
            f"arch implementation {cls.__module__}.{cls.__qualname__} implements "
            "media_context() with incremental_decoding = True but not "
            "media_decode_context(): implement it (the context of a cached decode step "
            "after an interleaved prompt)"
        )

    def build_trunk(self) -> Trunk | None:
        """The decoder trunk this arch needs, built (on the current default device) from
        ``self.model_config``; ``None`` (default) selects
        :class:`vlm_transformer.DenseTrunk`.  Called once per built model."""
        return None

    def image_positions(self, num_visual_tokens: int) -> int:
        """Image positions in the residual stream for ``num_visual_tokens`` visual tokens
        (all frames); default ``config.residual_image_positions(num_visual_tokens)``."""
        return self.config.residual_image_positions(num_visual_tokens)

    def prepare(
        self,
        wrapper: VLMWrapper,
        pixel_values: Tensor,
        input_ids: Tensor,
        frame_mask: Tensor | None = None,
    ) -> ModalityContext:
        """The strategy: one batch -> the :class:`ModalityContext` of a full forward.

        The only entry point of the core into the arch for full forwards: used by
        :meth:`VLMWrapper.forward`, :meth:`VLMWrapper.loss`, the prefill of
        :meth:`VLMWrapper.generate` and, for full-recompute generation, every decode
        step (then ``input_ids`` is the whole sequence so far).  The default encodes the
        images with ``wrapper.encode_images(pixel_values, frame_mask)`` (memoised
        within one ``generate`` call) and returns :meth:`context`.  Override it to
        change how images are encoded; :meth:`decode_context` receives what
        ``wrapper.encode_images`` returned for the same call.

        Args:
            wrapper: the :class:`VLMWrapper` running the forward.
            pixel_values: ``(B,3,H,W)`` images or ``(B,F,3,H,W)`` clips.
            input_ids: ``(B,S)`` long text tokens of this forward.
            frame_mask: ``(B,F)`` bool, True = real frame; ``None`` = all real.
        """
        embeds, valid = wrapper.encode_images(pixel_values, frame_mask)
        return self.context(embeds, valid, input_ids)

    @abc.abstractmethod
    def context(
        self, image_embeds: Tensor, image_valid: Tensor | None, input_ids: Tensor
    ) -> ModalityContext:
        """The context of a full forward (training, prefill, full recompute).

        Args:
            image_embeds: ``(B, T, D)`` visual tokens in the decoder's dtype, frames
                concatenated in order (``T = frames * tokens_per_frame``).
            image_valid: ``(B, T)`` bool, False for tokens of padded frames; ``None``
                when every frame is real.  Padded tokens must not reach real positions
                (mask them as keys, out of cross-attention, out of routing).
            input_ids: ``(B, S)`` long text tokens of this forward.
        """

    def decode_context(
        self,
        image_embeds: Tensor,
        image_valid: Tensor | None,
        new_ids: Tensor,
        cache: KVCache,
    ) -> ModalityContext | None:
        """The context of one cached decode step feeding ``new_ids (B, s)`` after a
        prefill with :meth:`prepare`; ``None`` = no context (text only).

        Abstract for archs with ``incremental_decoding = True``: an arch that reads the
        images from the side (``image_features``) or tags positions (``modality_ids``)
        must give the new positions what the prefill gave the text, e.g. the image
        features again (a trunk may keep state in ``cache.state``).

        Args:
            image_embeds, image_valid: what ``wrapper.encode_images`` returned for this
                generation (see :meth:`context`).
            new_ids: ``(B, s)`` long, the tokens of this step.
            cache: the generation's :class:`KVCache` (already holds the prefill).
        """
        # only reachable for incremental_decoding = False (never called by the core)
        raise NotImplementedError(
            f"{type(self).__qualname__} sets incremental_decoding = False: it has no "
            "cached decode step"
        )


class PrefixArchImplementation(ArchImplementation):
    """Base of archs whose images enter only the residual stream (an image prefix, like
    the first-party joint decoder): after the prefill the images live in the KV cache, so a cached
    decode step feeds the new text tokens with no context at all.

    :meth:`decode_context` checks that claim: when :meth:`context` carries side inputs
    (see :func:`side_inputs`), the arch is not a prefix arch, and the first decode step
    raises ``TypeError`` naming the class, instead of generating silently wrong tokens.
    """

    def decode_context(
        self,
        image_embeds: Tensor,
        image_valid: Tensor | None,
        new_ids: Tensor,
        cache: KVCache,
    ) -> ModalityContext | None:
        """``None``: the new positions are text, the image prefix is in ``cache``.

        Raises:
            TypeError: :meth:`context` carries side inputs (``image_features``,
                ``modality_ids``, ...), which a prefix-only decode step would drop.
        """
        side = side_inputs(self.context(image_embeds, image_valid, new_ids))
        if side:
            raise TypeError(
                f"{type(self).__module__}.{type(self).__qualname__} subclasses "
                f"PrefixArchImplementation but its context() sets {', '.join(side)}: a "
                "cached decode step would drop them. Implement decode_context() (or "
                "subclass ArchImplementation and implement it there)"
            )
        return None

    def media_decode_context(
        self, media: MediaEmbeds, new_ids: Tensor, cache: KVCache
    ) -> ModalityContext | None:
        """``None``: the new positions are text; the visual tokens entered the residual
        stream at their placeholders during the prefill and live in ``cache``."""
        return None
