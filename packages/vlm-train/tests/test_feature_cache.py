"""The feature cache of a frozen encoder: when it is on, what keys it, and that training
from it gives the live run's losses (images, clips, DataLoader workers, resume, 2
processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import tiny_dict, tiny_job

FROZEN = {"freeze": [{"module": "vision_encoder"}]}


def _job(out: Path, *overrides: str, **sections: dict[str, Any]) -> Any:
    sections = {"arch": dict(FROZEN), **sections}
    sections["data"] = {"augment_shift": 0, "num_workers": 0, **sections.get("data", {})}
    return tiny_job(out, *overrides, **sections)


def _losses(job: Any, steps: int) -> tuple[list[float], Any]:
    from vlm_train import Trainer

    logs: list[str] = []
    trainer = Trainer(job, log=logs.append)
    trainer.setup()
    try:
        losses = [trainer.step() for _ in range(steps)]
        cache = trainer._features.cache
    finally:
        trainer.close()
    return losses, (cache, logs)


# --------------------------------------------------------------------- decision
def test_decision_says_why(tmp_path: Path) -> None:
    from vlm_strategies import build_vlm
    from vlm_train.errors import ConfigError
    from vlm_train.feature_cache import cache_decision
    from vlm_train.sources import build_datasets

    def decide(*overrides: str, encoder: Any = None, **sections: dict[str, Any]) -> Any:
        from vlm_config import load_job_config

        data = tiny_dict(tmp_path, **sections)
        if encoder is not None:
            data["encoder"] = encoder
        job = load_job_config(data, list(overrides))
        model = build_vlm(job)
        train = build_datasets(job, model.vision_encoder.preprocess, ("train",))["train"]
        return cache_decision(job, model.vision_encoder, train)

    frozen = {"arch": FROZEN}
    ok = decide(data={"augment_shift": 0}, **frozen)
    assert ok.enabled and "frozen" in ok.reason
    trainable = decide(data={"augment_shift": 0})
    assert not trainable.enabled and "vision encoder is trainable under arch.freeze" in (
        trainable.reason
    )
    later = {"arch": {**FROZEN, "freeze_schedule": [{"step": 3, "freeze": []}]}}
    unfrozen = decide(data={"augment_shift": 0}, **later)
    assert not unfrozen.enabled and "freeze_schedule stage at step 3" in unfrozen.reason
    # a stage the run never reaches does not matter
    assert decide("train.steps=3", data={"augment_shift": 0}, **later).enabled
    augmented = decide(data={"augment_shift": 1}, **frozen)
    assert not augmented.enabled and "augmented" in augmented.reason
    off = decide("train.feature_cache=off", data={"augment_shift": 0}, **frozen)
    assert not off.enabled and "'off'" in off.reason
    with pytest.raises(ConfigError, match="feature_cache = 'on'.*augmented"):
        decide("train.feature_cache=on", data={"augment_shift": 1}, **frozen)
    stub = {"type": "random", "num_tokens": 4, "feature_dim": 8, "image_size": 16}
    assert "no weights" in decide(data={"augment_shift": 0}, encoder=stub).reason
    assert decide("train.feature_cache=on", data={"augment_shift": 0}, encoder=stub).enabled


def test_key_follows_tower_weights_and_preprocessing(tmp_path: Path) -> None:
    from vlm_strategies import build_vlm
    from vlm_train.feature_cache import cache_key

    def tower(job: Any) -> Any:
        torch.manual_seed(job.train.seed)  # as the Trainer: a from-scratch tower is seeded
        return build_vlm(job).vision_encoder

    job = _job(tmp_path)
    encoder = tower(job)
    key, source = cache_key(job, encoder)
    assert cache_key(job, tower(job))[0] == key
    assert source["dataset"]["data"]["augment_shift"] == 0
    assert "num_workers" not in source["dataset"]["data"]  # loader-only fields not keyed
    assert cache_key(_job(tmp_path, data={"num_workers": 2}), encoder)[0] == key
    with torch.no_grad():
        next(encoder.parameters()).add_(1e-3)
    assert cache_key(job, encoder)[0] != key
    encoder = tower(job)
    encoder.image_processor.image_mean = [0.4, 0.5, 0.5]
    assert cache_key(job, encoder)[0] != key
    assert cache_key(_job(tmp_path, "train.seed=1"), tower(job))[0] != key


# --------------------------------------------------------------------- training
def test_cached_training_follows_the_live_loss_curve(tmp_path: Path) -> None:
    live, (no_cache, logs) = _losses(_job(tmp_path / "live", "train.feature_cache=off"), 10)
    assert no_cache is None and any("feature cache: off" in m for m in logs)
    # workers read the shards (num_workers=2); the batch carries features, not pixels
    cached, (cache, logs) = _losses(_job(tmp_path / "cached", data={"num_workers": 2}), 10)
    assert cache is not None and any("feature cache: on" in m for m in logs)
    assert torch.allclose(torch.tensor(cached), torch.tensor(live), rtol=1e-5, atol=0)
    files = sorted(p.name for p in cache.folder.iterdir())
    assert files == ["index.json", "shard-00000.json", "shard-00000.safetensors"]
    assert cache.folder.parent == tmp_path / "cached" / "feature_cache"


def test_cache_is_reused_on_resume_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    from vlm_train import Trainer

    whole, _ = _losses(_job(tmp_path / "whole"), 6)
    job = _job(tmp_path / "split")
    with Trainer(job, log=lambda _m: None) as trainer:
        trainer.run(stop_after_steps=3)
        index = trainer._features.cache.folder / "index.json"
    stamp = index.stat().st_mtime_ns
    logs: list[str] = []
    with Trainer(job, log=logs.append) as trainer:
        assert trainer.global_step == 3
        resumed = [trainer.step() for _ in range(3)]
    assert index.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert not any("computed" in m for m in logs)
    assert torch.allclose(torch.tensor(resumed), torch.tensor(whole[3:]), rtol=1e-5, atol=0)


def test_video_clips_keep_frames_and_frame_mask(tmp_path: Path) -> None:
    from safetensors import safe_open

    from vlm_train import Trainer

    video = {"type": "digits_video", "max_frames": 3, "train_clips": 48, "test_clips": 8}
    arch = {**FROZEN, "frames_per_clip": 3, "max_text_len": 6}
    seq = "model.max_seq_len=32"
    live, _ = _losses(
        _job(tmp_path / "live", seq, "train.feature_cache=off", data=video, arch=arch), 4
    )
    cached, (cache, _) = _losses(_job(tmp_path / "cached", seq, data=video, arch=arch), 4)
    assert torch.allclose(torch.tensor(cached), torch.tensor(live), rtol=1e-5, atol=0)
    assert cache.index["frames"] == 3
    job = _job(tmp_path / "cached", seq, data=video, arch=arch)
    with Trainer(job, log=lambda _m: None) as trainer:
        source = trainer.train_set
        encoder = trainer.model.vision_encoder
        with safe_open(str(cache.folder / "shard-00000.safetensors"), "pt") as f:
            features, mask = f.get_tensor("features"), f.get_tensor("frame_mask")
        assert features.shape == (48, 3, encoder.num_tokens, encoder.feature_dim)
        for i in (0, 7, 47):
            assert torch.equal(mask[i], source[i]["frame_mask"])
            with torch.no_grad():
                expect = encoder(source[i]["pixel_values"])
            assert torch.allclose(features[i], expect, atol=1e-6)


def test_sharded_build_resumes_and_rejects_text_only(tmp_path: Path) -> None:
    from vlm_strategies import build_vlm
    from vlm_train.feature_cache import FeatureCacheUnsupported, build_feature_cache
    from vlm_train.sources import build_datasets

    job = _job(tmp_path)
    encoder = build_vlm(job).vision_encoder
    train = build_datasets(job, encoder.preprocess, ("train",))["train"]
    cache = build_feature_cache(job, encoder, train, shard_size=500, log=lambda _m: None)
    assert cache.index["shards"] == ["shard-00000", "shard-00001", "shard-00002"]
    data = cache.dataset()
    assert len(data) == len(train) and data.captions() == train.captions()
    with torch.no_grad():
        assert torch.allclose(
            data[1200]["pixel_values"], encoder(train[1200]["pixel_values"][None])[0], atol=1e-6
        )
    # an interrupted build: the index and one shard are gone; only that shard is redone
    kept = (cache.folder / "shard-00000.safetensors").stat().st_mtime_ns
    (cache.folder / "index.json").unlink()
    (cache.folder / "shard-00001.safetensors").unlink()
    again = build_feature_cache(job, encoder, train, shard_size=500, log=lambda _m: None)
    assert (again.folder / "shard-00000.safetensors").stat().st_mtime_ns == kept
    assert torch.equal(again.dataset()[700]["pixel_values"], data[700]["pixel_values"])

    class TextOnly(type(train)):  # type: ignore[misc]
        def __getitem__(self, index: int) -> Any:
            sample = dict(super().__getitem__(index))
            if index == 3:
                del sample["pixel_values"]
            return sample

    text_only = TextOnly.__new__(TextOnly)
    text_only.__dict__.update(train.__dict__)
    other = _job(tmp_path / "other")
    with pytest.raises(FeatureCacheUnsupported, match="sample 3 has no image"):
        build_feature_cache(other, encoder, text_only, log=lambda _m: None)


def test_bad_samples_skip_like_live_data(tmp_path: Path) -> None:
    from vlm_data import DataError
    from vlm_strategies import build_vlm
    from vlm_train.feature_cache import build_feature_cache
    from vlm_train.sources import build_datasets

    job = _job(tmp_path)
    encoder = build_vlm(job).vision_encoder
    train = build_datasets(job, encoder.preprocess, ("train",))["train"]

    class Broken(type(train)):  # type: ignore[misc]
        def __getitem__(self, index: int) -> Any:
            if index == 5:
                raise DataError("cannot read image 5.png")
            return super().__getitem__(index)

    broken = Broken.__new__(Broken)
    broken.__dict__.update(train.__dict__)
    data = build_feature_cache(job, encoder, broken, log=lambda _m: None).dataset()
    with pytest.raises(DataError, match=r"digits train sample 5: cannot read image 5\.png"):
        data[5]
    assert data[6]["caption"] == train[6]["caption"]


# --------------------------------------------------------------------------- CLI
def test_vlm_cache_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlm_config import JobConfig, write_toml
    from vlm_config.cli import main

    cfg = tmp_path / "job.toml"
    write_toml(JobConfig.model_validate(tiny_dict(tmp_path / "run", arch=FROZEN)), cfg)
    assert main(["cache", str(cfg), "data.augment_shift=0"]) == 0
    out = capsys.readouterr().out
    assert "1437 samples" in out and "computed" in out
    assert main(["cache", str(cfg), "data.augment_shift=0"]) == 0  # complete: read only
    assert "computed" not in capsys.readouterr().out
    assert main(["cache", str(cfg), "data.augment_shift=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "augmented" in err


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_build_their_shares_and_train_like_one_live(tmp_path: Path) -> None:
    from test_train_distributed import _free_port, _losses

    from vlm_config import JobConfig, write_toml

    sections = {"arch": FROZEN, "data": {"augment_shift": 0, "num_workers": 0}}
    cfg = tmp_path / "job.toml"
    write_toml(JobConfig.model_validate(tiny_dict(tmp_path / "run2", **sections)), cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        cmd += [f"--master_port={_free_port()}", "-m", "vlm_config.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    built = torchrun("cache", str(cfg), "--shard-size", "300")
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    index = json.loads(next((tmp_path / "run2" / "feature_cache").glob("*/index.json")).read_text())
    assert index["world_size"] == 2 and len(index["shards"]) == 5
    trained = torchrun("train", str(cfg), "train.eval_at_end=false", "train.export=false")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert "feature cache: on" in trained.stdout and "computed" not in trained.stdout
    from vlm_train import train

    train(_job(tmp_path / "run1", "train.feature_cache=off", "train.eval_at_end=false"))
    two, one = _losses(tmp_path / "run2"), _losses(tmp_path / "run1")
    assert two.keys() == one.keys()
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step])
