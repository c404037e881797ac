"""Conversations: role loss masks, chat templates, <image> placeholders, record errors.

Needs only vlm-data's own dependencies (+ the ``[chat]`` extra, transformers, for the
chat-template tests); no model is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from vlm_config import get_registry
from vlm_data import (
    BuiltinChatFormat,
    ConversationCollator,
    DataError,
    DatasetContext,
    TextTokenizer,
    build_datasets,
    check_messages,
)
from vlm_data.chat import TemplateChatFormat, load_chat_format
from vlm_data.conversation_configs import ConversationDatasetConfig, DigitsSumDatasetConfig
from vlm_data.errors import CaptionTooLongError

IGNORE = -100
SIZE = 8


def preprocess(images: list[Any]) -> torch.Tensor:
    """Pixels that identify the image: its mean grey value in every pixel."""
    out = []
    for im in images:
        grey = float(np.asarray(im.convert("L"), dtype=np.float32).mean())
        out.append(torch.full((3, SIZE, SIZE), grey))
    return torch.stack(out)


CONV = [
    {"role": "system", "content": "you add digits"},
    {"role": "user", "content": "what is three plus four ?"},
    {"role": "assistant", "content": "seven"},
    {"role": "user", "content": "<image> and <image> : what is their sum ?"},
    {"role": "assistant", "content": "twelve"},
]


def builtin_tokenizer() -> TextTokenizer:
    fmt = BuiltinChatFormat()
    return TextTokenizer.train(fmt.training_texts(CONV, "<image>"))


def decode_tokens(tok: TextTokenizer, ids: list[int]) -> list[str]:
    return [str(tok.tokenizer.id_to_token(i)) for i in ids]


# ------------------------------------------------------------------ role masks
def test_builtin_format_role_masks_train_only_the_assistant() -> None:
    tok = builtin_tokenizer()
    col = ConversationCollator(
        tok, BuiltinChatFormat.for_tokenizer(tok), placeholders=3, max_length=64
    )
    enc = col.encode(CONV, 2)
    words = decode_tokens(tok, enc.input_ids)
    # the documented layout: [BOS] tags, content, reply [EOS]
    assert words[:4] == ["[BOS]", "__system__", "you", "add"]
    trained = [w for w, y in zip(words, enc.labels, strict=True) if y != IGNORE]
    assert trained == ["seven", "[EOS]", "twelve", "[EOS]"]
    for tid, label, role in zip(enc.input_ids, enc.labels, enc.roles, strict=True):
        if role == "assistant":
            assert label == tid
        else:
            assert label == IGNORE, role
    # each marker -> 3 placeholder ids (the pad id), never trained, in marker order
    assert sum(enc.placeholder) == 6 and enc.num_images == 2
    flagged = [i for i, p in enumerate(enc.placeholder) if p]
    assert all(enc.input_ids[i] == tok.pad_id and enc.labels[i] == IGNORE for i in flagged)
    assert flagged == [flagged[0] + k for k in range(3)] + [flagged[3] + k for k in range(3)]
    assert words[flagged[2] + 1] == "and"


def test_loss_on_is_configurable() -> None:
    tok = builtin_tokenizer()
    fmt = BuiltinChatFormat.for_tokenizer(tok)
    col = ConversationCollator(
        tok, fmt, placeholders=1, max_length=64, loss_on=["user", "assistant"]
    )
    enc = col.encode(CONV, 2)
    words = decode_tokens(tok, enc.input_ids)
    trained = [w for w, y in zip(words, enc.labels, strict=True) if y != IGNORE]
    assert trained[:5] == ["what", "is", "three", "plus", "four"]
    assert "you" not in trained and "__user__" not in trained and "[PAD]" not in trained
    with pytest.raises(ValueError, match="unknown roles"):
        ConversationCollator(tok, fmt, placeholders=1, max_length=64, loss_on=["bot"])


def test_collated_batch_labels_and_media_fields() -> None:
    tok = builtin_tokenizer()
    col = ConversationCollator(
        tok, BuiltinChatFormat.for_tokenizer(tok), placeholders=2, max_length=48
    )
    img = [torch.full((2, 3, SIZE, SIZE), float(v)) for v in (1, 2)]
    samples = [
        {"messages": CONV, "pixel_values": img[0], "meta": {"record": "r0"}},
        {"messages": CONV[1:3], "meta": {"record": "r1"}},  # text-only
        {"messages": CONV, "pixel_values": img[1], "meta": {"record": "r2"}},
    ]
    batch = col(samples)
    assert batch["input_ids"].shape == (3, 48)
    assert batch["image_sample_index"].tolist() == [0, 0, 2, 2]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert batch["placeholder_mask"].sum(1).tolist() == [4, 0, 4]
    assert batch["captions"] == ["twelve", "seven", "twelve"]
    labels, ids, attn = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert ((labels == IGNORE) | (labels == ids)).all()
    assert (labels[~attn] == IGNORE).all() and (labels[batch["placeholder_mask"]] == IGNORE).all()
    eos = tok.eos_id
    assert [int((row == eos).sum()) for row in labels] == [2, 1, 2]

    # generation prompts: left-padded, up to the assistant header, only their images
    prompts = col.prompt_batch(samples)
    assert prompts["references"] == ["twelve", "seven", "twelve"]
    assert "labels" not in prompts and prompts["num_images"] == [2, 0, 2]
    last = decode_tokens(tok, prompts["input_ids"][:, -1].tolist())
    assert last == ["__assistant__"] * 3
    assert not bool(prompts["attention_mask"][1, 0])  # row 1 is shorter: left padding


def test_text_only_batch_keeps_the_image_shape() -> None:
    tok = builtin_tokenizer()
    col = ConversationCollator(
        tok, BuiltinChatFormat(), placeholders=1, max_length=32, image_shape=(3, SIZE, SIZE)
    )
    batch = col([{"messages": CONV[1:3]}])
    assert tuple(batch["pixel_values"].shape) == (0, 3, SIZE, SIZE)
    assert batch["image_sample_index"].numel() == 0


# ------------------------------------------------------- marker / record errors
def test_marker_image_count_mismatch_names_the_record() -> None:
    tok = builtin_tokenizer()
    col = ConversationCollator(tok, BuiltinChatFormat(), placeholders=1, max_length=64)
    sample = {
        "messages": CONV,
        "pixel_values": torch.zeros(1, 3, SIZE, SIZE),
        "meta": {"record": "data.jsonl:7"},
    }
    with pytest.raises(DataError, match=r"data.jsonl:7: 2 <image> marker\(s\) .* but 1 image"):
        col([sample])


def test_too_long_conversation_names_the_record() -> None:
    tok = builtin_tokenizer()
    col = ConversationCollator(tok, BuiltinChatFormat(), placeholders=8, max_length=20)
    sample = {
        "messages": CONV,
        "pixel_values": torch.zeros(2, 3, SIZE, SIZE),
        "meta": {"record": "rec-3"},
    }
    with pytest.raises(
        CaptionTooLongError, match=r"rec-3: the conversation takes \d+ tokens .* 20"
    ):
        col([sample])


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ([{"role": "bot", "content": "x"}], "allowed roles: system, user, assistant"),
        ([{"role": "user", "content": 3}], "string 'content'"),
        ([{"role": "user", "content": "hi"}], "ends with an assistant turn"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            "only the first may be",
        ),
    ],
)
def test_check_messages_errors(messages: Any, message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        check_messages(messages, "file.jsonl:2")
    assert str(info.value).startswith("file.jsonl:2")


# --------------------------------------------------------------- jsonl dataset
def write_png(path: Path, value: int) -> str:
    Image.new("L", (6, 6), value).save(path)
    return path.name


def test_conversation_jsonl_dataset(tmp_path: Path) -> None:
    a, b = write_png(tmp_path / "a.png", 10), write_png(tmp_path / "b.png", 200)
    rows = [
        {"messages": CONV, "images": [b, a]},
        {"messages": CONV[1:3]},
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = ConversationDatasetConfig(train_file=str(manifest))
    sets = build_datasets(cfg, DatasetContext(preprocess=preprocess, splits=("train",)))
    ds = sets["train"]
    assert len(ds) == 2 and ds.image_shape == (3, SIZE, SIZE)
    first = ds[0]
    # images in the order listed (= marker order), paths relative to the manifest
    assert first["pixel_values"][:, 0, 0, 0].tolist() == [200.0, 10.0]
    assert first["meta"]["record"] == f"{manifest}:1"
    assert "pixel_values" not in ds[1]
    # a word-level tokeniser trained on captions() knows the built-in tags and replies
    tok = TextTokenizer.train(ds.captions())
    assert all(
        tok.tokenizer.token_to_id(w) is not None for w in ("__user__", "__assistant__", "twelve")
    )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"messages": CONV, "images": ["a.png"]},
            r"2 <image> marker\(s\) in the messages but 1 image",
        ),
        (
            {"messages": CONV[1:3], "images": ["a.png"]},
            r"0 <image> marker\(s\) in the messages but 1 image",
        ),
        ({"messages": CONV, "images": "a.png"}, "'images' must be a list"),
        ({"messages": CONV[:2]}, "ends with an assistant turn"),
        ({"caption": "x"}, "'messages' must be a non-empty list"),
    ],
)
def test_conversation_manifest_errors_name_file_and_line(
    tmp_path: Path, row: Any, message: str
) -> None:
    manifest = tmp_path / "m.jsonl"
    ok = json.dumps({"messages": CONV[1:3]})
    manifest.write_text(f"{ok}\n\n{json.dumps(row)}\n", encoding="utf-8")
    cfg = ConversationDatasetConfig(train_file=str(manifest))
    with pytest.raises(DataError, match=message) as info:
        build_datasets(cfg, DatasetContext(preprocess=preprocess, splits=("train",)))
    assert str(info.value).startswith(f"{manifest}:3:")


def test_conversation_config_is_registered_and_validates() -> None:
    assert get_registry().load("vlm.datasets", "conversation") is ConversationDatasetConfig
    assert get_registry().load("vlm.datasets", "digits_sum") is DigitsSumDatasetConfig
    cfg = ConversationDatasetConfig(train_file="x.jsonl")
    assert cfg.loss_on == ["assistant"] and cfg.chat_template == "auto"
    with pytest.raises(ValueError, match="loss_on"):
        ConversationDatasetConfig(train_file="x.jsonl", loss_on=["assistant", "assistant"])
    with pytest.raises(ValueError, match="loss_on"):
        ConversationDatasetConfig(train_file="x.jsonl", loss_on=["robot"])


# ------------------------------------------------------------- chat templates
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def template_folder(tmp_path: Path, template: str = CHATML) -> Path:
    """A tiny word-level tokenizer with ChatML specials and a chat template."""
    words = "you add digits what is three plus four seven and : their sum ? twelve"
    words += " user assistant system"
    vocab = {
        t: i
        for i, t in enumerate(
            ["<pad>", "<s>", "<|im_end|>", "<unk>", "<|im_start|>", *words.split()]
        )
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"])
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "chat_template": template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_chat_template_is_applied_by_transformers(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    folder = template_folder(tmp_path)
    tok = TextTokenizer.load(folder)
    fmt = load_chat_format("auto", str(folder), tok)
    assert isinstance(fmt, TemplateChatFormat)
    hf = AutoTokenizer.from_pretrained(str(folder))
    text = hf.apply_chat_template(CONV, tokenize=False)
    assert "".join(t for t, _ in fmt.render(CONV, False)) == text
    prompt = hf.apply_chat_template(CONV[:-1], tokenize=False, add_generation_prompt=True)
    assert "".join(t for t, _ in fmt.render(CONV[:-1], True)) == prompt

    col = ConversationCollator(tok, fmt, placeholders=2, max_length=80)
    enc = col.encode(CONV, 2)
    # the ids are the template's text tokenised, markers replaced by placeholders
    pieces = text.split("<image>")
    expected: list[int] = []
    for j, piece in enumerate(pieces):
        expected += tok.encode(piece)
        if j < len(pieces) - 1:
            expected += [tok.pad_id] * 2
    assert enc.input_ids == expected
    words = decode_tokens(tok, enc.input_ids)
    trained = [w for w, y in zip(words, enc.labels, strict=True) if y != IGNORE]
    # the assistant's replies and their end-of-turn token; not the role headers
    assert trained == ["seven", "<|im_end|>", "twelve", "<|im_end|>"]
    assert tok.eos_id == tok.tokenizer.token_to_id("<|im_end|>")
    # the prompt ends with the assistant header: generation continues after it
    p = col.encode(CONV[:-1], 2, add_generation_prompt=True)
    assert decode_tokens(tok, p.input_ids)[-2:] == ["<|im_start|>", "assistant"]
    assert all(y == IGNORE for y in col.encode(CONV[:3], 0).labels[:-2])


def test_chat_template_errors(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    # a template that renders the last turn differently is not prefix-stable
    unstable = (
        "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}"
        "{{ m['content'] }} {% endif %}{% endfor %}"
    )
    folder = template_folder(tmp_path, unstable)
    tok = TextTokenizer.load(folder)
    col = ConversationCollator(tok, TemplateChatFormat(folder), placeholders=1, max_length=80)
    with pytest.raises(DataError, match="not prefix-stable"):
        col.encode(CONV[1:3], 0)
    # no chat_template in the folder
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["chat_template"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="has no chat_template"):
        TemplateChatFormat(folder)
    with pytest.raises(DataError, match="needs data.tokenizer"):
        load_chat_format("tokenizer", None, tok)
    assert isinstance(load_chat_format("builtin", str(folder), tok), BuiltinChatFormat)


# ------------------------------------------------------------------ digits_sum
def test_digits_sum_dataset() -> None:
    pytest.importorskip("sklearn")
    from vlm_data.digits_sum import NUMBER_WORDS

    cfg = DigitsSumDatasetConfig(train_size=300, test_size=60)
    sets = build_datasets(cfg, DatasetContext(preprocess=preprocess))
    train, test = sets["train"], sets["test"]
    assert len(train) == 300 and len(test) == 60
    kinds = {train[i]["meta"]["kind"] for i in range(len(train))}
    assert kinds == {"sum", "digit", "text", "two_turn"}
    again = build_datasets(cfg, DatasetContext(preprocess=preprocess))["train"]
    for i in range(0, 300, 37):
        s = train[i]
        assert s["messages"] == again[i]["messages"]  # a pure function of seed and index
        markers = sum(m["content"].count("<image>") for m in s["messages"])
        assert (
            markers
            == s["meta"]["num_images"]
            == (0 if "pixel_values" not in s else len(s["pixel_values"]))
        )
        assert s["messages"][-1]["role"] == "assistant"
        assert s["messages"][-1]["content"] in NUMBER_WORDS
        labels = [int(train.images.labels[j]) for j in train.picks[i]]
        if s["meta"]["kind"] == "digit":  # the pictured digit
            assert s["messages"][-1]["content"] == NUMBER_WORDS[labels[0]]
        elif markers:  # the sum of the two pictured digits
            assert s["messages"][-1]["content"] == NUMBER_WORDS[sum(labels)]
    # show_work: the pictured digits, then the sum
    worked = build_datasets(
        DigitsSumDatasetConfig(train_size=40, test_size=4, show_work=True),
        DatasetContext(preprocess=preprocess, splits=("train",)),
    )["train"]
    i = next(i for i in range(40) if worked.kinds[i] == "sum")
    a, b = (int(worked.images.labels[j]) for j in worked.picks[i])
    expected = f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}"
    assert worked[i]["messages"][-1]["content"] == expected
    # held-out conversations use held-out digit images only
    assert set(test.images.indices.tolist()).isdisjoint(train.images.indices.tolist())
    # images somewhere in the middle of the text too
    assert any(
        not m["content"].startswith("<image>") and "<image>" in m["content"]
        for i in range(len(train))
        for m in train[i]["messages"]
    )
