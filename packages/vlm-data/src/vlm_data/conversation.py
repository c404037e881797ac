"""The ``conversation`` dataset: multi-turn chats with 0..k images anywhere.

A conversation sample is a dict ``{"messages": [...], "pixel_values": (k, 3, H, W),
"meta": {...}}`` (``pixel_values`` absent without images; the ``j``-th image belongs to
the ``j``-th ``<image>`` marker).  :class:`ConversationDataset` is the base of every
conversation dataset: it builds the batch's :class:`~vlm_data.ConversationCollator`
from the job config (:meth:`ConversationDataset.make_collator`), which the trainer
uses instead of the caption collator.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_data.chat import (
    BuiltinChatFormat,
    ConversationCollator,
    Message,
    check_messages,
    load_chat_format,
)
from vlm_data.dataset import DatasetContext, ImageTextDataset, Preprocess
from vlm_data.errors import DataError
from vlm_data.images import load_image
from vlm_data.jsonl import read_jsonl_records
from vlm_data.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from vlm_config import JobConfig
    from vlm_data.conversation_configs import ChatDatasetConfig, ConversationDatasetConfig

__all__ = [
    "ConversationDataset",
    "JsonlConversationDataset",
    "build_conversation",
    "image_placeholders",
    "is_conversation_job",
]


def image_placeholders(job: JobConfig) -> int:
    """Placeholder ids per ``<image>`` of ``job``'s model, from the config alone:
    ``arch.image_placeholder_tokens(adapter tokens x frames)``.

    Raises:
        DataError: the encoder's token count is not known before the model is built.
    """
    from vlm_config import compute_sequence_budget

    budget = compute_sequence_budget(job.encoder, job.adapter, job.arch, job.model)
    if budget.adapter_tokens is None:
        raise DataError(
            f"the {job.encoder.type!r} encoder does not predict its token count from the "
            "config, so the placeholders per <image> are unknown before the model is built"
        )
    return int(job.arch.image_placeholder_tokens(budget.adapter_tokens * budget.frames))


def is_conversation_job(job: JobConfig) -> bool:
    """Whether ``job.data`` is a conversation dataset (its config has chat fields)."""
    from vlm_data.conversation_configs import ChatDatasetConfig

    return isinstance(job.data, ChatDatasetConfig)


class ConversationDataset(ImageTextDataset):
    """Base of conversation datasets (map-style).

    Subclasses set ``config`` (a :class:`~vlm_data.ChatDatasetConfig`) and
    ``image_shape`` (``(3, H, W)`` of the preprocessed images, used for batches without
    any image), and implement ``__len__``, ``__getitem__`` and :meth:`conversations`.
    """

    config: ChatDatasetConfig
    image_shape: tuple[int, ...] | None = None

    def conversations(self) -> list[list[Message]]:
        """The turns of every sample (no image decoded)."""
        raise NotImplementedError

    def captions(self) -> list[str]:
        """Texts to train a word-level tokeniser on: every conversation in the built-in
        chat format, markers removed (so the role tags and replies are in the vocabulary)."""
        fmt = BuiltinChatFormat()
        texts: list[str] = []
        for turns in self.conversations():
            texts += fmt.training_texts(turns, self.config.image_token)
        return texts

    def make_collator(self, tokenizer: TextTokenizer, job: JobConfig) -> ConversationCollator:
        """The collator of this dataset for ``job``: chat format, placeholders per image
        (:func:`image_placeholders`), row length (``data.max_length`` or
        ``model.max_seq_len``) and ``data.loss_on``.

        Raises:
            DataError: clips (``arch.frames_per_clip > 1``) or a chat format that cannot
                be loaded.
        """
        if job.arch.frames_per_clip > 1:
            raise DataError(
                f"the {self.config.type!r} dataset holds still images; arch.frames_per_clip "
                f"is {job.arch.frames_per_clip} (set it to 1)"
            )
        cfg = self.config
        return ConversationCollator(
            tokenizer,
            load_chat_format(cfg.chat_template, cfg.tokenizer, tokenizer),
            placeholders=image_placeholders(job),
            max_length=cfg.max_length or job.model.max_seq_len,
            loss_on=cfg.loss_on,
            image_token=cfg.image_token,
            image_shape=self.image_shape,
        )


def probe_image_shape(preprocess: Preprocess) -> tuple[int, ...]:
    """``(3, H, W)`` of the encoder's preprocessed images (one blank image through it)."""
    from PIL import Image

    return tuple(preprocess([Image.new("RGB", (8, 8))]).shape[1:])


class JsonlConversationDataset(ConversationDataset):
    """Conversations listed in a JSONL manifest (see
    :class:`~vlm_data.ConversationDatasetConfig`); images read in the loader's workers.

    The manifest is checked when the dataset is built: JSON objects with a
    ``messages`` list of turns (roles ``system`` / ``user`` / ``assistant``, the last
    one ``assistant``) and an optional ``images`` list of paths whose length equals the
    number of ``<image>`` markers.

    Raises:
        DataError: a missing manifest or a malformed line (the message names the file,
            the line number, what is wrong and what is allowed).
    """

    def __init__(
        self, manifest: str | Path, preprocess: Preprocess, config: ConversationDatasetConfig
    ) -> None:
        self.manifest = Path(manifest)
        self.preprocess = preprocess
        self.config = config
        records = read_jsonl_records(self.manifest)
        self.lines: list[int] = [n for n, _ in records]
        self.rows: list[dict[str, Any]] = [self._row(row, n) for n, row in records]
        self.image_shape = probe_image_shape(preprocess)

    def _row(self, row: dict[str, Any], n: int) -> dict[str, Any]:
        where = f"{self.manifest}:{n}"
        messages = check_messages(row.get("messages"), where)
        images = row.get("images", [])
        if not (isinstance(images, list) and all(isinstance(p, str) for p in images)):
            raise DataError(f"{where}: 'images' must be a list of file paths")
        marker = self.config.image_token
        markers = sum(m["content"].count(marker) for m in messages)
        if markers != len(images):
            raise DataError(
                f"{where}: {markers} {marker} marker(s) in the messages but {len(images)} "
                "image(s) listed; each image needs exactly one marker, in order"
            )
        return {"messages": messages, "images": [str(self.manifest.parent / p) for p in images]}

    def __len__(self) -> int:
        return len(self.rows)

    def conversations(self) -> list[list[Message]]:
        return [r["messages"] for r in self.rows]

    def describe(self, index: int) -> str:
        return f"{self.manifest}:{self.lines[index]}"

    def __getitem__(self, index: int) -> Any:
        row = self.rows[index]
        record = self.describe(index)
        sample: dict[str, Any] = {
            "messages": row["messages"],
            "meta": {"record": record, "num_images": len(row["images"])},
        }
        if row["images"]:
            sample["pixel_values"] = self.preprocess(
                [load_image(p, record=record) for p in row["images"]]
            )
        return sample


def build_conversation(
    config: ConversationDatasetConfig, context: DatasetContext
) -> dict[str, ConversationDataset]:
    """Builder of the ``conversation`` dataset (``test`` only when ``test_file`` is set)."""
    files: dict[str, str | None] = {"train": config.train_file, "test": config.test_file}
    return {
        split: JsonlConversationDataset(files[split] or "", context.preprocess, config)
        for split in context.splits
        if files.get(split) is not None
    }
