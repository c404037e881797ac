"""Datasets and tokeniser of a job, from its ``data`` section (a ``vlm.datasets`` plugin)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_config import JobConfig
from vlm_data.dataset import DatasetContext, Preprocess
from vlm_data.dataset import build_datasets as build_plugin_datasets
from vlm_data.tokenizer import TextTokenizer
from vlm_train.errors import VLMTrainError

__all__ = ["build_datasets", "build_tokenizer"]


def build_datasets(
    job: JobConfig, preprocess: Preprocess, splits: tuple[str, ...] = ("train", "test")
) -> dict[str, Any]:
    """The requested splits of the job's dataset plugin (``test`` may be missing, e.g.
    ``jsonl`` without a ``test_file``)."""
    context = DatasetContext(
        preprocess=preprocess,
        frames_per_clip=job.arch.frames_per_clip,
        splits=splits,
        seed=job.train.seed,
    )
    return build_plugin_datasets(job.data, context)


def build_tokenizer(job: JobConfig, train_set: Any, saved: Path | None = None) -> TextTokenizer:
    """``data.tokenizer`` if set, else ``saved`` if it exists (resume), else a tokeniser
    trained on the training captions and prompt.

    Raises:
        VLMTrainError: the tokeniser needs more ids than ``model.vocab_size``, or there
            is nothing to train one on.
    """
    data = job.data
    if data.tokenizer is not None:
        tok = TextTokenizer.load(data.tokenizer)
    elif saved is not None and saved.is_file():
        tok = TextTokenizer.load(saved)
    else:
        texts = train_set.captions() if train_set is not None else []
        if not texts:
            raise VLMTrainError(
                "no data.tokenizer given and no training captions to train one on "
                f"(the {data.type!r} dataset lists none up front); set data.tokenizer"
            )
        if data.prompt:
            texts.append(data.prompt)
        tok = TextTokenizer.train(texts, data.tokenizer_type, data.bpe_vocab_size)
    if tok.vocab_size > job.model.vocab_size:
        raise VLMTrainError(
            f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
            f"{job.model.vocab_size}; raise model.vocab_size"
        )
    return tok
