"""Data, the Trainer, evaluation and CLI commands of the VLM toolkit.

Importing this package does not import torch (the ``vlm`` CLI loads it to register its
commands); the names below load on first access.
"""

from __future__ import annotations

from vlm_config.lazy import lazy_exports
from vlm_train.__about__ import __version__

_LAZY = {
    "CaptionTooLongError": "vlm_train.errors",
    "DataError": "vlm_train.errors",
    "VLMTrainError": "vlm_train.errors",
    "ConfigError": "vlm_train.errors",
    "TrainingInterrupted": "vlm_train.errors",
    "SPECIAL_TOKENS": "vlm_train.tokenizer",
    "TextTokenizer": "vlm_train.tokenizer",
    "IGNORE_INDEX": "vlm_train.data",
    "Batch": "vlm_train.data",
    "FilesDataset": "vlm_train.data",
    "GlobalBatchSampler": "vlm_train.data",
    "HFImageTextDataset": "vlm_train.data",
    "ImageTextCollator": "vlm_train.data",
    "ImageTextDataset": "vlm_train.data",
    "Sample": "vlm_train.data",
    "load_image": "vlm_train.data",
    "DIGIT_WORDS": "vlm_train.digits",
    "DigitsCaptionDataset": "vlm_train.digits",
    "DigitsVideoDataset": "vlm_train.digits",
    "digit_images": "vlm_train.digits",
    "digits_split": "vlm_train.digits",
    "build_datasets": "vlm_train.sources",
    "build_tokenizer": "vlm_train.sources",
    "EvalResult": "vlm_train.evaluate",
    "evaluate": "vlm_train.evaluate",
    "format_eval": "vlm_train.evaluate",
    "SAFE_RESUME_FIELDS": "vlm_train.trainer",
    "TrainResult": "vlm_train.trainer",
    "Trainer": "vlm_train.trainer",
    "build_optimizer": "vlm_train.trainer",
    "build_scheduler": "vlm_train.trainer",
    "resume_differences": "vlm_train.trainer",
    "train": "vlm_train.loop",
    "lr_factor": "vlm_train.schedule",
    "plot_loss_curve": "vlm_train.plot",
    "LoadedModel": "vlm_train.inference",
    "caption_images": "vlm_train.inference",
    "load_trained": "vlm_train.inference",
}

__all__ = ["__version__", *sorted(_LAZY)]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
