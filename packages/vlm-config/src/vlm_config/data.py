"""Data section of a job: where image-text pairs come from and how text is tokenised."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vlm_config.components import StrictModel


class DataConfig(StrictModel):
    """Where the training / held-out image-text pairs come from.

    Sources:
        ``digits``: scikit-learn's embedded 8x8 digits as captioning ("seven"), no
            download; a fixed seeded train/test split.
        ``digits_video``: clips of ``min_frames..max_frames`` digit frames (padded to
            ``arch.frames_per_clip`` with a ``frame_mask``), caption = the digits in
            order ("three one four").
        ``files``: JSONL manifests (``train_file`` / ``test_file``), one object per line
            ``{"image": "a.png", "caption": "...", "prompt": "..."}`` (``"images"``, a
            list, for clips); relative paths are relative to the manifest.
        ``hf``: a Hugging Face ``datasets`` dataset (the optional ``datasets`` package),
            from a local folder / saved dataset at ``hf_path``.

    Tokeniser: ``tokenizer`` names a local folder holding ``tokenizer.json`` (or the
    file itself); ``None`` trains a small ``tokenizer_type`` tokeniser on the training
    captions in-process and saves it to the run directory.
    """

    source: Literal["digits", "digits_video", "files", "hf"] = "digits"
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    split_seed: int = 0
    prompt: str = Field(default="", description="text before the caption (loss-masked)")
    tokenizer: str | None = None
    tokenizer_type: Literal["wordlevel", "bpe"] = "wordlevel"
    bpe_vocab_size: int = Field(default=512, ge=32)
    # digits_video
    min_frames: int = Field(default=1, ge=1)
    max_frames: int | None = Field(default=None, ge=1, description="None: arch.frames_per_clip")
    train_clips: int = Field(default=6000, ge=1)
    test_clips: int = Field(default=800, ge=1)
    curriculum_steps: int = Field(
        default=0, ge=0, description="clips: raise the longest clip 1..max over these steps"
    )
    # digits augmentation: random shift of the 8x8 source by up to this many pixels
    augment_shift: int = Field(default=0, ge=0, le=3)
    # files
    train_file: str | None = None
    test_file: str | None = None
    # hf
    hf_path: str | None = None
    hf_name: str | None = None
    hf_train_split: str = "train"
    hf_test_split: str = "test"
    hf_image_column: str = "image"
    hf_text_column: str = "text"
    # evaluation
    eval_batch_size: int = Field(default=256, ge=1)
    max_eval_samples: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _source_fields(self) -> DataConfig:
        if self.source == "files" and self.train_file is None:
            raise ValueError("source 'files' needs train_file (a JSONL manifest)")
        if self.source == "hf" and self.hf_path is None:
            raise ValueError("source 'hf' needs hf_path (a local dataset folder or name)")
        if self.max_frames is not None and self.max_frames < self.min_frames:
            raise ValueError(
                f"max_frames ({self.max_frames}) must be >= min_frames ({self.min_frames})"
            )
        return self
