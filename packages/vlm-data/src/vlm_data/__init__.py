"""Datasets (the ``vlm.datasets`` plugins), samplers, collation, image preprocessing and
tokenisers of the VLM toolkit; no model code.

Importing this package does not import torch (the plugin registry imports
``vlm_data.configs`` through it); the names below load on first access.
"""

from __future__ import annotations

from vlm_config.lazy import lazy_exports
from vlm_data.__about__ import __version__

_LAZY = {
    "CaptionTooLongError": "vlm_data.errors",
    "DataError": "vlm_data.errors",
    "SPECIAL_TOKENS": "vlm_data.tokenizer",
    "TextTokenizer": "vlm_data.tokenizer",
    "pretrained_tokenizer": "vlm_data.tokenizer",
    "load_image": "vlm_data.images",
    "pad_clip": "vlm_data.images",
    "random_shift": "vlm_data.images",
    "to_rgb": "vlm_data.images",
    "Batch": "vlm_data.dataset",
    "DatasetContext": "vlm_data.dataset",
    "ImageTextDataset": "vlm_data.dataset",
    "Preprocess": "vlm_data.dataset",
    "Sample": "vlm_data.dataset",
    "StreamingDataset": "vlm_data.dataset",
    "build_datasets": "vlm_data.dataset",
    "sample_generator": "vlm_data.dataset",
    "IGNORE_INDEX": "vlm_data.collate",
    "ImageTextCollator": "vlm_data.collate",
    "PAD_SEQUENCE_ID": "vlm_data.packing",
    "PackedBatch": "vlm_data.packing",
    "PackingCollator": "vlm_data.packing",
    "first_fit_decreasing": "vlm_data.packing",
    "GlobalBatchSampler": "vlm_data.sampler",
    "SampleKey": "vlm_data.sampler",
    "StepBatchSampler": "vlm_data.sampler",
    "SafeCollate": "vlm_data.loader",
    "StreamView": "vlm_data.loader",
    "raise_batch_error": "vlm_data.loader",
    "TrainView": "vlm_data.loader",
    "train_loader": "vlm_data.loader",
    "FilesDataset": "vlm_data.jsonl",
    "JsonlDataset": "vlm_data.jsonl",
    "HFImageTextDataset": "vlm_data.hf",
    "WebDatasetShards": "vlm_data.webdataset",
    "WebDatasetTest": "vlm_data.webdataset",
    "DIGIT_WORDS": "vlm_data.digits",
    "DigitsCaptionDataset": "vlm_data.digits",
    "DigitsVideoDataset": "vlm_data.digits",
    "digit_images": "vlm_data.digits",
    "digits_split": "vlm_data.digits",
    "DigitsDatasetConfig": "vlm_data.configs",
    "DigitsVideoDatasetConfig": "vlm_data.configs",
    "HFDatasetConfig": "vlm_data.configs",
    "JsonlDatasetConfig": "vlm_data.configs",
    "WebDatasetConfig": "vlm_data.configs",
    "BuiltinChatFormat": "vlm_data.chat",
    "ChatFormat": "vlm_data.chat",
    "ConversationCollator": "vlm_data.chat",
    "EncodedConversation": "vlm_data.chat",
    "ROLES": "vlm_data.chat",
    "TemplateChatFormat": "vlm_data.chat",
    "check_messages": "vlm_data.chat",
    "load_chat_format": "vlm_data.chat",
    "ConversationDataset": "vlm_data.conversation",
    "JsonlConversationDataset": "vlm_data.conversation",
    "image_placeholders": "vlm_data.conversation",
    "is_conversation_job": "vlm_data.conversation",
    "DigitsSumDataset": "vlm_data.digits_sum",
    "NUMBER_WORDS": "vlm_data.digits_sum",
    "ChatDatasetConfig": "vlm_data.conversation_configs",
    "ConversationDatasetConfig": "vlm_data.conversation_configs",
    "DigitsSumDatasetConfig": "vlm_data.conversation_configs",
}

__all__ = ["__version__", *sorted(_LAZY)]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
