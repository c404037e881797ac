"""Images anywhere: the batch of a sample with 0..k images at placeholder positions.

A :class:`MediaBatch` is what the data side collates: token rows whose image
placeholder ids mark where each image goes, every image of the batch stacked in one
``pixel_values`` tensor, and which row each image belongs to.  The wrapper encodes the
images into :class:`MediaEmbeds` (visual tokens per image plus the :class:`MediaLayout`
that places them) and hands it to the arch (``ArchImplementation.media_context``),
which decides how the tokens enter the decoder.  The helpers below build the pieces an
arch needs without knowing any arch:

- :func:`scatter_fields`: visual tokens written into the placeholder positions of the
  residual stream (plus key padding for padded frames);
- :func:`side_fields`: per-row stacked image features with a media mask (each
  position reads only the images whose placeholder is at or before it, in its own
  packed sample);
- :func:`base_fields`: key padding, packing ids and the distributed gradient anchor
  that every media context carries.

Placeholders per image: an arch that puts ``n > 0`` image positions into the residual
stream for an image of ``T`` visual tokens (``ArchConfig.residual_image_positions(T)``)
needs ``n`` placeholder ids per image; an arch that reads images from the side (``n ==
0``) needs one placeholder id per image (the marker whose position orders the image in
the text).  :func:`placeholders_per_image` is that rule, torch-free in spirit.

Text-only batches and FSDP2: ``pixel_values`` of shape ``(0, 3, H, W)`` (no image in
this micro-batch) still runs the vision encoder and adapter on one zero image; the
result times 0 is :attr:`MediaEmbeds.dummy`.  Archs feed it in so every parameter of
the encoder, adapter and arch blocks takes part in forward and backward with an exactly
zero contribution, so FSDP2's all-gathers and reduce-scatters happen on every rank in
the same order whether or not its micro-batch holds an image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MediaBatch",
    "MediaEmbeds",
    "MediaLayout",
    "base_fields",
    "placeholders_per_image",
    "scatter_fields",
    "side_decode_fields",
    "side_fields",
]


def placeholders_per_image(residual_positions: int) -> int:
    """Placeholder ids per image: the arch's residual image positions, or 1 when the
    arch reads images from the side (0 residual positions)."""
    return residual_positions if residual_positions > 0 else 1


def _shape(t: Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


@dataclass(frozen=True)
class MediaBatch:
    """A batch of samples with images anywhere (and optionally packed).

    Notation: ``B`` rows, ``S`` tokens per row, ``N`` images in the batch (any number,
    including 0), ``F`` frames per clip.

    Attributes:
        input_ids: ``(B, S)`` long tokens; each image occupies ``placeholders`` (see
            :func:`placeholders_per_image`) consecutive-in-order positions holding
            ``image_token_id`` (the data side expands one ``<image>`` into that many ids
            before collation). The ``j``-th group of placeholders of row ``b`` belongs
            to the ``j``-th image of row ``b``.
        image_token_id: the placeholder id.
        pixel_values: ``(N, 3, H, W)`` images or ``(N, F, 3, H, W)`` clips, all images of
            the batch in row order then text order; ``N == 0`` for a text-only batch
            (keep ``H, W``: the encoder still runs on one zero image, see the module
            docstring). ``None`` only for a text-only batch outside distributed
            training (then no encoder runs).
        image_sample_index: ``(N,)`` long, the row of each image, non-decreasing.
        frame_mask: ``(N, F)`` bool, True = real frame (clips only).
        attention_mask: ``(B, S)`` bool/int, True/1 = real token, False/0 = padding.
        position_ids: ``(B, S)`` long rotary positions; default: restart at every
            sample start (packing) and skip padding.
        sequence_ids: ``(B, S)`` long, packing: the sample of each position (a sample
            is a contiguous run of one id; trailing padding may be its own sample).
            No attention, position or arch state crosses a sample boundary.
        labels: ``(B, S)`` long aligned with ``input_ids`` (``-100`` ignored; the data
            side ignores placeholder positions), used by ``VLMWrapper.loss``.
        placeholder_mask: ``(B, S)`` bool overriding ``input_ids == image_token_id``
            (generation uses it so a generated token never becomes a placeholder).

    Raises:
        ValueError: at construction, for wrong ranks, dtypes or shapes (the message
            names the field and the expected shape), ``image_sample_index`` out of
            ``[0, B)`` or decreasing, or ``pixel_values`` without
            ``image_sample_index``. Placeholder counts are checked against the model
            in :meth:`layout`.
    """

    input_ids: Tensor
    image_token_id: int
    pixel_values: Tensor | None = None
    image_sample_index: Tensor | None = None
    frame_mask: Tensor | None = None
    attention_mask: Tensor | None = None
    position_ids: Tensor | None = None
    sequence_ids: Tensor | None = None
    labels: Tensor | None = None
    placeholder_mask: Tensor | None = None

    def __post_init__(self) -> None:
        ids = self.input_ids
        if ids.ndim != 2 or ids.dtype != torch.long:
            raise ValueError(
                f"MediaBatch.input_ids must be a (B, S) long tensor, got {_shape(ids)} {ids.dtype}"
            )
        b, s = ids.shape
        for name in ("attention_mask", "position_ids", "sequence_ids", "labels"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (b, s):
                raise ValueError(f"MediaBatch.{name} must be (B, S) = ({b}, {s}), got {_shape(t)}")
        for name in ("position_ids", "sequence_ids", "labels"):
            t = getattr(self, name)
            if t is not None and t.dtype != torch.long:
                raise ValueError(f"MediaBatch.{name} must be long, got {t.dtype}")
        pm = self.placeholder_mask
        if pm is not None and (tuple(pm.shape) != (b, s) or pm.dtype != torch.bool):
            raise ValueError(
                f"MediaBatch.placeholder_mask must be a ({b}, {s}) bool tensor, got "
                f"{_shape(pm)} {pm.dtype}"
            )
        px = self.pixel_values
        if px is None:
            if self.image_sample_index is not None and self.image_sample_index.numel():
                raise ValueError("MediaBatch.image_sample_index given without pixel_values")
            return
        if px.ndim not in (4, 5) or not px.is_floating_point():
            raise ValueError(
                "MediaBatch.pixel_values must be floating (N, 3, H, W) images or (N, F, 3, H, "
                f"W) clips, got {_shape(px)} {px.dtype}"
            )
        n = px.shape[0]
        idx = self.image_sample_index
        if idx is None:
            if n:
                raise ValueError(
                    f"MediaBatch.image_sample_index (N,) = ({n},) long is required with {n} "
                    "image(s): the row of each image"
                )
        else:
            if idx.ndim != 1 or idx.dtype != torch.long or idx.shape[0] != n:
                raise ValueError(
                    f"MediaBatch.image_sample_index must be a ({n},) long tensor (one row "
                    f"index per image), got {_shape(idx)} {idx.dtype}"
                )
            if n and not torch.compiler.is_compiling():
                if int(idx.min()) < 0 or int(idx.max()) >= b:
                    raise ValueError(
                        f"MediaBatch.image_sample_index values must be in [0, {b}), got "
                        f"{idx.tolist()}"
                    )
                if n > 1 and bool((idx[1:] < idx[:-1]).any()):
                    raise ValueError(
                        "MediaBatch.image_sample_index must be non-decreasing (images in row "
                        f"order), got {idx.tolist()}"
                    )
        fm = self.frame_mask
        if fm is not None:
            frames = px.shape[1] if px.ndim == 5 else 1
            if tuple(fm.shape) != (n, frames):
                raise ValueError(
                    f"MediaBatch.frame_mask must be (N, F) = ({n}, {frames}), got {_shape(fm)}"
                )

    @property
    def num_images(self) -> int:
        """``N``."""
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    def placeholders(self) -> Tensor:
        """``(B, S)`` bool placeholder positions."""
        if self.placeholder_mask is not None:
            return self.placeholder_mask
        return self.input_ids == self.image_token_id

    def key_valid(self) -> Tensor | None:
        """``(B, S)`` bool real tokens from ``attention_mask`` (``None``: all real)."""
        return None if self.attention_mask is None else self.attention_mask.to(torch.bool)

    def extended(self, new_ids: Tensor) -> MediaBatch:
        """This batch with ``new_ids (B, s)`` generated tokens appended: they are text
        (never placeholders), real, and continue their row's last sample.

        Raises:
            ValueError: ``new_ids`` is not ``(B, s)`` long.
        """
        b = self.input_ids.shape[0]
        if new_ids.ndim != 2 or new_ids.shape[0] != b or new_ids.dtype != torch.long:
            raise ValueError(f"new_ids must be ({b}, s) long, got {_shape(new_ids)}")
        s = new_ids.shape[1]

        def grow(t: Tensor | None, fill: Any) -> Tensor | None:
            if t is None:
                return None
            return torch.cat((t, t.new_full((b, s), fill)), dim=1)

        seq = self.sequence_ids
        return replace(
            self,
            input_ids=torch.cat((self.input_ids, new_ids), dim=1),
            placeholder_mask=grow(self.placeholders(), False),
            attention_mask=grow(self.attention_mask, True),
            sequence_ids=None if seq is None else torch.cat((seq, seq[:, -1:].expand(b, s)), 1),
            position_ids=None,
            labels=None,
        )

    def layout(self, placeholders: int) -> MediaLayout:
        """Where each image goes, for an arch that needs ``placeholders`` ids per image.

        Raises:
            ValueError: a row's placeholder count is not ``placeholders`` times its image
                count (the message names the row and both numbers).
        """
        mask = self.placeholders()
        b = mask.shape[0]
        device = mask.device
        n = self.num_images
        rows = (
            torch.zeros(0, dtype=torch.long, device=device)
            if self.image_sample_index is None
            else self.image_sample_index.to(device)
        )
        per_row = torch.bincount(rows, minlength=b)
        found = mask.sum(dim=1)
        wanted = per_row * placeholders
        if not torch.equal(found, wanted):
            bad = int((found != wanted).nonzero()[0, 0])
            raise ValueError(
                f"MediaBatch row {bad} has {int(found[bad])} image placeholder token(s) "
                f"(id {self.image_token_id}) but {int(per_row[bad])} image(s) x "
                f"{placeholders} placeholder(s) each = {int(wanted[bad])} expected"
            )
        # position of the first placeholder of every image, in image order
        where = mask.nonzero()  # (N * placeholders, 2), row-major
        starts = where[::placeholders, 1] if n else where.new_zeros(0)
        first_of_row = torch.cumsum(per_row, 0) - per_row
        slot = torch.arange(n, device=device) - first_of_row[rows]
        max_images = int(per_row.max()) if b and n else 0
        return MediaLayout(
            placeholder_mask=mask,
            image_row=rows,
            image_start=starts,
            image_slot=slot,
            max_images=max_images,
            placeholders=placeholders,
        )


@dataclass(frozen=True)
class MediaLayout:
    """Where the images of a :class:`MediaBatch` sit.

    Attributes:
        placeholder_mask: ``(B, S)`` bool placeholder positions.
        image_row: ``(N,)`` long row of each image.
        image_start: ``(N,)`` long position of each image's first placeholder.
        image_slot: ``(N,)`` long index of each image within its row (0, 1, ...).
        max_images: the largest image count of a row (0 for a text-only batch).
        placeholders: placeholder ids per image.
    """

    placeholder_mask: Tensor
    image_row: Tensor
    image_start: Tensor
    image_slot: Tensor
    max_images: int
    placeholders: int


@dataclass(frozen=True)
class MediaEmbeds:
    """What ``VLMWrapper.encode_media`` gives an arch.

    Attributes:
        batch: the :class:`MediaBatch`.
        layout: its :class:`MediaLayout` for this arch's placeholder count.
        tokens: ``(N, T, D)`` visual tokens per image in the decoder's dtype (frames
            concatenated in order; padded frames' tokens zeroed).
        valid: ``(N, T)`` bool, False for tokens of padded frames; ``None`` = all real.
        dummy: for a batch with no image but a ``(0, ...)`` ``pixel_values``: ``(1, T,
            D)`` = (encoder and adapter on one zero image) ``* 0``; exactly zero, but its
            autograd graph reaches every encoder and adapter parameter. ``None``
            otherwise.
    """

    batch: MediaBatch
    layout: MediaLayout
    tokens: Tensor
    valid: Tensor | None
    dummy: Tensor | None

    def anchor(self) -> Tensor | None:
        """A 0-d exact zero carrying :attr:`dummy`'s graph (``None`` without a dummy)."""
        return None if self.dummy is None else self.dummy.sum()


def base_fields(media: MediaEmbeds, *, anchor: bool = True) -> dict[str, Any]:
    """``key_padding_mask`` (from ``attention_mask``), ``sequence_ids`` and, with
    ``anchor``, ``grad_anchor`` (:meth:`MediaEmbeds.anchor`) for a ``ModalityContext``."""
    batch = media.batch
    fields: dict[str, Any] = {
        "key_padding_mask": batch.key_valid(),
        "sequence_ids": batch.sequence_ids,
    }
    if anchor:
        fields["grad_anchor"] = media.anchor()
    return fields


def scatter_fields(media: MediaEmbeds) -> dict[str, Any]:
    """Context fields that write the visual tokens into the placeholder positions.

    Needs one placeholder per visual token (``layout.placeholders == T``). Returns
    :func:`base_fields` plus ``placeholder_mask``/``placeholder_embeds`` (``(N*T, D)``
    in row-major placeholder order); padded frames' positions become padding keys.

    Raises:
        ValueError: the arch's placeholder count is not the number of visual tokens.
    """
    layout, tokens = media.layout, media.tokens
    t = tokens.shape[1]
    if layout.placeholders != t:
        raise ValueError(
            f"scatter_fields needs one placeholder per visual token ({t}), the layout has "
            f"{layout.placeholders} per image"
        )
    fields = base_fields(media)
    fields["placeholder_mask"] = layout.placeholder_mask
    fields["placeholder_embeds"] = tokens.reshape(-1, tokens.shape[-1])
    if media.valid is not None:
        keys = torch.ones_like(layout.placeholder_mask)
        keys = keys.masked_scatter(layout.placeholder_mask, media.valid.reshape(-1))
        kpm = fields["key_padding_mask"]
        fields["key_padding_mask"] = keys if kpm is None else kpm & keys
    return fields


def side_fields(media: MediaEmbeds) -> dict[str, Any]:
    """Context fields for archs that read images from the side (cross-attention).

    Returns :func:`base_fields` (without the anchor: the dummy rides in the features)
    plus

    - ``image_features (B, K*T, D)``: row ``b`` holds its ``K_b`` images' tokens in
      order (``K = layout.max_images``), zeros after;
    - ``image_mask (B, K*T)`` bool: real tokens of real images (what a cached decode
      step, which comes after every image of its row, may read);
    - ``image_query_mask (B, S, K*T)`` bool: position ``p`` may read image ``j`` of its
      row when ``j``'s first placeholder is at or before ``p`` and, when packed, in
      ``p``'s sample.

    A text-only batch with a :attr:`MediaEmbeds.dummy` gets the dummy (exact zeros) as
    one invisible image per row (all masks False), so the arch's blocks still run.
    """
    batch, layout, tokens = media.batch, media.layout, media.tokens
    b, s = batch.input_ids.shape
    fields = base_fields(media, anchor=False)
    if layout.max_images == 0:
        if media.dummy is None:
            return fields
        t, d = media.dummy.shape[1:]
        features = media.dummy.expand(b, t, d)
        fields["image_features"] = features
        fields["image_mask"] = torch.zeros(b, t, dtype=torch.bool, device=features.device)
        fields["image_query_mask"] = torch.zeros(b, s, t, dtype=torch.bool, device=features.device)
        return fields
    t, d = tokens.shape[1:]
    k = layout.max_images
    slot = layout.image_row * k + layout.image_slot  # (N,) into (B*K)
    features = tokens.new_zeros(b * k, t, d).index_copy(0, slot, tokens).view(b, k * t, d)
    valid = media.valid
    if valid is None:
        valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    key = torch.zeros(b * k, t, dtype=torch.bool, device=tokens.device)
    key = key.index_copy(0, slot, valid).view(b, k * t)
    # start position of every (row, slot); unused slots start after the row
    starts = torch.full((b * k,), s, dtype=torch.long, device=tokens.device)
    starts = starts.index_copy(0, slot, layout.image_start).view(b, k)
    pos = torch.arange(s, device=tokens.device)
    sees = starts[:, None, :] <= pos[None, :, None]  # (B, S, K)
    seq = batch.sequence_ids
    if seq is not None:
        image_seq = seq.gather(1, starts.clamp_max(s - 1))  # (B, K)
        sees = sees & (seq[:, :, None] == image_seq[:, None, :])
    query = sees.repeat_interleave(t, dim=2) & key[:, None, :]
    fields["image_features"] = features
    fields["image_mask"] = key
    fields["image_query_mask"] = query
    return fields


def side_decode_fields(media: MediaEmbeds, new_len: int) -> dict[str, Any]:
    """:func:`side_fields` for ``new_len`` decoded positions after the prompt: they
    come after every image of their row, so each reads all of its row's real image
    tokens (``image_query_mask (B, new_len, K*T)`` = ``image_mask`` repeated); ``{}``
    when the batch has no image and no dummy."""
    fields = side_fields(media)
    if "image_features" not in fields:
        return {}
    key = fields["image_mask"]
    return {
        "image_features": fields["image_features"],
        "image_mask": key,
        "image_query_mask": key[:, None, :].expand(key.shape[0], new_len, key.shape[1]),
    }
