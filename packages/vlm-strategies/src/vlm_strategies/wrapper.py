"""``VLMWrapper``: vision encoder -> adapter -> (arch strategy) -> decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_strategies.api import ArchImplementation
from vlm_strategies.media import MediaBatch, MediaEmbeds
from vlm_strategies.video import FramePositionEmbedding, expand_frame_mask, fold_frames
from vlm_transformer import KVCache, ModalityContext, Transformer, linear_cross_entropy
from vlm_transformer import generate as _generate

__all__ = ["IGNORE_INDEX", "VLMWrapper", "VisionFeatures", "causal_lm_loss", "shift_labels"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class VisionFeatures:
    """The vision encoder's output, precomputed, standing in for ``pixel_values``.

    Pass it wherever the image-prefix layout takes ``pixel_values``
    (``model.loss(VisionFeatures(f), ids, labels, frame_mask)``, ``model(...)``,
    ``model.generate(...)``): the encoder is skipped and the features go through the
    adapter, frame positions and the arch exactly as the encoder's output would, so
    ``VisionFeatures(model.vision_encoder(pixels))`` gives bit-identical outputs (for
    clips, the encoder's output on the folded ``(B*F, 3, H, W)`` frames viewed as
    ``(B, F, N, Dv)``).  Used by the training feature cache of a frozen encoder.

    An arch implementation that overrides ``prepare`` must hand its ``pixel_values``
    to ``wrapper.encode_images`` unchanged for this to work (the default does).

    Attributes:
        features: ``(B, N, Dv)`` per image, or ``(B, F, N, Dv)`` per clip frame
            (``N = vision_encoder.num_tokens``, ``Dv = vision_encoder.feature_dim``).
    """

    features: Tensor

    def __post_init__(self) -> None:
        f = self.features
        if not isinstance(f, Tensor) or f.ndim not in (3, 4) or not f.is_floating_point():
            what = f"{tuple(f.shape)} {f.dtype}" if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(
                "VisionFeatures.features must be floating (B, N, Dv) image features or "
                f"(B, F, N, Dv) clip features, got {what}"
            )

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(self.features.shape[0])

    def to(self, device: torch.device | str) -> VisionFeatures:
        """These features on ``device`` (non-blocking from pinned memory)."""
        return VisionFeatures(self.features.to(device, non_blocking=True))

    def folded(self, frames_per_clip: int, num_tokens: int, feature_dim: int) -> Tensor:
        """``(B*F, N, Dv)``, frames folded into the batch like the encoder's input.

        Raises:
            ValueError: ``(N, Dv)`` differ from the encoder's, or ``F`` from
                ``frames_per_clip`` (naming both).
        """
        f = self.features
        frames = 1 if f.ndim == 3 else int(f.shape[1])
        if tuple(f.shape[-2:]) != (num_tokens, feature_dim):
            raise ValueError(
                f"VisionFeatures hold (N, Dv) = {tuple(f.shape[-2:])} per image but the "
                f"model's encoder gives ({num_tokens}, {feature_dim}): features computed "
                "by another encoder?"
            )
        if frames != frames_per_clip:
            raise ValueError(
                f"got clip features of {frames} frame(s) but the model was built with "
                f"frames_per_clip={frames_per_clip}"
            )
        return f if f.ndim == 3 else f.flatten(0, 1)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy: ``logits[:, t]`` predicts ``labels[:, t + 1]``.

    Args:
        logits: ``(B, S, V)`` over text positions.
        labels: ``(B, S)`` long, aligned with ``input_ids``; ``-100`` is ignored.

    Raises:
        ValueError: shapes disagree.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"labels must be (B, S) = {tuple(logits.shape[:2])} like the logits, got "
            f"{tuple(labels.shape)}"
        )
    return F.cross_entropy(
        logits.flatten(0, 1).float(), shift_labels(labels).flatten(), ignore_index=IGNORE_INDEX
    )


def shift_labels(labels: Tensor) -> Tensor:
    """``(B, S)`` labels -> the ``(B, S)`` targets of each position: ``labels[:, t + 1]``,
    and ``-100`` (ignored) for the last position.  Shifting the labels instead of slicing
    the logits keeps the logits contiguous: no ``(B, S-1, V)`` copy forward and no
    zero-filled slice gradient backward."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat((labels[:, 1:], pad), dim=1)


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


class VLMWrapper(nn.Module):
    """A vision-language model composed of four parts.

    Submodules: ``vision_encoder`` (``(B*F,3,H,W) -> (B*F,N,Dv)``), ``adapter``
    (``(B*F,N,Dv) -> (B*F,M,D)``), ``transformer`` (:class:`vlm_transformer.Transformer`
    with the arch's trunk) and, for video, ``frame_positions``.  ``strategy`` (an
    :class:`ArchImplementation`) is a plain attribute, not a submodule.

    Dtypes: the encoder runs in its own dtype; its features are cast to the adapter's
    parameter dtype, and the adapter output to the decoder's embedding dtype.

    Args:
        frames_per_clip: ``F``; clips must have exactly this many frames.
        frame_positions: add a learned per-frame embedding to visual tokens.
    """

    def __init__(
        self,
        vision_encoder: nn.Module,
        adapter: nn.Module,
        transformer: Transformer,
        strategy: ArchImplementation,
        frames_per_clip: int = 1,
        frame_positions: bool = False,
    ) -> None:
        super().__init__()
        if frames_per_clip < 1:
            raise ValueError(f"frames_per_clip must be >= 1, got {frames_per_clip}")
        self.vision_encoder = vision_encoder
        self.adapter = adapter
        self.transformer = transformer
        self.strategy = strategy
        self.frames_per_clip = frames_per_clip
        count_tokens: Any = adapter.output_num_tokens
        self.tokens_per_frame: int = count_tokens(vision_encoder.num_tokens)
        self.frame_positions: FramePositionEmbedding | None = (
            FramePositionEmbedding(
                frames_per_clip, transformer.config.dim, transformer.config.init_std
            )
            if frame_positions
            else None
        )
        self.encoder_frozen = False
        self._image_memo: _ImageMemo | None = None
        self.refresh_frozen_state()

    # ------------------------------------------------------------------ shapes
    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per sample (all frames), exact before any forward."""
        return self.frames_per_clip * self.tokens_per_frame

    @property
    def num_image_positions(self) -> int:
        """Image positions the arch puts into the residual stream."""
        return self.strategy.image_positions(self.num_image_tokens)

    # ----------------------------------------------------------------- freezing
    def refresh_frozen_state(self) -> None:
        """Re-read whether the encoder is fully frozen (then it runs in eval mode, no grad)."""
        params = list(self.vision_encoder.parameters())
        self.encoder_frozen = all(not p.requires_grad for p in params)
        if self.encoder_frozen:
            self.vision_encoder.eval()
        else:
            self.vision_encoder.train(self.training)

    def train(self, mode: bool = True) -> VLMWrapper:
        super().train(mode)
        if self.encoder_frozen:
            self.vision_encoder.eval()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise adapter, decoder and frame positions (the encoder keeps its weights).

        A weight-free encoder (no parameters, e.g. ``random``) has its fixed buffers
        regenerated through its ``reset_parameters()``: they are a pure function of its
        config, and a whole-model ``to_empty`` would otherwise leave them uninitialised.
        """
        has_weights = any(True for _ in self.vision_encoder.parameters())
        reset_encoder = getattr(self.vision_encoder, "reset_parameters", None)
        if not has_weights and callable(reset_encoder):
            reset_encoder()
        reset = getattr(self.adapter, "reset_parameters", None)
        if callable(reset):
            reset()
        self.transformer.init_weights()
        if self.frame_positions is not None:
            self.frame_positions.reset_parameters()

    # ------------------------------------------------------------------ compute
    def encode_images(
        self, pixel_values: Tensor | VisionFeatures, frame_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Pixels -> visual tokens in the decoder's dtype.

        Args:
            pixel_values: ``(B,3,H,W)`` images or ``(B,F,3,H,W)`` clips, or the
                encoder's precomputed output (:class:`VisionFeatures`: the encoder is
                skipped).
            frame_mask: ``(B,F)`` bool, True = real frame (clips only).

        Returns:
            ``(B, F*M, D)`` tokens (frame ``f`` occupies ``[f*M, (f+1)*M)``; padded frames'
            tokens are zeroed) and their ``(B, F*M)`` validity, or ``None`` without a
            ``frame_mask``.

        Within :meth:`generate` the result for the call's own ``pixel_values`` and
        ``frame_mask`` is computed once and reused.

        Raises:
            ValueError: wrong rank, a frame count other than ``frames_per_clip``, or a
                malformed ``frame_mask``.
        """
        memo = self._image_memo
        if memo is not None and memo.matches(pixel_values, frame_mask):
            if memo.value is None:
                memo.value = self._encode_images(pixel_values, frame_mask)
            return memo.value
        return self._encode_images(pixel_values, frame_mask)

    def _encode_images(
        self, pixel_values: Tensor | VisionFeatures, frame_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(pixel_values, VisionFeatures):
            batch = pixel_values.batch_size
            encoder: Any = self.vision_encoder
            features = pixel_values.folded(
                self.frames_per_clip, encoder.num_tokens, encoder.feature_dim
            )
            frames = self.frames_per_clip
        else:
            batch = pixel_values.shape[0]
            folded, frames = fold_frames(pixel_values, self.frames_per_clip)
            if self.encoder_frozen:
                with torch.no_grad():
                    features = self.vision_encoder(folded)
            else:
                features = self.vision_encoder(folded)
        features = features.to(_param_dtype(self.adapter, features.dtype))
        tokens = self.adapter(features)
        m, dim = tokens.shape[1], tokens.shape[2]
        tokens = tokens.view(batch, frames, m, dim)
        if self.frame_positions is not None:
            tokens = self.frame_positions(tokens)
        tokens = tokens.reshape(batch, frames * m, dim)
        tokens = tokens.to(self.transformer.embed.weight.dtype)
        valid = expand_frame_mask(frame_mask, batch, frames, frames * m)
        if valid is not None:
            tokens = tokens * valid[..., None].to(tokens.dtype)
        return tokens, valid

    def encode_media(self, batch: MediaBatch, placeholders: int | None = None) -> MediaEmbeds:
        """The images of a :class:`MediaBatch` -> per-image visual tokens + layout.

        Every image (or clip) runs through the encoder, adapter and frame positions like
        :meth:`encode_images` (one image per "row"). A batch whose ``pixel_values`` is
        ``(0, ...)`` runs them on one zero image instead and returns that output ``* 0``
        as :attr:`MediaEmbeds.dummy`, so an FSDP2 rank with a text-only micro-batch
        takes part in every collective of the encoder and adapter (see
        :mod:`vlm_strategies.media`).  Memoised within :meth:`generate` for its batch's
        ``pixel_values``.

        Args:
            placeholders: placeholder ids per image; default the arch's
                ``image_placeholders(num_image_tokens)``.

        Raises:
            ValueError: placeholder counts that do not match the images, a frame count
                other than ``frames_per_clip``, or a malformed ``frame_mask``.
        """
        if placeholders is None:
            placeholders = self.strategy.image_placeholders(self.num_image_tokens)
        layout = batch.layout(placeholders)
        px = batch.pixel_values
        if px is None:
            dim = self.transformer.config.dim
            empty = self.transformer.embed.weight.new_zeros(0, self.num_image_tokens, dim)
            return MediaEmbeds(batch, layout, empty, None, None)
        memo = self._image_memo
        if memo is not None and memo.matches(px, batch.frame_mask):
            if memo.media is None:
                memo.media = self._encode_media_pixels(px, batch.frame_mask)
            tokens, valid, dummy = memo.media
        else:
            tokens, valid, dummy = self._encode_media_pixels(px, batch.frame_mask)
        return MediaEmbeds(batch, layout, tokens, valid, dummy)

    def _encode_media_pixels(
        self, pixel_values: Tensor, frame_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if pixel_values.shape[0] == 0:
            zero = pixel_values.new_zeros(1, *pixel_values.shape[1:])
            tokens, _ = self._encode_images(zero, None)
            empty = tokens.new_zeros(0, *tokens.shape[1:])
            return empty, None, tokens * 0.0
        tokens, valid = self._encode_images(pixel_values, frame_mask)
        return tokens, valid, None

    def forward(
        self,
        pixel_values: Tensor | MediaBatch | VisionFeatures,
        input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        frame_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits over the text positions.

        Two layouts: the image prefix ``model(pixel_values, input_ids)`` (one image or
        clip per row, before the text), or images anywhere ``model(batch)`` with a
        :class:`MediaBatch` (0..k images per row at placeholder positions, packing);
        then logits cover every position of ``batch.input_ids`` (placeholders included:
        their labels are ignored) and ``labels`` defaults to ``batch.labels``.

        Args:
            pixel_values: ``(B,3,H,W)`` or ``(B,F,3,H,W)``, precomputed encoder output
                (:class:`VisionFeatures`, prefix layout), or a :class:`MediaBatch`.
            input_ids: ``(B,S)`` long (prefix layout only).
            labels: ``(B,S)`` long aligned with ``input_ids`` (returned unchanged; see
                :func:`causal_lm_loss`).
            frame_mask: ``(B,F)`` bool (prefix layout only).

        Returns:
            ``(logits (B,S,V), labels)``.

        Raises:
            ValueError: the arch supports only the prefix layout (for a
                :class:`MediaBatch`), or a malformed batch.
            TypeError: ``input_ids`` / ``frame_mask`` with a :class:`MediaBatch`, or no
                ``input_ids`` without one.
        """
        if isinstance(pixel_values, MediaBatch):
            batch = _media_only(pixel_values, input_ids, frame_mask)
            context = self.strategy.prepare_media(self, batch)
            logits = self.transformer(batch.input_ids, context, positions=batch.position_ids)
            return logits, batch.labels if labels is None else labels
        if input_ids is None:
            raise TypeError("VLMWrapper.forward(pixel_values, input_ids) needs input_ids")
        # archs hand pixel_values to encode_images untouched: VisionFeatures pass through
        context = self.strategy.prepare(self, cast(Tensor, pixel_values), input_ids, frame_mask)
        logits = self.transformer(input_ids, context)
        return logits, labels

    def loss(
        self,
        pixel_values: Tensor | MediaBatch | VisionFeatures,
        input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        frame_mask: Tensor | None = None,
        *,
        chunk_size: int = 256,
    ) -> Tensor:
        """``causal_lm_loss(self(pixel_values, input_ids)[0], labels)`` without the logits.

        The LM head and the cross-entropy are fused
        (:func:`vlm_transformer.linear_cross_entropy`, ``chunk_size`` rows at a time), so
        neither the ``(B, S, V)`` logits nor their gradient is ever held: less peak
        memory and fewer memory passes in a training step.  Equal to the unfused loss up
        to float rounding; gradients flow as usual (auxiliary losses are not included,
        see :meth:`auxiliary_losses`).

        Images anywhere: ``loss(batch)`` (labels from ``batch.labels``) or
        ``loss(batch, labels=labels)`` with a :class:`MediaBatch`.  Precomputed encoder
        output: ``loss(VisionFeatures(features), input_ids, labels, frame_mask)``.

        Raises:
            ValueError: ``labels`` is not ``(B, S)`` like ``input_ids``.
            TypeError: missing ``input_ids`` or ``labels``.
        """
        positions = None
        if isinstance(pixel_values, MediaBatch):
            batch = _media_only(pixel_values, input_ids, frame_mask)
            input_ids = batch.input_ids
            labels = batch.labels if labels is None else labels
            positions = batch.position_ids
        if input_ids is None or labels is None:
            raise TypeError(
                "VLMWrapper.loss needs (pixel_values, input_ids, labels) or a MediaBatch "
                "with labels"
            )
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must be (B, S) = {tuple(input_ids.shape)} like input_ids, got "
                f"{tuple(labels.shape)}"
            )
        if isinstance(pixel_values, MediaBatch):
            context = self.strategy.prepare_media(self, pixel_values)
        else:
            pixels = cast(Tensor, pixel_values)  # or VisionFeatures: see forward()
            context = self.strategy.prepare(self, pixels, input_ids, frame_mask)
        targets = shift_labels(labels).flatten()

        def head(hidden: Tensor) -> Tensor:
            # read inside the decoder's forward: FSDP2 unshards the weight in its pre-hook
            return linear_cross_entropy(
                hidden.flatten(0, 1),
                self.transformer.output_weight,
                targets,
                ignore_index=IGNORE_INDEX,
                chunk_size=chunk_size,
            )

        out: Tensor = self.transformer(input_ids, context, head=head, positions=positions)
        return out

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """The trunk's auxiliary losses of the last forward (e.g. MoE balance)."""
        return self.transformer.auxiliary_losses()

    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor | MediaBatch | VisionFeatures,
        prompt_ids: Tensor | None = None,
        *,
        frame_mask: Tensor | None = None,
        max_new_tokens: int = 16,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Encode the images once, prefill through the arch's ``prepare``, then decode.

        With the KV cache (archs with ``incremental_decoding``, the default for them)
        each step feeds the new token with the arch's ``decode_context``; without it
        (``use_cache=False``, or a non-causal arch) every step recomputes the whole
        sequence through ``prepare`` (the training-time forward), which gives exactly
        the tokens of greedy decoding by full recomputation.  Either way the images are
        encoded once: ``encode_images`` is memoised for this call's ``pixel_values`` and
        ``frame_mask``.

        Images anywhere: ``generate(batch, ...)`` with a :class:`MediaBatch` whose
        prompts hold images at placeholder positions (several, in the middle, or none);
        left padding comes from ``batch.attention_mask``.  The prefill runs
        ``prepare_media``; cached steps ``media_decode_context``; full recomputation
        ``prepare_media`` on the batch extended with the generated tokens (never
        placeholders).  Packed batches (``sequence_ids``) and ``position_ids`` are
        rejected: generate one prompt per row.

        Args:
            pixel_values: ``(B,3,H,W)`` images or ``(B,F,3,H,W)`` clips, their
                precomputed encoder output (:class:`VisionFeatures`), or a
                :class:`MediaBatch`.
            prompt_ids: ``(B,S)`` long prompts (left-padded with ``attention_mask``);
                prefix layout only.
            frame_mask: ``(B,F)`` bool, True = real frame.
            max_new_tokens: upper bound on new tokens.
            use_cache: ``None`` (default) = the KV cache when the arch supports it;
                ``False`` = full recomputation; ``True`` = the KV cache (an error for
                archs with ``incremental_decoding = False``).
            kwargs: to :func:`vlm_transformer.generate` (``temperature``, ``top_k``,
                ``top_p``, ``eos_token_id``, ``pad_token_id``, ``attention_mask`` for
                left-padded prompts, ``generator``, ``compile`` for a compiled
                static-shape decode step).  The whole batch is generated in this one
                call: a preallocated KV cache written in place, and a row stops at its
                first EOS (then emits ``pad_token_id``) while the loop ends when every
                row has stopped.

        Returns:
            ``(B, S + T)`` long: prompts followed by the new tokens.

        Raises:
            ValueError: ``use_cache=True`` for an arch that cannot decode incrementally;
                a packed :class:`MediaBatch` or one with ``position_ids``; a
                :class:`MediaBatch` for a prefix-only arch.
            TypeError: ``context`` or ``decode_context_fn`` in ``kwargs`` (the arch
                provides them), ``prompt_ids``/``frame_mask`` with a :class:`MediaBatch`
                or ``attention_mask`` in ``kwargs`` with one (it is
                ``batch.attention_mask``).
        """
        strategy = self.strategy
        arch = type(strategy).__qualname__
        if use_cache and not strategy.incremental_decoding:
            raise ValueError(
                f"{arch} sets incremental_decoding = False (it cannot decode with a KV "
                "cache): generate with use_cache=None or False (full recomputation)"
            )
        for name in ("context", "decode_context_fn"):
            if name in kwargs:
                raise TypeError(
                    f"VLMWrapper.generate builds {name} from the arch ({arch}); do not pass it"
                )
        cached = strategy.incremental_decoding if use_cache is None else use_cache
        if isinstance(pixel_values, MediaBatch):
            return self._generate_media(
                _media_only(pixel_values, prompt_ids, frame_mask),
                cached,
                max_new_tokens,
                kwargs,
            )
        if prompt_ids is None:
            raise TypeError("VLMWrapper.generate(pixel_values, prompt_ids) needs prompt_ids")
        was_training = self.training
        self.eval()
        pixels = cast(Tensor, pixel_values)  # or VisionFeatures: see forward()
        self._image_memo = _ImageMemo(pixels, frame_mask)
        try:
            context = strategy.prepare(self, pixels, prompt_ids, frame_mask)

            def cached_step(
                _step: int, new: Tensor, cache: KVCache | None
            ) -> ModalityContext | None:
                assert cache is not None
                embeds, valid = self.encode_images(pixels, frame_mask)
                return strategy.decode_context(embeds, valid, new, cache)

            def recompute_step(_step: int, ids: Tensor, _cache: KVCache | None) -> ModalityContext:
                return strategy.prepare(self, pixels, ids, frame_mask)

            return _generate(
                self.transformer,
                prompt_ids,
                max_new_tokens=max_new_tokens,
                context=context,
                decode_context_fn=cached_step if cached else recompute_step,
                use_cache=cached,
                **kwargs,
            )
        finally:
            self._image_memo = None
            self.train(was_training)

    def _generate_media(
        self, batch: MediaBatch, cached: bool, max_new_tokens: int, kwargs: dict[str, Any]
    ) -> Tensor:
        strategy = self.strategy
        if batch.sequence_ids is not None or batch.position_ids is not None:
            raise ValueError(
                "VLMWrapper.generate: a MediaBatch with sequence_ids (packing) or "
                "position_ids cannot be generated from; give one prompt per row"
            )
        if "attention_mask" in kwargs:
            raise TypeError(
                "VLMWrapper.generate(batch): the padding comes from batch.attention_mask; "
                "do not pass attention_mask"
            )
        if not strategy.supports_media:
            raise ValueError(strategy._prefix_only_message())
        was_training = self.training
        self.eval()
        px = batch.pixel_values
        if px is not None:
            self._image_memo = _ImageMemo(px, batch.frame_mask)
        try:
            context = strategy.prepare_media(self, batch)
            media = self.encode_media(batch) if cached else None

            def cached_step(
                _step: int, new: Tensor, cache: KVCache | None
            ) -> ModalityContext | None:
                assert cache is not None and media is not None
                return strategy.media_decode_context(media, new, cache)

            prompt_len = batch.input_ids.shape[1]

            def recompute_step(_step: int, ids: Tensor, _cache: KVCache | None) -> ModalityContext:
                return strategy.prepare_media(self, batch.extended(ids[:, prompt_len:]))

            return _generate(
                self.transformer,
                batch.input_ids,
                max_new_tokens=max_new_tokens,
                context=context,
                decode_context_fn=cached_step if cached else recompute_step,
                use_cache=cached,
                attention_mask=batch.attention_mask,
                **kwargs,
            )
        finally:
            self._image_memo = None
            self.train(was_training)


def _media_only(
    batch: MediaBatch, input_ids: Tensor | None, frame_mask: Tensor | None
) -> MediaBatch:
    if input_ids is not None or frame_mask is not None:
        raise TypeError(
            "with a MediaBatch, input_ids and frame_mask come from the batch; do not pass "
            "them separately"
        )
    return batch


class _ImageMemo:
    """``encode_images``' result for one ``(pixel_values, frame_mask)`` pair (by
    identity), kept for the duration of one :meth:`VLMWrapper.generate`."""

    def __init__(self, pixel_values: Tensor | VisionFeatures, frame_mask: Tensor | None) -> None:
        self.pixel_values = pixel_values
        self.frame_mask = frame_mask
        self.value: tuple[Tensor, Tensor | None] | None = None
        self.media: tuple[Tensor, Tensor | None, Tensor | None] | None = None

    def matches(self, pixel_values: Tensor | VisionFeatures, frame_mask: Tensor | None) -> bool:
        return pixel_values is self.pixel_values and frame_mask is self.frame_mask
