"""Torch-free configs of the conversation datasets (entry-point group ``vlm.datasets``).

A conversation sample is a list of turns ``{"role": "system" | "user" | "assistant",
"content": "text with <image> markers"}`` plus 0..k images, the ``j``-th image going
where the ``j``-th ``<image>`` marker is (images anywhere).  The builders live in
:mod:`vlm_data.conversation` and :mod:`vlm_data.digits_sum` (imported only when a
dataset is built).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from vlm_config import DatasetConfig

__all__ = [
    "ChatDatasetConfig",
    "ConversationDatasetConfig",
    "DigitsSumDatasetConfig",
]

Role = Literal["system", "user", "assistant"]
_ASSISTANT: tuple[Role, ...] = ("assistant",)


class ChatDatasetConfig(DatasetConfig):
    """Fields every conversation dataset has (besides the common dataset fields).

    Attributes:
        chat_template: how turns become text.  ``"tokenizer"``: the Jinja
            ``chat_template`` of the ``tokenizer_config.json`` next to
            ``data.tokenizer``, applied by Hugging Face ``transformers``
            (``vlm-data[chat]``); ``"builtin"``: the toolkit's own fixed formatter for
            tokenisers it trains itself (:class:`vlm_data.BuiltinChatFormat`);
            ``"auto"``: ``"tokenizer"`` when ``data.tokenizer`` is set, else
            ``"builtin"``.
        loss_on: the roles whose tokens are trained (the others are ``-100`` in the
            labels, as are image placeholders, padding and template tokens such as
            a turn's role header).
        max_length: tokens per row, image placeholders included (rows are padded to
            it so every rank sees one shape); ``None``: ``model.max_seq_len``.
        image_token: the marker of an image in a turn's content.
    """

    chat_template: Literal["auto", "tokenizer", "builtin"] = "auto"
    loss_on: list[Role] = Field(default_factory=lambda: list(_ASSISTANT), min_length=1)
    max_length: int | None = Field(default=None, ge=2)
    image_token: str = Field(default="<image>", min_length=1)

    @field_validator("loss_on")
    @classmethod
    def _unique_roles(cls, roles: list[str]) -> list[str]:
        if len(set(roles)) != len(roles):
            raise ValueError(f"loss_on lists a role twice: {roles}")
        return roles


class ConversationDatasetConfig(ChatDatasetConfig):
    """JSONL manifests of conversations, one object per line::

        {"messages": [{"role": "user", "content": "<image> and <image>: what is their sum?"},
                      {"role": "assistant", "content": "twelve"}],
         "images": ["a.png", "b.png"]}

    ``images`` (optional) are local files, relative paths resolved against the
    manifest's folder, in the order of the ``<image>`` markers; their number must equal
    the number of markers.  Every conversation ends with an assistant turn (the
    held-out evaluation generates it from the turns before it).
    """

    type: Literal["conversation"] = "conversation"
    train_file: str = Field(description="training manifest (.jsonl)")
    test_file: str | None = Field(default=None, description="held-out manifest (.jsonl)")
    implementation: ClassVar[str] = "vlm_data.conversation:build_conversation"


class DigitsSumDatasetConfig(ChatDatasetConfig):
    """A built-in multimodal chat task from scikit-learn's embedded digits (no download).

    Questions about two digit images placed anywhere in the text ("<image> and <image>:
    what is their sum?" -> "twelve"), mixed with one-image questions ("which digit is
    <image> ?" -> "three"), text-only arithmetic turns ("what is three plus four?" ->
    "seven") and two-turn conversations.  Held-out conversations use
    only held-out digit images.  Needs ``vlm-data[digits]``.

    Attributes:
        train_size / test_size: conversations per split (each a pure function of
            ``split_seed``, the split and its index).
        text_only_fraction: share of conversations without images.
        digit_fraction: share of one-image "which digit is <image> ?" conversations.
        multi_turn_fraction: share of two-image conversations preceded by a text-only
            turn.
        show_work: a two-image reply names the pictured digits before the sum
            ("five plus seven is twelve") instead of the sum alone ("twelve").
    """

    type: Literal["digits_sum"] = "digits_sum"
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    split_seed: int = 0
    augment_shift: int = Field(default=0, ge=0, le=3)
    train_size: int = Field(default=20000, ge=1)
    test_size: int = Field(default=500, ge=1)
    text_only_fraction: float = Field(default=0.2, ge=0, le=1)
    digit_fraction: float = Field(default=0.3, ge=0, le=1)
    multi_turn_fraction: float = Field(default=0.2, ge=0, le=1)
    show_work: bool = False

    @model_validator(mode="after")
    def _fractions(self) -> DigitsSumDatasetConfig:
        if self.text_only_fraction + self.digit_fraction > 1:
            raise ValueError(
                f"text_only_fraction ({self.text_only_fraction}) + digit_fraction "
                f"({self.digit_fraction}) must be <= 1"
            )
        return self

    implementation: ClassVar[str] = "vlm_data.digits_sum:build_digits_sum"
