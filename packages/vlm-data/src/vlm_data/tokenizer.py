"""Text tokenisers from the ``tokenizers`` library: load a local one or train a small one.

Nothing here is hand-written tokenisation: :meth:`TextTokenizer.train` trains a
``WordLevel`` or byte-level ``BPE`` model with the library's trainers, and
:meth:`TextTokenizer.load` reads a ``tokenizer.json`` (a file or a folder holding
one, e.g. a Hugging Face model folder).  The special tokens (padding, begin and end
of sequence) are looked up by their usual spellings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vlm_data.errors import DataError

__all__ = ["SPECIAL_TOKENS", "TextTokenizer", "pretrained_tokenizer"]

#: the special tokens of a trained tokeniser, in id order
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")

_BOS = ("[BOS]", "<s>", "<bos>", "<|begin_of_text|>", "[CLS]", "<|startoftext|>")
_EOS = ("[EOS]", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]", "<|im_end|>")
_PAD = ("[PAD]", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids the collator needs.

    Attributes:
        bos_id: prepended to every sequence.
        eos_id: appended after every caption; generation stops on it.
        pad_id: fills ``input_ids`` past the text (``eos_id`` when there is no pad token).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_id = self._find(bos_token, _BOS, "begin-of-sequence")
        self.eos_id = self._find(eos_token, _EOS, "end-of-sequence")
        try:
            self.pad_id = self._find(pad_token, _PAD, "padding")
        except DataError:
            self.pad_id = self.eos_id
        self._cache: dict[str, list[int]] = {}
        #: the ``tokenizer_config.json`` this tokeniser was loaded with (its other keys,
        #: e.g. a ``chat_template``, are written back by :meth:`save`)
        self.config: dict[str, object] = {}

    def _find(self, given: str | None, candidates: Sequence[str], what: str) -> int:
        for token in (given,) if given else candidates:
            idx = self.tokenizer.token_to_id(token)
            if idx is not None:
                return int(idx)
        raise DataError(f"the tokenizer has no {what} token (looked for {', '.join(candidates)})")

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def special_ids(self) -> set[int]:
        return {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (cached)."""
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return list(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, stopping at the first end-of-sequence, special tokens dropped."""
        kept: list[int] = []
        for i in ids:
            if i == self.eos_id:
                break
            if i not in self.special_ids:
                kept.append(int(i))
        return " ".join(self.tokenizer.decode(kept, skip_special_tokens=True).split())

    def normalize(self, text: str) -> str:
        """``text`` as the tokeniser round-trips it (what exact match compares)."""
        return self.decode(self.encode(text))

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` is a folder or the file) and, next to it,
        ``tokenizer_config.json`` naming the BOS / EOS / PAD tokens (with the other keys of
        the config it was loaded with), each atomically: :meth:`load` of the result finds
        the same special ids even when their spellings are not the usual ones."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        tmp = path.with_name(f".{path.name}.tmp")
        self.tokenizer.save(str(tmp))
        tmp.replace(path)
        config = {
            **self.config,
            "bos_token": self.tokenizer.id_to_token(self.bos_id),
            "eos_token": self.tokenizer.id_to_token(self.eos_id),
            "pad_token": self.tokenizer.id_to_token(self.pad_id),
        }
        cfg = path.with_name("tokenizer_config.json")
        tmp = cfg.with_name(f".{cfg.name}.tmp")
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        tmp.replace(cfg)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """From a ``tokenizer.json`` file or a folder holding one (plus, optionally, a
        ``tokenizer_config.json`` naming ``bos_token`` / ``eos_token`` / ``pad_token``)."""
        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"tokenizer not found: {file}")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise DataError(f"cannot read tokenizer {file}: {exc}") from exc
        names: dict[str, str | None] = {}
        raw: dict[str, object] = {}
        cfg = file.parent / "tokenizer_config.json"
        if cfg.is_file():
            try:
                loaded = json.loads(cfg.read_text(encoding="utf-8"))
            except ValueError:
                loaded = None
            raw = loaded if isinstance(loaded, dict) else {}
            for key in ("bos_token", "eos_token", "pad_token"):
                value = raw.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                names[key] = value if isinstance(value, str) else None
        out = cls(tok, **names)
        out.config = raw
        return out

    @classmethod
    def train(
        cls, texts: Iterable[str], kind: str = "wordlevel", vocab_size: int = 512
    ) -> TextTokenizer:
        """Train a small tokeniser on ``texts`` in-process.

        Args:
            kind: ``"wordlevel"`` (lower-cased whitespace/punctuation words) or ``"bpe"``
                (byte-level BPE, ``vocab_size`` merges budget).
        """
        texts = list(texts)
        if kind == "wordlevel":
            tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
            tok.normalizer = normalizers.Lowercase()
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            trainer: trainers.Trainer = trainers.WordLevelTrainer(
                special_tokens=list(SPECIAL_TOKENS), min_frequency=1
            )
        elif kind == "bpe":
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=list(SPECIAL_TOKENS),
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
        else:
            raise DataError(f"unknown tokenizer kind {kind!r}; use 'wordlevel' or 'bpe'")
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)


def pretrained_tokenizer(folder: str | Path, vocab_size: int | None = None) -> TextTokenizer:
    """The tokenizer of a Hugging Face model folder (``tokenizer.json``, with
    ``tokenizer_config.json``'s ``bos_token`` / ``eos_token`` / ``pad_token`` when given),
    read with the ``tokenizers`` library.

    Args:
        vocab_size: the decoder's ``model.vocab_size``; every token id must be below it.

    Raises:
        DataError: no ``tokenizer.json``, no BOS/EOS token, or a tokenizer with more
            tokens than ``vocab_size``.
    """
    tok = TextTokenizer.load(Path(folder).expanduser())
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise DataError(
            f"the tokenizer in {folder} has {tok.vocab_size} tokens but model.vocab_size is "
            f"{vocab_size}: ids {vocab_size}..{tok.vocab_size - 1} have no embedding"
        )
    return tok
