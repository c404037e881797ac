"""The ``webdataset`` dataset: tar shards streamed with :mod:`tarfile`.

A shard is a tar whose members sharing a key (the name up to its first dot after the
last ``/``) form one sample: ``000123.jpg`` + ``000123.txt``.  The training split is a
:class:`~vlm_data.StreamingDataset`: shards are read in order (never loaded whole), the
shard list of an epoch (shuffled by ``(seed, epoch)`` if ``shuffle_shards``) is dealt
out to the ``world_size * num_workers`` streams when there are at least that many
shards, else every stream reads every shard and keeps every ``num_streams``-th sample.
The test split is indexed once (member offsets) and read by random access.
"""

from __future__ import annotations

import glob
import io
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_data.dataset import (
    DatasetContext,
    ImageTextDataset,
    Preprocess,
    Sample,
    StreamingDataset,
)
from vlm_data.errors import DataError
from vlm_data.images import load_image

if TYPE_CHECKING:
    from vlm_data.configs import WebDatasetConfig

__all__ = ["TarRecord", "WebDatasetShards", "WebDatasetTest", "build_webdataset", "expand_shards"]

#: one sample of a shard: (shard path, key, {extension: bytes})
TarRecord = tuple[str, str, dict[str, bytes]]


def expand_shards(patterns: list[str]) -> list[str]:
    """Sorted shard paths of file names / glob patterns.

    Raises:
        DataError: a pattern matches no file.
    """
    out: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not found:
            raise DataError(f"webdataset shard pattern {pattern!r} matches no file")
        out.extend(found)
    return out


def _split_name(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def iter_tar(shard: str) -> Iterator[TarRecord]:
    """The samples of one shard in order (members grouped by consecutive key).

    Raises:
        DataError: the shard is missing or not a readable tar (names the shard).
    """
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            key, parts = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if key is not None and k != key:
                    yield shard, key, parts
                    parts = {}
                key = k
                handle = tar.extractfile(member)
                parts[ext] = handle.read() if handle is not None else b""
            if key is not None:
                yield shard, key, parts
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read webdataset shard {shard}: {exc}") from exc


class _Decoder:
    def __init__(self, config: WebDatasetConfig, preprocess: Preprocess) -> None:
        self.config = config
        self.preprocess = preprocess

    def decode(self, record: TarRecord) -> Sample:
        shard, key, parts = record
        where = f"{shard}:{key}"
        cfg = self.config
        caption = parts.get(cfg.caption_extension)
        if caption is None:
            raise DataError(
                f"{where}: no .{cfg.caption_extension} member (the caption); members: "
                f"{sorted(parts)}"
            )
        sample: Sample = {
            "prompt": cfg.prompt,
            "caption": caption.decode("utf-8").strip(),
            "meta": {"record": where},
        }
        ext = next((e for e in cfg.image_extensions if e in parts), None)
        if ext is None:
            if cfg.allow_text_only:
                return sample
            raise DataError(
                f"{where}: no image member (allowed extensions: {cfg.image_extensions}; "
                f"members: {sorted(parts)}); set allow_text_only = true for text samples"
            )
        image = load_image(f"{shard}:{key}.{ext}", data=io.BytesIO(parts[ext]))
        sample["pixel_values"] = self.preprocess([image])[0]
        return sample


class WebDatasetShards(StreamingDataset):
    """The streamed training split (see the module docstring)."""

    def __init__(self, config: WebDatasetConfig, preprocess: Preprocess, seed: int) -> None:
        self.shards = expand_shards(config.train_shards)
        self.config = config
        self.seed = seed
        self._decoder = _Decoder(config, preprocess)

    def records(self, stream_id: int, num_streams: int, epoch: int) -> Iterator[TarRecord]:
        shards = list(self.shards)
        if self.config.shuffle_shards:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        if len(shards) >= num_streams:
            for shard in shards[stream_id::num_streams]:
                yield from iter_tar(shard)
        else:
            n = 0
            for shard in shards:
                for record in iter_tar(shard):
                    if n % num_streams == stream_id:
                        yield record
                    n += 1

    def decode(self, record: TarRecord) -> Sample:
        return self._decoder.decode(record)


class WebDatasetTest(ImageTextDataset):
    """A held-out split of shards, indexed at construction (keys only) and decoded on
    access."""

    def __init__(self, config: WebDatasetConfig, preprocess: Preprocess) -> None:
        self._decoder = _Decoder(config, preprocess)
        self.index: list[tuple[str, str]] = []
        self._captions: list[str] = []
        for shard in expand_shards(config.test_shards):
            for _, key, parts in iter_tar(shard):
                self.index.append((shard, key))
                self._captions.append(parts.get(config.caption_extension, b"").decode().strip())
        self._cache: dict[str, dict[str, dict[str, bytes]]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def captions(self) -> list[str]:
        return list(self._captions)

    def describe(self, index: int) -> str:
        shard, key = self.index[index]
        return f"{shard}:{key}"

    def __getitem__(self, index: int) -> Sample:
        shard, key = self.index[index]
        if shard not in self._cache:
            self._cache = {shard: {k: parts for _, k, parts in iter_tar(shard)}}
        return self._decoder.decode((shard, key, self._cache[shard][key]))


def build_webdataset(config: WebDatasetConfig, context: DatasetContext) -> dict[str, Any]:
    """Builder of the ``webdataset`` dataset (``test`` only with ``test_shards``)."""
    if context.frames_per_clip != 1:
        raise DataError("data.type='webdataset' holds still images; arch.frames_per_clip must be 1")
    out: dict[str, Any] = {}
    if "train" in context.splits:
        out["train"] = WebDatasetShards(config, context.preprocess, context.seed)
    if "test" in context.splits and config.test_shards:
        out["test"] = WebDatasetTest(config, context.preprocess)
    return out
