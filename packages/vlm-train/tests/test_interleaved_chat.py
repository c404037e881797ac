"""Images anywhere, data side: conversations trained by the Trainer, evaluated by
generation, and answered by ``vlm generate`` with several images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from train_helpers import tiny_job

from vlm_config import JobConfig
from vlm_config.cli import main
from vlm_data.conversation import image_placeholders

pytest.importorskip("sklearn")

CHAT = {
    "model": {"vocab_size": 64, "max_seq_len": 40},
    "data": {"type": "digits_sum", "train_size": 256, "test_size": 12, "max_length": 40},
}


def chat_job(out: Path, *overrides: str, **sections: Any) -> JobConfig:
    merged = {k: {**v, **sections.pop(k, {})} for k, v in CHAT.items()}
    return tiny_job(out, *overrides, **merged, **sections)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny joint_decoder trained on digits_sum conversations (20 steps)."""
    from vlm_train import train

    out = tmp_path_factory.mktemp("chat") / "run"
    result = train(chat_job(out, "train.steps=20"), log=lambda _m: None)
    assert result.eval is not None and result.eval.total == 12
    assert result.eval.loss is not None and np.isfinite(result.eval.loss)
    return out


def digit_png(path: Path, digit: int) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    index = int(np.flatnonzero(d.target == digit)[0])
    Image.fromarray((d.images[index] * 255 / 16).astype(np.uint8), "L").save(path)
    return path


ARCHS = {
    "joint_decoder": {},
    "cross_attention": {"cross_attention_every_n_layers": 1},
    "mot": {},
    "moma": {},
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_placeholders_from_the_config_match_the_model(tmp_path: Path, arch: str) -> None:
    from vlm_strategies import build_vlm

    job = chat_job(tmp_path, arch={"arch": arch, **ARCHS[arch]})
    model = build_vlm(job)
    expected = model.strategy.image_placeholders(model.num_image_tokens)
    assert image_placeholders(job) == expected
    assert job.arch.image_placeholder_tokens(model.num_image_tokens) == expected
    assert expected == (1 if arch == "cross_attention" else model.num_image_tokens)


def test_trainer_batches_train_only_the_replies(tmp_path: Path) -> None:
    from vlm_data import ConversationCollator
    from vlm_data.digits_sum import NUMBER_WORDS
    from vlm_train.trainer import Trainer

    with Trainer(chat_job(tmp_path / "run"), log=lambda _m: None) as trainer:
        assert isinstance(trainer.collator, ConversationCollator)
        (batch,) = trainer.next_batches()
        tok = trainer.tokenizer
        labels, ids = batch["labels"], batch["input_ids"]
        assert ((labels == -100) | (labels == ids)).all()
        trained = {str(tok.tokenizer.id_to_token(int(i))) for i in labels[labels != -100]}
        assert trained <= {*NUMBER_WORDS, "[EOS]"}
        # every reply is trained: one EOS per assistant turn
        turns = [
            sum(m["role"] == "assistant" for m in meta_turns)
            for meta_turns in [
                trainer.train_set[int(r.split()[-1])]["messages"]
                for r in (m["record"] for m in batch["meta"])
            ]
        ]
        assert (labels == tok.eos_id).sum(1).tolist() == turns
        # images in marker order, rows by sample; placeholder counts match the model
        k = trainer.model.strategy.image_placeholders(trainer.model.num_image_tokens)
        per_row = batch["placeholder_mask"].sum(1)
        counts = torch.bincount(batch["image_sample_index"], minlength=len(per_row))
        assert per_row.tolist() == (counts * k).tolist()
        loss = trainer.step()
        assert np.isfinite(loss)


def test_generate_cli_with_two_images(
    chat_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlm_train.inference import chat_generate, load_trained, to_media_batch

    a, b = digit_png(tmp_path / "a.png", 5), digit_png(tmp_path / "b.png", 7)
    prompt = "<image> and <image>: what is their sum?"
    code, out, err = run_cli(
        capsys, "generate", str(chat_run), "--image", str(a), "--image", str(b), "--prompt", prompt
    )
    assert code == 0, err
    loaded = load_trained(chat_run)
    assert loaded.is_chat
    reply = chat_generate(loaded, [a, b], prompt)
    assert out.strip() == reply
    # the KV-cached generation equals greedy decoding by full recomputation
    col = loaded.collator
    pixels = loaded.model.vision_encoder.preprocess([Image.open(a), Image.open(b)])
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
    batch = col.prompt_batch([{"messages": turns, "pixel_values": pixels}])
    media = to_media_batch(batch)
    room = col.max_new_tokens(batch["input_ids"].shape[1])
    cached = loaded.model.generate(media, max_new_tokens=room, use_cache=True)
    full = loaded.model.generate(media, max_new_tokens=room, use_cache=False)
    assert torch.equal(cached, full)
    # the export answers the same
    code, out2, err = run_cli(
        capsys,
        "generate",
        str(chat_run / "final"),
        "--image",
        str(a),
        "--image",
        str(b),
        "--prompt",
        prompt,
    )
    assert code == 0, err and out2 == out


def test_generate_cli_errors(
    chat_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = digit_png(tmp_path / "a.png", 3)
    code, _, err = run_cli(
        capsys, "generate", str(chat_run), "--image", str(a), "--prompt", "<image> and <image>?"
    )
    assert code == 1
    assert "2 <image> marker(s) but 1 --image file(s)" in err
    code, _, err = run_cli(capsys, "generate", str(chat_run), "--image", str(a))
    assert code == 1 and "--prompt" in err
    # a text-only turn needs no image
    code, out, err = run_cli(
        capsys, "generate", str(chat_run), "--prompt", "what is two plus two ?"
    )
    assert code == 0, err
    assert isinstance(out.strip(), str)


def test_generate_cli_prefix_model_keeps_captioning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlm_train import train

    out = tmp_path / "prefix"
    train(tiny_job(out, "train.steps=2"), log=lambda _m: None)
    png = digit_png(tmp_path / "d.png", 4)
    code, _, err = run_cli(capsys, "generate", str(out), "--image", str(png))
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", str(out), "--image", str(png), "--system", "x")
    assert code == 1 and "--system needs a model trained on conversations" in err


# ------------------------------------------------- conversation jsonl + template
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_conversation_jsonl_with_a_chat_template_trains_and_evaluates(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from vlm_train import train

    words = "what is the sum of and : plus one two three four five six seven eight nine"
    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
    vocab = {t: i for i, t in enumerate([*specials, "user", "assistant", *words.split()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "chat_template": CHATML,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    names = ["one", "two", "three"]
    for i in range(3):
        digit_png(tmp_path / f"{i}.png", i + 1)
    rows = []
    for i in range(3):
        for j in range(3):
            if i + j + 2 <= 9:
                rows.append(
                    {
                        "messages": [
                            {"role": "user", "content": "<image> plus <image> ?"},
                            {
                                "role": "assistant",
                                "content": [*names, "four", "five", "six"][i + j + 1],
                            },
                        ],
                        "images": [f"{i}.png", f"{j}.png"],
                    }
                )
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "one plus one ?"},
                {"role": "assistant", "content": "two"},
            ]
        }
    )
    manifest = tmp_path / "chat.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = tiny_job(
        tmp_path / "run",
        "train.steps=3",
        model=CHAT["model"],
        data={
            "type": "conversation",
            "train_file": str(manifest),
            "test_file": str(manifest),
            "tokenizer": str(folder),
            "max_length": 40,
        },
    )
    assert job.data.chat_template == "auto"
    result = train(job, log=lambda _m: None)
    assert result.eval is not None and result.eval.total == len(rows)
    assert result.eval.loss is not None and np.isfinite(result.eval.loss)


def test_eval_cli_on_a_chat_run(chat_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = json.loads((chat_run / "eval.json").read_text())
    code, out, err = run_cli(capsys, "eval", str(chat_run))
    assert code == 0, err
    # the same generated replies as the Trainer's final evaluation
    assert f"({saved['correct']}/{saved['total']})" in out
