"""Datasets and tokeniser of a job, from its ``data`` section."""

from __future__ import annotations

from pathlib import Path

from vlm_config import JobConfig
from vlm_train.data import FilesDataset, HFImageTextDataset, ImageTextDataset, Preprocess
from vlm_train.digits import DigitsCaptionDataset, DigitsVideoDataset
from vlm_train.errors import VLMTrainError
from vlm_train.tokenizer import TextTokenizer

__all__ = ["build_datasets", "build_tokenizer"]


def build_datasets(
    job: JobConfig, preprocess: Preprocess, splits: tuple[str, ...] = ("train", "test")
) -> dict[str, ImageTextDataset]:
    """The requested splits of the job's data source (``test`` may be missing for
    ``files`` without a ``test_file``)."""
    data = job.data
    frames = job.arch.frames_per_clip
    out: dict[str, ImageTextDataset] = {}
    if data.source == "digits":
        if frames != 1:
            raise VLMTrainError(
                f"data.source='digits' is still images but arch.frames_per_clip={frames}; "
                "use data.source='digits_video'"
            )
        for split in splits:
            out[split] = DigitsCaptionDataset(
                split,
                preprocess,
                test_fraction=data.test_fraction,
                seed=data.split_seed,
                prompt=data.prompt,
                augment_shift=data.augment_shift if split == "train" else 0,
            )
    elif data.source == "digits_video":
        for split in splits:
            out[split] = DigitsVideoDataset(
                split,
                preprocess,
                num_clips=data.train_clips if split == "train" else data.test_clips,
                frames_per_clip=frames,
                min_frames=data.min_frames,
                max_frames=data.max_frames,
                test_fraction=data.test_fraction,
                seed=data.split_seed,
                prompt=data.prompt,
                augment_shift=data.augment_shift if split == "train" else 0,
            )
    elif data.source == "files":
        files = {"train": data.train_file, "test": data.test_file}
        for split in splits:
            if files[split] is not None:
                out[split] = FilesDataset(
                    str(files[split]), preprocess, prompt=data.prompt, frames_per_clip=frames
                )
    elif data.source == "hf":
        assert data.hf_path is not None
        names = {"train": data.hf_train_split, "test": data.hf_test_split}
        for split in splits:
            out[split] = HFImageTextDataset(
                data.hf_path,
                names[split],
                preprocess,
                name=data.hf_name,
                image_column=data.hf_image_column,
                text_column=data.hf_text_column,
                prompt=data.prompt,
            )
    return out


def build_tokenizer(
    job: JobConfig, train_set: ImageTextDataset | None, saved: Path | None = None
) -> TextTokenizer:
    """``data.tokenizer`` if set, else ``saved`` if it exists (resume), else a tokeniser
    trained on the training captions and prompt.

    Raises:
        VLMTrainError: the tokeniser needs more ids than ``model.vocab_size``.
    """
    data = job.data
    if data.tokenizer is not None:
        tok = TextTokenizer.load(data.tokenizer)
    elif saved is not None and saved.is_file():
        tok = TextTokenizer.load(saved)
    else:
        if train_set is None:
            raise VLMTrainError("no tokenizer given and no training data to train one on")
        texts = train_set.captions()
        if data.prompt:
            texts.append(data.prompt)
        tok = TextTokenizer.train(texts, data.tokenizer_type, data.bpe_vocab_size)
    if tok.vocab_size > job.model.vocab_size:
        raise VLMTrainError(
            f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
            f"{job.model.vocab_size}; raise model.vocab_size"
        )
    return tok
