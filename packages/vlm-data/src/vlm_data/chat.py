"""Conversations -> token rows: chat templates, role loss masks, image placeholders.

A conversation is a list of turns ``{"role": "system" | "user" | "assistant",
"content": str}``; an ``<image>`` marker in a turn's content stands for the next
image of the sample.  Turning it into a training row takes three steps:

1. **Render** the turns into text segments tagged with the role they belong to
   (:meth:`ChatFormat.render`).  Two formats:

   - :class:`TemplateChatFormat`: the Jinja ``chat_template`` of a tokenizer folder
     (``tokenizer_config.json``), applied by Hugging Face ``transformers``
     (``apply_chat_template``; install ``vlm-data[chat]``).  Role spans come from
     rendering growing prefixes of the conversation: turn ``i``'s text is what
     rendering turns ``0..i`` adds to rendering turns ``0..i-1``, and an assistant
     turn's header is what ``add_generation_prompt=True`` adds (a template token, never
     trained: generation starts right after it).  This needs a *prefix-stable*
     template (rendering fewer turns gives a prefix of the text); other templates are
     refused with a message saying so.
   - :class:`BuiltinChatFormat`: a fixed, documented formatter for the small
     tokenisers the toolkit trains itself (the digits demos), with role tags that are
     single words of such a tokeniser.

2. **Tokenise** the rendered text with the sample's ``tokenizers`` tokeniser, cut at
   every ``<image>`` marker; each marker becomes ``placeholders`` placeholder
   positions (``ArchConfig.image_placeholder_tokens``, computed from the config, no
   model needed).  Each token takes the role of the segment its first character is in.

3. **Label**: a token is trained (label = its id) when its role is in ``loss_on``
   (default: only the assistant's replies, their end-of-turn token included);
   everything else (other roles, template text, placeholders, padding) is ``-100``.

:class:`ConversationCollator` does this for a batch and stacks every image of the
batch for a ``vlm_strategies.MediaBatch`` (``pixel_values (N, 3, H, W)`` in row order
then marker order, ``image_sample_index (N,)``, ``placeholder_mask (B, S)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from vlm_data.errors import CaptionTooLongError, DataError
from vlm_data.tokenizer import TextTokenizer

__all__ = [
    "ROLES",
    "BuiltinChatFormat",
    "ChatFormat",
    "ConversationCollator",
    "EncodedConversation",
    "TemplateChatFormat",
    "check_messages",
    "load_chat_format",
]

#: the roles a turn may have
ROLES = ("system", "user", "assistant")
#: the role of rendered text that belongs to no turn (role headers, separators, BOS)
TEMPLATE = "template"
IGNORE_INDEX = -100

Message = Mapping[str, str]
Segment = tuple[str, str]  # (text, role)


def check_messages(messages: Any, record: str, *, final_assistant: bool = True) -> list[Message]:
    """Validate the turns of one record and return them as ``[{"role", "content"}]``.

    Raises:
        DataError: not a non-empty list of ``{"role", "content"}`` objects, a role
            outside :data:`ROLES`, a system turn after the first turn, or (with
            ``final_assistant``) a conversation that does not end with an assistant
            turn.  The message names ``record``.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{record}: 'messages' must be a non-empty list of turns")
    out: list[Message] = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str):
            raise DataError(
                f"{record}: turn {i} must be an object with a string 'content', got {turn!r:.80}"
            )
        role = turn.get("role")
        if role not in ROLES:
            raise DataError(
                f"{record}: turn {i} has role {role!r}; allowed roles: {', '.join(ROLES)}"
            )
        if role == "system" and i > 0:
            raise DataError(f"{record}: turn {i} is a system turn; only the first may be")
        out.append({"role": str(role), "content": str(turn["content"])})
    if final_assistant and out[-1]["role"] != "assistant":
        raise DataError(
            f"{record}: the last turn is a {out[-1]['role']} turn; a training conversation "
            "ends with an assistant turn"
        )
    return out


class ChatFormat(Protocol):
    """Turns -> text segments tagged with their role (see the module docstring)."""

    name: str

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[Segment]:
        """Segments ``(text, role)`` whose concatenation is the rendered conversation;
        ``role`` is a turn's role or ``"template"``.  ``add_generation_prompt`` appends
        the header of an assistant turn (what generation continues from)."""
        ...


class BuiltinChatFormat:
    """The toolkit's own chat format for tokenisers it trains (a simple, deterministic
    formatter, not a Jinja template)::

        [BOS] __system__ {system} __user__ {user} __assistant__ {reply} [EOS] __user__ ...

    ``[BOS]`` / ``[EOS]`` are the tokeniser's own begin/end tokens.  The role tags
    ``__system__``, ``__user__``, ``__assistant__`` are template text (single words of
    a word-level tokeniser trained on :meth:`training_texts`); an assistant turn is its
    reply followed by the end token, so generation stops on EOS after a reply.
    """

    name = "builtin"
    TAGS: Mapping[str, str] = {
        "system": "__system__",
        "user": "__user__",
        "assistant": "__assistant__",
    }

    def __init__(self, bos_token: str = "[BOS]", eos_token: str = "[EOS]") -> None:
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def for_tokenizer(cls, tokenizer: TextTokenizer) -> BuiltinChatFormat:
        """The format using ``tokenizer``'s begin / end token spellings."""
        tok = tokenizer.tokenizer
        return cls(str(tok.id_to_token(tokenizer.bos_id)), str(tok.id_to_token(tokenizer.eos_id)))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[Segment]:
        segments: list[Segment] = [(self.bos_token, TEMPLATE)]
        for turn in messages:
            role = turn["role"]
            segments.append((f" {self.TAGS[role]} ", TEMPLATE))
            text = turn["content"]
            if role == "assistant":
                text = f"{text} {self.eos_token}"
            segments.append((text, role))
        if add_generation_prompt:
            segments.append((f" {self.TAGS['assistant']} ", TEMPLATE))
        return segments

    def training_texts(self, messages: Sequence[Message], image_token: str) -> list[str]:
        """Texts a word-level tokeniser for this format is trained on (markers removed)."""
        text = "".join(t for t, _ in self.render(messages, False))
        return [" ".join(text.replace(image_token, " ").split())]


class TemplateChatFormat:
    """The Jinja ``chat_template`` of a local tokenizer folder, applied by Hugging Face
    ``transformers`` (``AutoTokenizer.from_pretrained(folder)`` then
    ``apply_chat_template(..., tokenize=False)``); nothing is downloaded.

    Raises (at construction):
        DataError: ``transformers`` is not installed (``pip install 'vlm-data[chat]'``),
            the folder cannot be loaded, or its ``tokenizer_config.json`` has no
            ``chat_template``.
    """

    name = "tokenizer"

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder).expanduser()
        if folder.is_file():
            folder = folder.parent
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise DataError(
                "chat templates are applied by Hugging Face transformers: "
                "pip install 'vlm-data[chat]'"
            ) from exc
        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise DataError(f"cannot load the tokenizer folder {folder}: {exc}") from exc
        if not getattr(self.hf, "chat_template", None):
            raise DataError(
                f"{folder / 'tokenizer_config.json'} has no chat_template; add one or set "
                "data.chat_template = 'builtin'"
            )
        self.folder = folder

    def _text(self, messages: Sequence[Message], generation: bool) -> str:
        try:
            text = self.hf.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation
            )
        except Exception as exc:
            raise DataError(f"the chat template of {self.folder} failed: {exc}") from exc
        return str(text)

    def _after(self, prefix: str, text: str, what: str) -> str:
        if not text.startswith(prefix):
            raise DataError(
                f"the chat template of {self.folder} is not prefix-stable ({what} does not "
                "start with the rendering of the turns before it), so role loss masks cannot "
                "be derived from it"
            )
        return text[len(prefix) :]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[Segment]:
        segments: list[Segment] = []
        done = ""
        for i, turn in enumerate(messages):
            if turn["role"] == "assistant" and i > 0:
                head = self._text(messages[:i], True)
                segments.append((self._after(done, head, f"the header of turn {i}"), TEMPLATE))
                done = head
            text = self._text(messages[: i + 1], False)
            segments.append((self._after(done, text, f"turn {i}"), turn["role"]))
            done = text
        if add_generation_prompt:
            head = self._text(messages, True)
            segments.append((self._after(done, head, "the generation prompt"), TEMPLATE))
        return segments


def load_chat_format(
    choice: str, tokenizer_folder: str | Path | None, tokenizer: TextTokenizer
) -> ChatFormat:
    """The chat format of a dataset config (``chat_template`` = ``auto`` | ``tokenizer``
    | ``builtin``; see :class:`vlm_data.ChatDatasetConfig`).

    Raises:
        DataError: ``"tokenizer"`` without a tokenizer folder, or a folder without a
            usable chat template.
    """
    if choice == "builtin" or (choice == "auto" and tokenizer_folder is None):
        return BuiltinChatFormat.for_tokenizer(tokenizer)
    if tokenizer_folder is None:
        raise DataError("data.chat_template = 'tokenizer' needs data.tokenizer (a folder)")
    return TemplateChatFormat(tokenizer_folder)


def has_chat_template(folder: str | Path) -> bool:
    """Whether ``folder``'s ``tokenizer_config.json`` carries a ``chat_template``."""
    path = Path(folder).expanduser()
    cfg = (path.parent if path.is_file() else path) / "tokenizer_config.json"
    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


@dataclass
class EncodedConversation:
    """One conversation as token ids.

    Attributes:
        input_ids: token ids, each image as ``placeholders`` placeholder ids.
        labels: ``-100`` except on the tokens of the roles in ``loss_on``.
        placeholder: ``True`` at image placeholder positions.
        roles: the role of every position (``"image"`` for placeholders).
        num_images: ``<image>`` markers encoded.
    """

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    placeholder: list[bool] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    num_images: int = 0


class ConversationCollator:
    """Conversations (+ their images) -> the fields of a ``vlm_strategies.MediaBatch``.

    Rows are right-padded to ``max_length`` (every rank sees one shape).  The
    placeholder id is the padding id; ``placeholder_mask`` says which positions are
    images, so no vocabulary entry is reserved.

    Args:
        tokenizer: the run's tokeniser.
        chat: how turns become text (:func:`load_chat_format`).
        placeholders: ids per ``<image>`` (``ArchConfig.image_placeholder_tokens``).
        max_length: tokens per row, placeholders included.
        loss_on: the trained roles.
        image_token: the image marker.
        image_shape: ``(3, H, W)`` of the images, for batches without any image.

    Raises (from :meth:`encode` and ``__call__``):
        DataError: a record's image count differs from its marker count (the message
            names the record), or images of different shapes.
        CaptionTooLongError: a conversation longer than ``max_length`` tokens.
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        chat: ChatFormat,
        *,
        placeholders: int,
        max_length: int,
        loss_on: Sequence[str] = ("assistant",),
        image_token: str = "<image>",
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        if placeholders < 1:
            raise ValueError(f"placeholders per image must be >= 1, got {placeholders}")
        unknown = set(loss_on) - set(ROLES)
        if unknown:
            raise ValueError(f"loss_on has unknown roles {sorted(unknown)}; allowed: {ROLES}")
        self.tokenizer = tokenizer
        self.chat = chat
        self.placeholders = placeholders
        self.max_length = max_length
        self.max_text_len = max_length  # what generic code reads as the row width
        self.loss_on = frozenset(loss_on)
        self.image_token = image_token
        self.image_shape = image_shape
        self.image_token_id = tokenizer.pad_id

    # ------------------------------------------------------------------ encoding
    def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer.tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]  # type: ignore[misc]

    def encode(
        self,
        messages: Sequence[Message],
        num_images: int,
        *,
        record: str = "conversation",
        add_generation_prompt: bool = False,
    ) -> EncodedConversation:
        """Token ids, labels and placeholder flags of one conversation.

        Raises:
            DataError: ``num_images`` differs from the ``<image>`` markers of the turns.
        """
        markers = sum(m["content"].count(self.image_token) for m in messages)
        if markers != num_images:
            raise DataError(
                f"{record}: {markers} {self.image_token} marker(s) in the turns but "
                f"{num_images} image(s); each image needs exactly one marker, in order"
            )
        segments = self.chat.render(messages, add_generation_prompt)
        text = "".join(t for t, _ in segments)
        rendered = text.count(self.image_token)
        if rendered != markers:
            raise DataError(
                f"{record}: the chat format rendered {rendered} {self.image_token} marker(s) "
                f"for {markers} in the turns"
            )
        starts, roles, pos = [], [], 0
        for seg_text, role in segments:
            starts.append(pos)
            roles.append(role)
            pos += len(seg_text)

        def role_at(char: int) -> str:
            lo, hi = 0, len(starts) - 1
            while lo < hi:  # last segment starting at or before char
                mid = (lo + hi + 1) // 2
                if starts[mid] <= char:
                    lo = mid
                else:
                    hi = mid - 1
            return roles[lo]

        out = EncodedConversation(num_images=markers)
        base = 0
        pieces = text.split(self.image_token)
        for j, piece in enumerate(pieces):
            ids, offsets = self._tokens(piece)
            for tid, (start, _end) in zip(ids, offsets, strict=True):
                role = role_at(base + start)
                out.input_ids.append(tid)
                out.labels.append(tid if role in self.loss_on else IGNORE_INDEX)
                out.placeholder.append(False)
                out.roles.append(role)
            base += len(piece)
            if j < len(pieces) - 1:
                out.input_ids += [self.image_token_id] * self.placeholders
                out.labels += [IGNORE_INDEX] * self.placeholders
                out.placeholder += [True] * self.placeholders
                out.roles += ["image"] * self.placeholders
                base += len(self.image_token)
        return out

    def split_prompt(self, messages: Sequence[Message]) -> tuple[list[Message], str]:
        """``(turns before the last assistant turn, that turn's reply)``."""
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError("a conversation to evaluate must end with an assistant turn")
        return list(messages[:-1]), messages[-1]["content"]

    # ------------------------------------------------------------------ batching
    def _sample_fields(self, sample: Mapping[str, Any]) -> tuple[list[Message], Tensor | None, str]:
        meta = sample.get("meta", {})
        record = str(meta.get("record", "conversation"))
        pixels = sample.get("pixel_values")
        if pixels is not None and pixels.ndim == 3:
            pixels = pixels[None]
        return list(sample["messages"]), pixels, record

    def _stack_images(
        self, images: list[tuple[int, Tensor]], records: list[str]
    ) -> tuple[Tensor, Tensor]:
        shapes = {tuple(p.shape[1:]) for _, p in images}
        if len(shapes) > 1:
            raise DataError(
                f"images of one batch have different shapes {sorted(shapes)} "
                f"(records: {', '.join(records)}); resize them in the dataset"
            )
        if not images:
            shape = self.image_shape or (3, 1, 1)
            return torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.long)
        pixels = torch.cat([p for _, p in images])
        index = torch.cat([torch.full((p.shape[0],), row, dtype=torch.long) for row, p in images])
        return pixels, index

    def _rows(
        self, encoded: list[EncodedConversation], records: list[str], *, left: bool
    ) -> dict[str, Tensor]:
        width = self.max_length if not left else max(len(e.input_ids) for e in encoded)
        b = len(encoded)
        ids = torch.full((b, width), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((b, width), dtype=torch.bool)
        ph = torch.zeros((b, width), dtype=torch.bool)
        for row, (e, record) in enumerate(zip(encoded, records, strict=True)):
            n = len(e.input_ids)
            if n > self.max_length:
                raise CaptionTooLongError(
                    f"{record}: the conversation takes {n} tokens ({e.num_images} image(s) x "
                    f"{self.placeholders} placeholders included) but rows hold "
                    f"{self.max_length} (data.max_length / model.max_seq_len)"
                )
            cols = slice(width - n, width) if left else slice(0, n)
            ids[row, cols] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[row, cols] = torch.tensor(e.labels, dtype=torch.long)
            attn[row, cols] = True
            ph[row, cols] = torch.tensor(e.placeholder, dtype=torch.bool)
        return {"input_ids": ids, "labels": labels, "attention_mask": attn, "placeholder_mask": ph}

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """A training batch: ``input_ids``, ``labels``, ``attention_mask``,
        ``placeholder_mask`` ``(B, max_length)``, ``pixel_values`` ``(N, 3, H, W)``,
        ``image_sample_index`` ``(N,)``, ``image_token_id``, ``frame_mask``,
        ``position_ids`` and ``sequence_ids`` (``None``): every key of
        ``vlm_data.packing.MEDIA_FIELDS``, so ``MediaBatch(**{k: batch[k] for k in
        MEDIA_FIELDS})`` is the model's batch; and, for evaluation and logs,
        ``captions`` (each last reply), ``meta``, ``skipped``."""
        if not samples:
            raise DataError("cannot collate an empty batch")
        encoded, records, images = [], [], []
        for row, sample in enumerate(samples):
            messages, pixels, record = self._sample_fields(sample)
            n = 0 if pixels is None else int(pixels.shape[0])
            encoded.append(self.encode(messages, n, record=record))
            records.append(record)
            if pixels is not None and n:
                images.append((row, pixels))
        batch: dict[str, Any] = self._rows(encoded, records, left=False)
        batch["pixel_values"], batch["image_sample_index"] = self._stack_images(images, records)
        batch["image_token_id"] = self.image_token_id
        batch["frame_mask"] = None
        batch["position_ids"] = None  # default: restart per row, skip padding
        batch["sequence_ids"] = None  # one conversation per row (no packing)
        batch["captions"] = [self._sample_fields(s)[0][-1]["content"] for s in samples]
        batch["meta"] = [s.get("meta", {}) for s in samples]
        batch["skipped"] = [m for s in samples for m in s.get("meta", {}).get("skipped", [])]
        return batch

    def prompt_batch(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Generation prompts: every turn before each sample's last assistant turn plus
        the assistant header, left-padded; only the images of those turns.  Keys as
        :meth:`__call__` (no ``labels``) plus ``references`` (the replies to generate)
        and ``num_images`` per row."""
        encoded, records, images, refs, counts = [], [], [], [], []
        for row, sample in enumerate(samples):
            messages, pixels, record = self._sample_fields(sample)
            turns, reply = self.split_prompt(messages)
            n = sum(t["content"].count(self.image_token) for t in turns)
            have = 0 if pixels is None else int(pixels.shape[0])
            if have < n:
                raise DataError(f"{record}: {n} image marker(s) in the prompt but {have} image(s)")
            encoded.append(self.encode(turns, n, record=record, add_generation_prompt=True))
            records.append(record)
            refs.append(reply)
            counts.append(n)
            if pixels is not None and n:
                images.append((row, pixels[:n]))
        batch: dict[str, Any] = self._rows(encoded, records, left=True)
        batch.pop("labels")
        batch["pixel_values"], batch["image_sample_index"] = self._stack_images(images, records)
        batch["image_token_id"] = self.image_token_id
        batch["references"] = refs
        batch["num_images"] = counts
        return batch

    def max_new_tokens(self, prompt_width: int) -> int:
        """Room left in a row after a prompt of ``prompt_width`` tokens."""
        return self.max_length - prompt_width
