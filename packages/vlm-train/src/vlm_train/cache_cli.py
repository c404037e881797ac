"""``vlm cache RUN_OR_CONFIG`` (entry point ``cache`` of ``vlm.commands``): compute the
feature cache of a job's frozen vision encoder ahead of training.

The register function imports no torch; the command imports it when it runs.  It builds
the job's model (seeded like ``vlm train``) and its training split, checks that caching
is exact (encoder frozen at every freeze stage, no augmentation, map-style data: the
same rules as ``train.feature_cache = "on"``), then computes the missing shards, or
reports the complete cache that is already there.  Under ``torchrun`` every rank
computes its share.  A job whose features cannot be cached is one ``error: ...`` line
on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register_cache"]


def _job_path(target: str) -> Path:
    path = Path(target).expanduser()
    return path / "job.toml" if path.is_dir() else path


def _cmd_cache(args: argparse.Namespace) -> int:
    from vlm_config import load_job_config

    args.config = str(_job_path(args.target))
    job = load_job_config(args.config, args.overrides)
    return _build(job, args.shard_size)


def _build(job: Any, shard_size: int | None) -> int:
    import time

    import torch

    from vlm_parallel import build_parallel_vlm, destroy_distributed, init_distributed
    from vlm_train.errors import ConfigError, VLMTrainError
    from vlm_train.feature_cache import build_feature_cache, cache_decision
    from vlm_train.sources import build_datasets

    if job.train.feature_cache == "off":
        raise ConfigError("train.feature_cache is 'off' in this job: nothing to cache")
    if job.train.num_threads is not None:
        torch.set_num_threads(job.train.num_threads)
    dist = init_distributed(job.parallel)
    try:
        torch.manual_seed(job.train.seed)
        try:
            model = build_parallel_vlm(job, dist, job.train.seed)
        except ValueError as exc:
            raise ConfigError(f"cannot build the model: {exc}") from exc
        encoder = getattr(model, "_orig_mod", model).vision_encoder
        train_set = build_datasets(job, encoder.preprocess, splits=("train",))["train"]
        strict = job.model_copy(
            update={"train": job.train.model_copy(update={"feature_cache": "on"})}
        )
        cache_decision(strict, encoder, train_set)  # raises ConfigError with the reason
        t0 = time.perf_counter()
        say = print if dist.is_main else (lambda _m: None)
        cache = build_feature_cache(
            job,
            encoder,
            train_set,
            rank=dist.rank,
            world_size=dist.world_size,
            device=dist.device,
            batch_size=job.data.eval_batch_size,
            num_workers=job.data.num_workers,
            shard_size=shard_size,
            log=say,
        )
        if cache.num_samples != len(train_set):
            raise VLMTrainError(
                f"the feature cache {cache.folder} holds {cache.num_samples} samples but the "
                f"training split has {len(train_set)}"
            )
        say(
            f"feature cache: {cache.folder} ({cache.num_samples} samples, "
            f"{len(cache.index['shards'])} shard(s), {cache.nbytes() / 2**20:.1f} MiB; "
            f"{time.perf_counter() - t0:.1f}s)"
        )
    finally:
        destroy_distributed()
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register_cache(subparsers: Any) -> None:
    """Add ``vlm cache`` to the ``vlm`` CLI (imports no torch)."""
    from vlm_train.commands import _guarded

    p = subparsers.add_parser(
        "cache",
        help="precompute a frozen vision encoder's features for a job (train.feature_cache)",
        description=(
            "Compute the training split's encoder features once into safetensors shards "
            "(train.feature_cache_dir, default <output_dir>/feature_cache) so that "
            "`vlm train` reads them instead of running the frozen encoder."
        ),
    )
    p.add_argument("target", help="a job config (TOML/YAML/JSON) or a run folder (its job.toml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.augment_shift=0")
    p.add_argument(
        "--shard-size",
        type=_positive,
        default=None,
        help="samples per shard (default: up to 4096, at most 256 MiB of features)",
    )
    p.set_defaults(func=_guarded(_cmd_cache))
