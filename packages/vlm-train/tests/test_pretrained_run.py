"""A run started from a pretrained decoder folder (``model.pretrained``): it uses the
folder's tokenizer, starts from its weights, keeps a frozen decoder frozen through stage 1
of the freeze schedule, and its checkpoints resume exactly like any other run's."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from train_helpers import TINY

from vlm_config import JobConfig, load_job_config
from vlm_data import DataError
from vlm_data.digits import DIGIT_WORDS
from vlm_train import Trainer, train
from vlm_train.inference import load_trained
from vlm_train.tokenizer import TextTokenizer
from vlm_transformer.hf import from_hf_state_dict, read_hf_decoder

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

#: the folder's vocabulary: Llama-style special tokens, the digit words in reverse order
#: (ids a tokenizer trained on the captions would not give them)
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "zero-pad", *reversed(DIGIT_WORDS)]


def _save_tokenizer(folder: Path, words: list[str]) -> None:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(folder)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with ``save_pretrained``, with its own tokenizer."""
    folder = tmp_path_factory.mktemp("llm")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    _save_tokenizer(folder, VOCAB)
    return folder


def _job(out: Path, llm: Path, *overrides: str) -> JobConfig:
    data: dict[str, Any] = copy.deepcopy(TINY)
    data["model"] = {"pretrained": str(llm), "max_seq_len": 16}
    data["arch"].update(
        freeze=[{"module": "vision_encoder"}, {"module": "transformer"}],
        freeze_schedule=[{"step": 2, "freeze": [{"module": "vision_encoder"}]}],
    )
    data["train"].update(
        output_dir=str(out),
        steps=4,
        checkpoint_every=None,
        eval_at_end=False,
        export=False,
        feature_cache="off",
    )
    return load_job_config(data, list(overrides))


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_pretrained_run_tokenizer_weights_freeze_and_exact_resume(
    tmp_path: Path, llm: Path
) -> None:
    job = _job(tmp_path / "part", llm)
    theirs = TextTokenizer.load(llm)
    _, hf_weights = read_hf_decoder(llm)
    with Trainer(job, log=lambda _m: None) as trainer:
        # the folder's tokenizer, not one trained on the captions
        tok = trainer.tokenizer
        assert tok.encode("seven") == theirs.encode("seven") == [VOCAB.index("seven")]
        assert [tok.encode(w) for w in DIGIT_WORDS] == [[VOCAB.index(w)] for w in DIGIT_WORDS]
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
        saved = Tokenizer.from_file(str(job.train.output_dir + "/tokenizer.json"))
        assert saved.get_vocab() == theirs.tokenizer.get_vocab()
        # step 0: the decoder is the pretrained one
        start = _params(trainer.model)
        decoder = {
            k[len("transformer.") :]: v for k, v in start.items() if k.startswith("transformer.")
        }
        assert _same(decoder, from_hf_state_dict(hf_weights, trainer.model.transformer.config))
        part = trainer.run(stop_after_steps=2)
        assert part.interrupted == 0 and part.step == 2
        # stage 1: only the adapter trained
        after = _params(trainer.model)
    for key in start:
        changed = not torch.equal(start[key], after[key])
        assert changed == key.startswith("adapter."), key

    resumed = train(job, log=lambda _m: None)
    assert resumed.resumed_from == 2 and resumed.step == 4
    whole = train(_job(tmp_path / "whole", llm), log=lambda _m: None)
    assert whole.resumed_from is None and whole.step == 4
    ours, reference = _losses(tmp_path / "part"), _losses(tmp_path / "whole")
    assert [s for s, _ in ours] == [s for s, _ in reference] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(ours, reference, strict=True):
        assert abs(a - b) <= 1e-6
    # stage 2 trained the decoder; the saved run loads with the folder's tokenizer
    loaded = load_trained(tmp_path / "part")
    assert loaded.tokenizer.encode("seven") == theirs.encode("seven")
    assert not _same(_params(loaded.model.transformer), decoder)


def test_pretrained_tokenizer_larger_than_the_vocab_is_one_line(tmp_path: Path, llm: Path) -> None:
    big = tmp_path / "big"
    shutil.copytree(llm, big)
    _save_tokenizer(big, VOCAB + [f"w{i}" for i in range(40)])
    with pytest.raises(DataError) as info:
        train(_job(tmp_path / "run", big), log=lambda _m: None)
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"the tokenizer in {big} has 55 tokens but model.vocab_size is 32: "
        "ids 32..54 have no embedding"
    )
