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
