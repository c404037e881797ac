"""The ``webdataset`` training split streams its shards: the peak memory of a process
reading every sample of 16 shards (decode + preprocess + collate, through
``train_loader``) is that of one reading 4 shards, although 4x the bytes go through it.

Each case runs in a fresh interpreter, which reports its peak resident set size
(``VmHWM`` of ``/proc/self/status``; workers: ``RUSAGE_CHILDREN``'s ``ru_maxrss``).
The shards hold random-noise PNGs (incompressible, ~0.8 MB each, ~8 MB a shard).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc"),
]

SIDE = 512  # 512x512 RGB noise: 786 KB of pixels, ~787 KB as a PNG
PER_SHARD = 10  # ~7.9 MB a shard
MICRO_BATCH = 5
#: allowed growth (MiB) of the peak RSS from 4 to 16 shards (the 12 more hold 90 MiB)
MARGIN_MB = 15.0

# Runs in a fresh interpreter: argv = shard paths (json), number of samples, workers.
_READER = r"""
import gc, json, resource, sys
import numpy as np
import torch
from vlm_data import (
    DatasetContext, ImageTextCollator, TextTokenizer, WebDatasetConfig,
    build_datasets, raise_batch_error, train_loader,
)

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)

def preprocess(images):  # decode to RGB, resize, normalise: what an encoder does
    out = []
    for im in images:
        arr = np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32) / 127.5 - 1
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)

shards, n_samples, workers = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
micro = int(sys.argv[4])
config = WebDatasetConfig(train_shards=shards, shuffle_shards=False)
train = build_datasets(config, DatasetContext(preprocess=preprocess, splits=("train",)))["train"]
tok = TextTokenizer.train(["random noise image number"])
loader = train_loader(
    train, ImageTextCollator(tok, 16), None, num_micro=1, micro_batch=micro, rank=0,
    world_size=1, start_step=0, end_step=n_samples // micro, seed=0, num_workers=workers,
    prefetch_factor=2, on_bad_sample="error", pin_memory=False,
)
it = iter(loader)
keys, pixels = [], 0
for _ in range(n_samples // micro):  # one epoch: every sample once
    batch = next(it)
    raise_batch_error(batch)
    assert batch["pixel_values"].shape == (micro, 3, 32, 32)
    pixels += batch["pixel_values"].numel()
    keys += [m["record"] for m in batch["meta"]]
    if len(keys) == micro:
        warm_kb = kb("VmHWM")  # after the first batch: imports, loader, first decode
del it, loader
gc.collect()
children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({
    "samples": len(keys), "unique": len(set(keys)), "pixels": pixels,
    "warm_kb": warm_kb, "peak_kb": kb("VmHWM"), "workers_peak_kb": children_kb,
}))
"""


def _noise_png(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    # noise does not compress: level 0 gives the same size, much faster
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def _write_shards(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(count):
        path = folder / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(PER_SHARD):
                key = f"{s:03d}{i:04d}"
                for ext, data in (("png", _noise_png(rng)), ("txt", f"noise image {i}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def _stream(shards: list[str], workers: int) -> dict[str, int]:
    n = len(shards) * PER_SHARD
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [json.dumps(shards), str(n), str(workers), str(MICRO_BATCH)]
    proc = subprocess.run(
        [sys.executable, "-c", _READER, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["samples"] == out["unique"] == n  # every sample once, decoded
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    folder = tmp_path_factory.mktemp("noise_shards")
    yield _write_shards(folder, 16)
    shutil.rmtree(folder)  # ~126 MB: not left for pytest's kept temp folders


@pytest.mark.parametrize("workers", [0, 2])
def test_peak_memory_is_flat_in_the_number_of_shards(shards: list[str], workers: int) -> None:
    streamed = {k: sum(Path(p).stat().st_size for p in shards[:k]) for k in (4, 16)}
    few, many = _stream(shards[:4], workers), _stream(shards, workers)
    mb = 1024.0
    report = {
        "workers": workers,
        "streamed_MiB": {k: round(v / 2**20, 1) for k, v in streamed.items()},
        "peak_MiB": {4: few["peak_kb"] / mb, 16: many["peak_kb"] / mb},
        "warm_MiB": {4: few["warm_kb"] / mb, 16: many["warm_kb"] / mb},
        "workers_peak_MiB": {4: few["workers_peak_kb"] / mb, 16: many["workers_peak_kb"] / mb},
    }
    print(json.dumps(report))
    assert streamed[16] > 110 * 2**20  # 120 MiB through the 16-shard reader
    # the process that read 4x the data peaks within MARGIN_MB of the other
    assert many["peak_kb"] <= few["peak_kb"] + MARGIN_MB * mb, report
    # and its peak grew by less than 2 shards after the first batch (a reader keeping the
    # records it read grows by ~90 MiB here)
    assert many["peak_kb"] - many["warm_kb"] <= MARGIN_MB * mb, report
    if workers:
        # the workers (forked, where the shards are read and decoded) as well
        assert many["workers_peak_kb"] <= few["workers_peak_kb"] + MARGIN_MB * mb, report
