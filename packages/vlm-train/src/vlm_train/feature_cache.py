"""A feature cache for frozen vision encoders (``train.feature_cache``).

When the vision encoder is frozen at every freeze-schedule stage of the run and the
training images are not augmented, the encoder's output for a training sample never
changes: it is computed once (:func:`build_feature_cache`), stored in safetensors
shards, and training reads it instead of running the encoder (the adapter, the frame
positions and the arch still run, through :class:`vlm_strategies.VisionFeatures`).

Layout of one cache (``<train.feature_cache_dir or output_dir/feature_cache>/<key>/``)::

    index.json                 written last, by rank 0: the cache is complete
    shard-00000.safetensors    "features" (n, N, Dv) or (n, F, N, Dv); "frame_mask" (n, F)
    shard-00000.json           per sample: prompt, caption, meta (or the read error)
    ...

The folder name is a hash (:func:`cache_key`) of what the features depend on: the
dataset (its config minus loader-only fields, the size and mtime of files it names,
``train.seed``, ``arch.frames_per_clip``), the encoder (its config, the SHA-256 of its
state dict, the hash of its preprocessing settings: mean/std/size and the image
processor's settings) and ``train.autocast_bf16``.  A changed tower or processor is a new
key and so a new folder; nothing is ever read from a stale one.  Sample ``i`` of the
training split is row ``i % shard_size`` of shard ``i // shard_size``.

Several processes: shard ``s`` is computed by rank ``s % world_size`` (each rank its
share, once); after a barrier rank 0 checks the shards and writes ``index.json``; every
rank takes part in the same collectives whatever it computed (failures are agreed on
with an all-reduce first).  Shards already on disk are kept, so an interrupted build
resumes where it stopped.  Reading a cache reads only safetensors and JSON, lazily in
the ``DataLoader`` workers (each opens the shards it needs, memory-mapped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from vlm_config import JobConfig, matches_any
from vlm_data import Batch, DataError, ImageTextCollator, ImageTextDataset, StreamingDataset
from vlm_data.dataset import Sample
from vlm_strategies import VisionFeatures
from vlm_train.errors import ConfigError, VLMTrainError

__all__ = [
    "FORMAT_VERSION",
    "CacheDecision",
    "CachedFeatureDataset",
    "FeatureCache",
    "FeatureCacheUnsupported",
    "FeatureCollator",
    "TrainFeatureCache",
    "build_feature_cache",
    "cache_decision",
    "cache_folder",
    "cache_key",
    "model_images",
    "preprocessing_hash",
    "tower_hash",
]

#: bumped when the on-disk layout changes (part of the key: old caches are not read)
FORMAT_VERSION = 1
#: a shard holds at most this many bytes of features ...
SHARD_BYTES = 256 * 2**20
#: ... and at most this many samples
MAX_SHARD_SAMPLES = 4096
#: ``[data]`` fields that change how samples are loaded, never what they are
LOADER_ONLY_FIELDS = frozenset(
    {
        "num_workers",
        "prefetch_factor",
        "on_bad_sample",
        "eval_batch_size",
        "max_eval_samples",
        "tokenizer",
        "tokenizer_type",
        "bpe_vocab_size",
    }
)


class FeatureCacheUnsupported(VLMTrainError):
    """The training data cannot be cached (e.g. it holds text-only samples)."""


# ------------------------------------------------------------------------ decision
@dataclass(frozen=True)
class CacheDecision:
    """Whether a run trains from cached features, and why (logged at setup)."""

    enabled: bool
    reason: str


def _trainable_encoder_stage(job: JobConfig, encoder: nn.Module) -> str | None:
    """Why the encoder is not frozen for the whole run (``None`` when it is)."""
    names = [f"vision_encoder.{n}" for n, _ in encoder.named_parameters()]
    arch = job.arch
    stages = [(0, list(arch.freeze))]
    stages += [(s.step, list(s.freeze)) for s in arch.freeze_schedule if s.step < job.train.steps]
    for step, specs in stages:
        trainable = dict.fromkeys(names, True)
        for spec in specs:
            patterns = arch.resolve_freeze_patterns(spec.module)
            for name in names:
                if matches_any(name, patterns):
                    trainable[name] = not spec.frozen
        open_ = [n for n, t in trainable.items() if t]
        if open_:
            where = "arch.freeze" if step == 0 else f"the arch.freeze_schedule stage at step {step}"
            return (
                f"the vision encoder is trainable under {where} ({len(open_)} of {len(names)} "
                f"tensors, e.g. {open_[0]}); freeze it at every stage "
                '(freeze = [{module = "vision_encoder"}])'
            )
    return None


def _augmentation(dataset: Any) -> str | None:
    """Why the training images are not deterministic (``None`` when they are)."""
    cls = type(dataset).__qualname__
    flag = getattr(dataset, "augments", None)
    if flag is None:
        base = StreamingDataset if isinstance(dataset, StreamingDataset) else ImageTextDataset
        if getattr(type(dataset), "augment", None) is not base.augment:
            return (
                f"the training dataset ({cls}) overrides augment() and does not declare "
                "augments = False"
            )
        return None
    if flag:
        return (
            f"the training images are augmented ({cls}.augments is true; e.g. digits: "
            "data.augment_shift > 0)"
        )
    return None


def cache_decision(job: JobConfig, encoder: nn.Module, dataset: Any) -> CacheDecision:
    """Whether the run may train from cached encoder features (``train.feature_cache``).

    ``"auto"`` caches when it is exact: the encoder has weights and is frozen at every
    freeze stage the run reaches, the training dataset is map-style (a stable sample
    index) and does not augment.  ``"on"`` asks for the cache whether or not the
    encoder has weights.

    Raises:
        ConfigError: ``train.feature_cache = "on"`` but caching would be wrong (the
            message says why).
    """
    mode = job.train.feature_cache
    if mode == "off":
        return CacheDecision(False, "train.feature_cache = 'off'")
    reasons: list[str] = []
    if isinstance(dataset, StreamingDataset):
        reasons.append("the training data is streamed (no stable sample index to key features by)")
    if getattr(job.data, "packing", False):
        reasons.append(
            "data.packing is on (packed rows are MediaBatch rows; cached features feed the "
            "image-prefix layout)"
        )
    trainable = _trainable_encoder_stage(job, encoder)
    if trainable:
        reasons.append(trainable)
    augmented = _augmentation(dataset)
    if augmented:
        reasons.append(augmented)
    if reasons:
        if mode == "on":
            raise ConfigError(
                "train.feature_cache = 'on' but the encoder's features change during the "
                f"run: {'; '.join(reasons)}"
            )
        return CacheDecision(False, "; ".join(reasons))
    if mode == "auto" and not any(True for _ in encoder.parameters()):
        return CacheDecision(
            False,
            "the vision encoder has no weights (a stub computes features faster than a "
            "cache reads them; train.feature_cache = 'on' caches anyway)",
        )
    return CacheDecision(
        True,
        "the vision encoder is frozen for the whole run and the training images are not augmented",
    )


# ----------------------------------------------------------------------------- key
def tower_hash(encoder: nn.Module) -> str:
    """SHA-256 over the encoder's state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256(type(encoder).__qualname__.encode())
    for name, value in sorted(encoder.state_dict().items()):
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        data = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def preprocessing_hash(encoder: nn.Module) -> str:
    """SHA-256 of the encoder's preprocessing settings: its ``preprocessing`` (size,
    mean, std) and, when it has one, its image processor's settings (``to_dict()``)."""
    info: dict[str, Any] = {"encoder": type(encoder).__qualname__}
    pre = getattr(encoder, "preprocessing", None)
    if dataclasses.is_dataclass(pre) and not isinstance(pre, type):
        info["preprocessing"] = dataclasses.asdict(pre)
    processor = getattr(encoder, "image_processor", None)
    if processor is not None:
        to_dict = getattr(processor, "to_dict", None)
        settings = to_dict() if callable(to_dict) else repr(processor)
        info["image_processor"] = {"class": type(processor).__qualname__, "settings": settings}
    text = json.dumps(info, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _files_named(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _files_named(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _files_named(item)


def _dataset_source(job: JobConfig) -> dict[str, Any]:
    data = {
        k: v for k, v in job.data.model_dump(mode="json").items() if k not in LOADER_ONLY_FIELDS
    }
    files = {}
    for text in _files_named(data):
        path = Path(text).expanduser()
        with contextlib.suppress(OSError, ValueError):
            if path.is_file():  # a manifest edited in place gets a new key
                stat = path.stat()
                files[text] = [stat.st_size, stat.st_mtime_ns]
    return {
        "data": data,
        "files": files,
        "seed": job.train.seed,
        "frames_per_clip": job.arch.frames_per_clip,
        "split": "train",
    }


def cache_key(job: JobConfig, encoder: nn.Module) -> tuple[str, dict[str, Any]]:
    """``(key, source)``: the hex key of the cache for this job's training split and
    this encoder, and the JSON-able description it hashes (stored in ``index.json``)."""
    source = {
        "format": FORMAT_VERSION,
        "dataset": _dataset_source(job),
        "encoder": {
            "config": job.encoder.model_dump(mode="json"),
            "class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
            "tower_sha256": tower_hash(encoder),
            "preprocessing_sha256": preprocessing_hash(encoder),
        },
        "autocast_bf16": job.train.autocast_bf16,
    }
    text = json.dumps(source, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), source


def cache_folder(job: JobConfig, key: str) -> Path:
    """``train.feature_cache_dir`` (default ``<output_dir>/feature_cache``) / ``key[:24]``."""
    root = job.train.feature_cache_dir
    base = Path(root).expanduser() if root else Path(job.train.output_dir) / "feature_cache"
    return base / key[:24]


# ---------------------------------------------------------------------- the cache
def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class FeatureCache:
    """A complete cache on disk (its ``index.json`` exists); see the module docstring.

    Attributes:
        folder: the cache folder.
        index: the parsed ``index.json``.
    """

    folder: Path
    index: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path, key: str | None = None) -> FeatureCache | None:
        """The cache in ``folder``, or ``None`` when it is not complete (or holds
        another ``key``, or another format version)."""
        folder = Path(folder)
        path = folder / "index.json"
        if not path.is_file():
            return None
        try:
            index = _read_json(path)
        except (OSError, ValueError):
            return None
        if index.get("format") != FORMAT_VERSION or (key is not None and index.get("key") != key):
            return None
        return cls(folder, index)

    @property
    def num_samples(self) -> int:
        """Samples in the cache (the training split's length)."""
        return int(self.index["num_samples"])

    def nbytes(self) -> int:
        """Bytes on disk of the shards."""
        return sum((self.folder / f"{s}.safetensors").stat().st_size for s in self.index["shards"])

    def dataset(self) -> CachedFeatureDataset:
        """A map-style dataset of the cached samples (features in ``pixel_values``)."""
        return CachedFeatureDataset(self)

    def collator(self, base: ImageTextCollator) -> FeatureCollator:
        """``base`` that stores the stacked features as the batch's ``image_features``."""
        return FeatureCollator(base)


class CachedFeatureDataset(ImageTextDataset):
    """The training split from a :class:`FeatureCache`: ``dataset[i]`` is sample ``i``
    with the encoder's features in ``pixel_values`` (``(N, Dv)`` or ``(F, N, Dv)``) and
    the clip's ``frame_mask``.  A sample that could not be read when the cache was built
    raises its :class:`~vlm_data.DataError` again, so ``on_bad_sample`` applies as
    with live data.  Shards are opened lazily (memory-mapped) in the process reading
    them, so ``DataLoader`` workers each read what their batches need."""

    captions_known = True

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache
        self.shard_size = int(cache.index["shard_size"])
        self.shards: list[str] = list(cache.index["shards"])
        self.records: list[list[dict[str, Any]]] = [
            _read_json(cache.folder / f"{s}.json")["samples"] for s in self.shards
        ]
        self.has_frames = cache.index.get("frames") is not None
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return self.cache.num_samples

    def _handle(self, shard: int) -> Any:
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked into a worker: open our own handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            path = self.cache.folder / f"{self.shards[shard]}.safetensors"
            handle = self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
        return handle

    def _record(self, index: int) -> tuple[int, int, dict[str, Any]]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside the cache's {len(self)} samples")
        shard, row = divmod(index, self.shard_size)
        return shard, row, self.records[shard][row]

    def captions(self) -> list[str]:
        return [r.get("caption", "") for shard in self.records for r in shard]

    def describe(self, index: int) -> str:
        return f"sample {index} of the feature cache {self.cache.folder}"

    def __getitem__(self, index: int) -> Sample:
        shard, row, record = self._record(index)
        if "error" in record:
            raise DataError(record["error"])
        handle = self._handle(shard)
        sample: Sample = {
            "pixel_values": handle.get_slice("features")[row : row + 1][0],
            "prompt": record.get("prompt", ""),
            "caption": record["caption"],
            "meta": record.get("meta", {}),
        }
        if self.has_frames:
            sample["frame_mask"] = handle.get_slice("frame_mask")[row : row + 1][0]
        return sample


class FeatureCollator(ImageTextCollator):
    """An :class:`~vlm_data.ImageTextCollator` for :class:`CachedFeatureDataset`
    samples: the stacked features go to ``batch["image_features"]`` (``(B, N, Dv)`` or
    ``(B, F, N, Dv)``) instead of ``pixel_values`` (see :func:`model_images`)."""

    def __init__(self, base: ImageTextCollator) -> None:
        super().__init__(base.tokenizer, base.max_text_len, image_shape=base.image_shape)

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        batch = super().__call__(samples)
        out = cast(dict[str, Any], batch)
        out["image_features"] = out.pop("pixel_values")
        return batch


def model_images(batch: Batch, device: torch.device) -> Tensor | VisionFeatures:
    """What a training batch gives the model as images, on ``device``: the cached
    encoder features (:class:`vlm_strategies.VisionFeatures`) when the batch carries
    ``image_features``, else its ``pixel_values``."""
    features = cast(dict[str, Any], batch).get("image_features")
    if features is not None:
        return VisionFeatures(features).to(device)
    return batch["pixel_values"].to(device)


# ------------------------------------------------------------------------- build
class _SafeRead(torch.utils.data.Dataset[dict[str, Any]]):
    """``dataset[i]`` for the builder's loader: a read error becomes a record."""

    def __init__(self, dataset: ImageTextDataset, indices: range) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        try:
            return {"index": index, "sample": self.dataset[index]}
        except DataError as exc:
            where, text = self.dataset.describe(index), str(exc)
            return {"index": index, "error": text if where in text else f"{where}: {text}"}


def _json_meta(meta: Any) -> dict[str, Any]:
    try:
        json.dumps(meta)
    except (TypeError, ValueError):
        return {}
    return dict(meta) if isinstance(meta, dict) else {}


def _shard_size(encoder: nn.Module, frames: int) -> int:
    per_sample = (
        frames
        * int(getattr(encoder, "num_tokens", 1))
        * int(getattr(encoder, "feature_dim", 1))
        * 4
    )
    return max(1, min(MAX_SHARD_SAMPLES, SHARD_BYTES // max(per_sample, 1)))


@torch.no_grad()
def _compute_shard(
    encoder: nn.Module,
    dataset: ImageTextDataset,
    indices: range,
    *,
    frames_per_clip: int,
    device: torch.device,
    autocast: Callable[[], Any],
    batch_size: int,
    num_workers: int,
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    from vlm_strategies import fold_frames

    loader = torch.utils.data.DataLoader(
        _SafeRead(dataset, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
    )
    records: list[dict[str, Any]] = []
    features: list[Tensor | None] = []
    masks: list[Tensor | None] = []
    for items in loader:
        good = [it for it in items if "sample" in it]
        for it in good:
            if "pixel_values" not in it["sample"]:
                raise FeatureCacheUnsupported(
                    f"{dataset.describe(it['index'])} has no image (text-only samples are "
                    "not cached)"
                )
        out: Tensor | None = None
        if good:
            pixels = torch.stack([it["sample"]["pixel_values"] for it in good]).to(device)
            folded, frames = fold_frames(pixels, frames_per_clip)
            with autocast():
                out = encoder(folded)
            assert out is not None
            out = out.reshape(len(good), frames, *out.shape[1:]) if pixels.ndim == 5 else out
            out = out.cpu()
        row = 0
        for it in items:
            if "error" in it:
                records.append({"error": it["error"]})
                features.append(None)
                masks.append(None)
                continue
            sample = it["sample"]
            records.append(
                {
                    "prompt": sample.get("prompt", ""),
                    "caption": sample["caption"],
                    "meta": _json_meta(sample.get("meta", {})),
                }
            )
            assert out is not None
            features.append(out[row])
            masks.append(sample.get("frame_mask"))
            row += 1
    like = next((f for f in features if f is not None), None)
    if like is None:
        raise FeatureCacheUnsupported(
            f"no readable sample among {dataset.describe(indices[0])}..{indices[-1]}"
        )
    stacked = torch.stack([torch.zeros_like(like) if f is None else f for f in features])
    tensors = {"features": stacked.contiguous()}
    if like.ndim == 3:  # clips: keep the frame mask (padded frames stay masked)
        real = torch.ones(like.shape[0], dtype=torch.bool)
        tensors["frame_mask"] = torch.stack(
            [real if m is None else m.to(torch.bool) for m in masks]
        ).contiguous()
    return tensors, records


def _shard_indices(shard: int, size: int, total: int) -> range:
    return range(shard * size, min(total, (shard + 1) * size))


def _shard_complete(folder: Path, shard: int, indices: range) -> bool:
    """Both files of the shard exist and it holds exactly ``indices`` (a shard left by
    an interrupted build with another shard size is recomputed)."""
    name = _shard_name(shard)
    if not (folder / f"{name}.safetensors").is_file():
        return False
    try:
        body = _read_json(folder / f"{name}.json")
    except (OSError, ValueError):
        return False
    return bool(body.get("first") == indices.start and len(body["samples"]) == len(indices))


def _write_shard(
    folder: Path,
    shard: int,
    indices: range,
    tensors: dict[str, Tensor],
    records: list[dict[str, Any]],
    key: str,
) -> None:
    """The shard's JSON, then its safetensors (both atomically): a shard whose
    safetensors file exists is complete."""
    from safetensors.torch import save_file

    name = _shard_name(shard)
    body = json.dumps({"first": indices.start, "samples": records})
    _write_atomic(folder / f"{name}.json", lambda path: path.write_text(body, encoding="utf-8"))
    _write_atomic(
        folder / f"{name}.safetensors",
        lambda path: save_file(tensors, str(path), metadata={"key": key}),
    )


def build_feature_cache(
    job: JobConfig,
    encoder: nn.Module,
    dataset: ImageTextDataset,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    shard_size: int | None = None,
    log: Callable[[str], None] = print,
) -> FeatureCache:
    """The complete feature cache of ``dataset`` (the job's training split) for
    ``encoder``: opened when it exists, else computed (collective: every rank calls it
    with its own ``rank``; rank ``r`` computes shards ``r, r + world_size, ...``; rank
    0 writes ``index.json`` after a barrier).

    The encoder runs in eval mode under ``torch.no_grad()`` (and bf16 autocast with
    ``train.autocast_bf16``), on ``batch_size`` samples at a time read by
    ``num_workers`` ``DataLoader`` workers.

    Raises:
        FeatureCacheUnsupported: a sample has no image (on every rank).
        VLMTrainError: computing or writing failed on some rank (on every rank), or the
            shards of other ranks are not visible to rank 0 (the cache folder must be on
            a file system all ranks share).
    """
    from vlm_parallel import all_reduce_max, barrier

    device = device or torch.device("cpu")
    key, source = cache_key(job, encoder)
    folder = cache_folder(job, key)
    existing = FeatureCache.open(folder, key)
    if all_reduce_max(0 if existing is not None else 1) == 0:
        assert existing is not None
        return existing
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    frames = job.arch.frames_per_clip
    size = shard_size or _shard_size(encoder, frames)
    total = len(dataset)
    if total == 0:
        raise FeatureCacheUnsupported("the training split is empty")
    n_shards = (total + size - 1) // size
    folder.mkdir(parents=True, exist_ok=True)

    def autocast() -> Any:
        if job.train.autocast_bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    was_training = encoder.training
    encoder.eval()
    t0 = time.perf_counter()
    status, message = 0, ""
    failure: Exception | None = None
    try:
        for shard in range(rank, n_shards, world_size):
            indices = _shard_indices(shard, size, total)
            if _shard_complete(folder, shard, indices):
                continue  # an interrupted build resumes: completed shards are kept
            tensors, records = _compute_shard(
                encoder,
                dataset,
                indices,
                frames_per_clip=frames,
                device=device,
                autocast=autocast,
                batch_size=batch_size,
                num_workers=num_workers,
            )
            _write_shard(folder, shard, indices, tensors, records, key)
    except FeatureCacheUnsupported as exc:
        status, message = 1, str(exc)
    except Exception as exc:  # agree on the failure first: no rank waits in a barrier
        status, message, failure = 2, f"{type(exc).__name__}: {exc}", exc
    finally:
        encoder.train(was_training)
    agreed = all_reduce_max(status)
    if agreed:
        if agreed == 1:
            raise FeatureCacheUnsupported(message or "another rank found a sample it cannot cache")
        text = message or "another rank failed to build its shards"
        raise VLMTrainError(f"building the feature cache in {folder} failed: {text}") from failure
    barrier()
    missing = 0
    if rank == 0:
        absent = [
            s
            for s in range(n_shards)
            if not _shard_complete(folder, s, _shard_indices(s, size, total))
        ]
        missing = len(absent)
        if not absent:
            index = {
                "format": FORMAT_VERSION,
                "key": key,
                "num_samples": total,
                "shard_size": size,
                "shards": [_shard_name(s) for s in range(n_shards)],
                "frames": frames if frames > 1 else None,
                "feature_shape": [
                    int(getattr(encoder, "num_tokens", 0)),
                    int(getattr(encoder, "feature_dim", 0)),
                ],
                "source": source,
                "build_seconds": round(time.perf_counter() - t0, 3),
                "world_size": world_size,
            }
            text = json.dumps(index, indent=1)
            _write_atomic(folder / "index.json", lambda p: p.write_text(text, encoding="utf-8"))
    if all_reduce_max(missing):
        raise VLMTrainError(
            f"the feature cache in {folder} misses shards after every rank wrote its share: "
            "train.feature_cache_dir must be on a file system all ranks share"
        )
    cache = FeatureCache.open(folder, key)
    if all_reduce_max(0 if cache is not None else 1) or cache is None:
        raise VLMTrainError(
            f"rank {rank} cannot read the feature cache index {folder / 'index.json'}: "
            "train.feature_cache_dir must be on a file system all ranks share"
        )
    log(
        f"feature cache: computed {total} samples in {n_shards} shard(s) in "
        f"{time.perf_counter() - t0:.1f}s -> {folder}"
    )
    return cache


# ---------------------------------------------------------------------- training
class TrainFeatureCache:
    """The :class:`~vlm_train.Trainer`'s use of the cache: the decision at setup
    (logged with its reason), the build the first time the loader is made (after a
    resumed checkpoint loaded: the tower hash is of the weights that train), and the
    dataset and collator the training loader reads.

    Args:
        job: the job.
        model: the (possibly FSDP2-wrapped) :class:`vlm_strategies.VLMWrapper`.
        dataset: the training split.
        dist: the trainer's ``vlm_parallel.DistContext``.
        log: the main rank's logger.
    """

    def __init__(
        self, job: JobConfig, model: nn.Module, dataset: Any, dist: Any, log: Callable[[str], None]
    ) -> None:
        self.job, self.model, self.dist, self.log = job, model, dist, log
        self.decision = cache_decision(job, self.encoder, dataset)
        self.cache: FeatureCache | None = None
        state = "on" if self.decision.enabled else "off"
        log(f"feature cache: {state} ({self.decision.reason})")

    @property
    def encoder(self) -> nn.Module:
        model: Any = getattr(self.model, "_orig_mod", self.model)
        return cast(nn.Module, model.vision_encoder)

    def loader_inputs(
        self, dataset: Any, collator: ImageTextCollator
    ) -> tuple[Any, ImageTextCollator]:
        """``(dataset, collator)`` for the training loader: the cached ones when the
        cache is on (built on the first call; collective), else the arguments.

        Raises:
            VLMTrainError: the build failed; with ``train.feature_cache = "on"``, also
                when the data cannot be cached (with ``"auto"`` that falls back to
                live features, logged).
        """
        if not self.decision.enabled:
            return dataset, collator
        if self.cache is None:
            try:
                self.cache = build_feature_cache(
                    self.job,
                    self.encoder,
                    dataset,
                    rank=self.dist.rank,
                    world_size=self.dist.world_size,
                    device=self.dist.device,
                    batch_size=self.job.data.eval_batch_size,
                    num_workers=self.job.data.num_workers,
                    log=self.log,
                )
            except FeatureCacheUnsupported as exc:
                if self.job.train.feature_cache == "on":
                    raise VLMTrainError(f"train.feature_cache = 'on': {exc}") from exc
                self.decision = CacheDecision(False, str(exc))
                self.log(f"feature cache: off ({exc}); training from pixels")
                return dataset, collator
            if self.cache.num_samples != len(dataset):
                raise VLMTrainError(
                    f"the feature cache {self.cache.folder} holds {self.cache.num_samples} "
                    f"samples but the training split has {len(dataset)}"
                )
            self.log(f"feature cache: training from {self.cache.folder}")
        return self.cache.dataset(), self.cache.collator(collator)
