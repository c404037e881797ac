from __future__ import annotations

from pathlib import Path

import pytest

from vlm_data import SPECIAL_TOKENS, DataError, TextTokenizer

CAPTIONS = ["three one four", "one five nine", "two six", "seven"]


def test_wordlevel_round_trip_and_specials(tmp_path: Path) -> None:
    tok = TextTokenizer.train(CAPTIONS)
    assert [tok.tokenizer.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode("three one four")
    assert len(ids) == 3 and not set(ids) & tok.special_ids
    assert tok.decode(ids) == "three one four"
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, 7, 7]) == "three one four"  # stops at EOS
    assert tok.normalize("Three  ONE four") == "three one four"
    path = tok.save(tmp_path)
    again = TextTokenizer.load(path.parent)
    assert again.encode("seven") == tok.encode("seven")
    assert again.vocab_size == tok.vocab_size == 4 + 8


def test_save_keeps_special_tokens_named_only_in_the_config(tmp_path: Path) -> None:
    """A folder whose BOS / EOS have unusual spellings (named in its
    ``tokenizer_config.json``) saves to a folder that loads with the same ids and keeps
    the config's other keys (a run folder's copy of a pretrained tokeniser)."""
    import json

    from tokenizers import Tokenizer, models

    vocab = {"<|start|>": 0, "<|stop|>": 1, "hi": 2, "[UNK]": 3}
    src = tmp_path / "src"
    src.mkdir()
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(src / "tokenizer.json"))
    with pytest.raises(DataError, match="no begin-of-sequence token"):
        TextTokenizer.load(src)  # no config: the spellings are not the usual ones
    config = {"bos_token": "<|start|>", "eos_token": {"content": "<|stop|>"}, "chat_template": "T"}
    (src / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = TextTokenizer.load(src)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    saved = tok.save(tmp_path / "run")
    again = TextTokenizer.load(saved)
    assert (again.bos_id, again.eos_id, again.pad_id) == (0, 1, 1)
    written = json.loads((saved.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert written["chat_template"] == "T" and written["bos_token"] == "<|start|>"


def test_bpe_round_trip() -> None:
    tok = TextTokenizer.train(CAPTIONS * 5, kind="bpe", vocab_size=300)
    assert tok.decode(tok.encode("one five nine")) == "one five nine"
    assert tok.decode(tok.encode("nine one")) == "nine one"


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        TextTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(DataError, match="cannot read"):
        TextTokenizer.load(tmp_path)
