"""The collator: pixels stacked, prompt + caption tokenised into fixed-length rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vlm_data.dataset import Batch, Sample
from vlm_data.errors import CaptionTooLongError, DataError
from vlm_data.tokenizer import TextTokenizer

__all__ = ["IGNORE_INDEX", "ImageTextCollator"]

#: label of positions outside the loss (PyTorch's cross-entropy default)
IGNORE_INDEX = -100


class ImageTextCollator:
    """Stack pixels and tokenise text into fixed-length ``(B, max_text_len)`` tensors.

    Text layout: ``[BOS] prompt caption [EOS] [PAD]...``.  Prompt and caption are
    tokenised separately, so ``labels`` are exactly ``-100`` on BOS, the prompt and the
    padding and equal ``input_ids`` on the caption and its EOS.  Every sequence is
    padded to ``max_text_len``, so every rank of a data-parallel job sees equal shapes.

    Text-only samples (no ``pixel_values``) get zero pixels of the batch's image shape
    and ``image_mask[row] = False`` (``image_mask`` is all ``True`` when every sample has
    an image); a batch of only text-only samples gets ``(B, 3, 1, 1)`` zeros unless
    ``image_shape`` is given.

    Raises (from ``__call__`` / :meth:`encode`):
        CaptionTooLongError: BOS + prompt + caption + EOS exceed ``max_text_len``.
        DataError: an empty batch, or samples whose pixels differ in shape.
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        max_text_len: int,
        *,
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.image_shape = image_shape

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

    def encode(self, prompt: str, caption: str) -> tuple[list[int], list[int]]:
        """Unpadded ``(input_ids, labels)`` of one sample."""
        head = self.prompt_ids(prompt)
        tail = [*self.tokenizer.encode(caption), self.tokenizer.eos_id]
        if len(head) + len(tail) > self.max_text_len:
            raise CaptionTooLongError(
                f"prompt + caption take {len(head) + len(tail)} tokens (with BOS/EOS) but "
                f"arch.max_text_len is {self.max_text_len}: {caption[:60]!r}"
            )
        return head + tail, [IGNORE_INDEX] * len(head) + tail

    def max_new_tokens(self, prompt: str) -> int:
        """Room left after ``prompt`` for generated tokens."""
        return self.max_text_len - len(self.prompt_ids(prompt))

    def _pixels(self, samples: Sequence[Sample]) -> tuple[Tensor, Tensor, Tensor | None]:
        with_image = [s for s in samples if "pixel_values" in s]
        shapes = {tuple(s["pixel_values"].shape) for s in with_image}
        if len(shapes) > 1:
            raise DataError(f"samples of one batch have different pixel shapes: {sorted(shapes)}")
        shape = shapes.pop() if shapes else (self.image_shape or (3, 1, 1))
        image_mask = torch.tensor(["pixel_values" in s for s in samples], dtype=torch.bool)
        if len(with_image) == len(samples):
            pixels = torch.stack([s["pixel_values"] for s in samples])
        else:
            dtype = with_image[0]["pixel_values"].dtype if with_image else torch.float32
            pixels = torch.zeros((len(samples), *shape), dtype=dtype)
            for row, s in enumerate(samples):
                if "pixel_values" in s:
                    pixels[row] = s["pixel_values"]
        frame_mask = None
        if any("frame_mask" in s for s in samples):
            frames = shape[0]
            frame_mask = torch.zeros((len(samples), frames), dtype=torch.bool)
            for row, s in enumerate(samples):
                if "frame_mask" in s:
                    frame_mask[row] = s["frame_mask"]
        return pixels, image_mask, frame_mask

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        if not samples:
            raise DataError("cannot collate an empty batch")
        size = self.max_text_len
        ids = torch.full((len(samples), size), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), size), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), size), dtype=torch.bool)
        for row, sample in enumerate(samples):
            x, y = self.encode(sample.get("prompt", ""), sample["caption"])
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = True
        pixels, image_mask, frame_mask = self._pixels(samples)
        skipped = [m for s in samples for m in s.get("meta", {}).get("skipped", [])]
        return {
            "pixel_values": pixels,
            "frame_mask": frame_mask,
            "image_mask": image_mask,
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "prompts": [s.get("prompt", "") for s in samples],
            "captions": [s["caption"] for s in samples],
            "meta": [s.get("meta", {}) for s in samples],
            "skipped": skipped,
        }

    def prompt_batch(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded ``(B, P)`` prompt ids (BOS + prompt) and their attention mask."""
        encoded = [self.prompt_ids(p) for p in prompts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.bool)
        for row, e in enumerate(encoded):
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = True
        return ids, mask
