"""The ``digits_sum`` demo: a multimodal chat task built from the embedded digits.

Every conversation is a pure function of ``(split_seed, split, index)``:

- an **image question**: two digit images anywhere in the text, e.g. ``"<image> and
  <image> : what is their sum ?"`` or ``"what is <image> plus <image> ?"`` -> the sum in
  words (``"twelve"``), or with ``show_work`` the pictured digits then the sum
  (``"five plus seven is twelve"``: each image gets its own supervised word, which a
  from-scratch vision tower learns from many times faster than from the sum alone);
- a **digit question** about one image: ``"which digit is <image> ?"`` -> ``"three"``
  (``digit_fraction`` of the conversations: the direct supervision a from-scratch
  vision tower needs to learn the digits quickly);
- a **text-only question**: ``"what is three plus four ?"`` -> ``"seven"``
  (``text_only_fraction`` of the conversations);
- a **two-turn** conversation: a text-only question and its answer, then an image
  question (``multi_turn_fraction`` of the image conversations).

Held-out conversations draw their images from the held-out digits only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from vlm_data.chat import Message
from vlm_data.conversation import ConversationDataset, probe_image_shape
from vlm_data.dataset import DatasetContext
from vlm_data.digits import DIGIT_WORDS, DigitsCaptionDataset
from vlm_data.errors import DataError

if TYPE_CHECKING:
    from vlm_data.conversation_configs import DigitsSumDatasetConfig

__all__ = ["NUMBER_WORDS", "DigitsSumDataset", "build_digits_sum"]

#: 0..18 in words (every sum of two digits)
NUMBER_WORDS = (
    *DIGIT_WORDS,
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
)

#: image questions: ``{a}`` / ``{b}`` are the two image markers
IMAGE_QUESTIONS = (
    "{a} and {b} : what is their sum ?",
    "what is {a} plus {b} ?",
    "add {a} and {b} .",
    "how much is {a} plus {b} ?",
    "{a} plus {b} makes how much ?",
)
#: one-image questions: ``{a}`` is the image marker
DIGIT_QUESTIONS = (
    "which digit is {a} ?",
    "{a} : what digit is this ?",
    "name the digit in {a} .",
)
#: text-only questions: ``{a}`` / ``{b}`` are digit words
TEXT_QUESTIONS = (
    "what is {a} plus {b} ?",
    "how much is {a} plus {b} ?",
    "add {a} and {b} .",
)


class DigitsSumDataset(ConversationDataset):
    """Sum-of-two-digits conversations (see the module docstring).

    Samples carry ``meta["kind"]`` (``"sum"``: two images, ``"digit"``: one image,
    ``"text"``: none, ``"two_turn"``: a text-only turn then a two-image question) and
    ``meta["num_images"]``.
    """

    def __init__(
        self,
        split: str,
        config: DigitsSumDatasetConfig,
        context: DatasetContext,
        images: DigitsCaptionDataset | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.config = config
        self.images = images or DigitsCaptionDataset(
            split,
            context.preprocess,
            test_fraction=config.test_fraction,
            seed=config.split_seed,
            augment_shift=config.augment_shift,
        )
        self.image_shape = probe_image_shape(context.preprocess)
        size = config.train_size if split == "train" else config.test_size
        rng = np.random.default_rng([config.split_seed, 0 if split == "train" else 1, 14])
        self.kinds: list[str] = []
        self.turns: list[list[Message]] = []
        self.picks: list[list[int]] = []
        n_images = len(self.images)
        marker = config.image_token
        for _ in range(size):
            u = rng.random()
            text_only = u < config.text_only_fraction
            digit = not text_only and u < config.text_only_fraction + config.digit_fraction
            two_turn = not (text_only or digit) and rng.random() < config.multi_turn_fraction
            turns: list[Message] = []
            picks: list[int] = []
            if digit:
                picks = [int(rng.integers(0, n_images))]
                q = DIGIT_QUESTIONS[int(rng.integers(len(DIGIT_QUESTIONS)))]
                turns += [
                    {"role": "user", "content": q.format(a=marker)},
                    {
                        "role": "assistant",
                        "content": DIGIT_WORDS[int(self.images.labels[picks[0]])],
                    },
                ]
                self.kinds.append("digit")
                self.turns.append(turns)
                self.picks.append(picks)
                continue
            if text_only or two_turn:
                a, b = (int(x) for x in rng.integers(0, 10, size=2))
                q = TEXT_QUESTIONS[int(rng.integers(len(TEXT_QUESTIONS)))]
                turns += [
                    {"role": "user", "content": q.format(a=DIGIT_WORDS[a], b=DIGIT_WORDS[b])},
                    {"role": "assistant", "content": NUMBER_WORDS[a + b]},
                ]
            if not text_only:
                picks = [int(x) for x in rng.integers(0, n_images, size=2)]
                a, b = (int(self.images.labels[j]) for j in picks)
                q = IMAGE_QUESTIONS[int(rng.integers(len(IMAGE_QUESTIONS)))]
                reply = NUMBER_WORDS[a + b]
                if config.show_work:
                    reply = f"{DIGIT_WORDS[a]} plus {DIGIT_WORDS[b]} is {reply}"
                turns += [
                    {"role": "user", "content": q.format(a=marker, b=marker)},
                    {"role": "assistant", "content": reply},
                ]
            self.kinds.append("text" if text_only else "two_turn" if two_turn else "sum")
            self.turns.append(turns)
            self.picks.append(picks)

    def __len__(self) -> int:
        return len(self.turns)

    def conversations(self) -> list[list[Message]]:
        return self.turns

    def describe(self, index: int) -> str:
        return f"digits_sum {self.split} conversation {index}"

    def augment(self, pixel_values: Tensor, generator: torch.Generator) -> Tensor:
        """A random shift of each image on its own (``augment_shift``)."""
        return self.images.augment(pixel_values, generator)

    def __getitem__(self, index: int) -> Any:
        picks = self.picks[index]
        sample: dict[str, Any] = {
            "messages": self.turns[index],
            "meta": {
                "record": self.describe(index),
                "kind": self.kinds[index],
                "num_images": len(picks),
            },
        }
        if picks:
            sample["pixel_values"] = self.images.pixels[torch.as_tensor(picks)]
        return sample


def build_digits_sum(
    config: DigitsSumDatasetConfig, context: DatasetContext
) -> dict[str, DigitsSumDataset]:
    """Builder of the ``digits_sum`` dataset (``train`` and ``test`` splits)."""
    return {split: DigitsSumDataset(split, config, context) for split in context.splits}
