"""Backwards-compatible re-exports: the data pipeline lives in :mod:`vlm_data`."""

from __future__ import annotations

from vlm_data.collate import IGNORE_INDEX, ImageTextCollator
from vlm_data.dataset import Batch, ImageTextDataset, Preprocess, Sample
from vlm_data.hf import HFImageTextDataset
from vlm_data.images import load_image, pad_clip, random_shift
from vlm_data.jsonl import FilesDataset, JsonlDataset
from vlm_data.sampler import GlobalBatchSampler

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "FilesDataset",
    "GlobalBatchSampler",
    "HFImageTextDataset",
    "ImageTextCollator",
    "ImageTextDataset",
    "JsonlDataset",
    "Preprocess",
    "Sample",
    "load_image",
    "pad_clip",
    "random_shift",
]
