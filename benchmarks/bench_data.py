"""Input-pipeline benchmark: does reading the data keep up with the training step?

Generates (once, cached) ``--images`` 224x224 JPEGs (8x8 digits upscaled with noise) and
a JSONL manifest, then trains a small model with a tiny SigLIP tower (its transformers
image processor decodes and resizes every image) through ``vlm_train.Trainer.step()``:

* ``workers=0``: the ``DataLoader`` reads in the training process;
* ``workers=N``: ``data.num_workers = N`` worker processes read ahead;
* ``in memory``: the same steps fed pre-decoded batches (``Trainer.step(batches)``).

Prints steps/s per row and the pipeline's cost, ``1 - (steps/s) / (steps/s in
memory)``: the fraction of step time spent waiting for data (target <= 10% with
workers).  ``nox -s bench`` runs it; ``python benchmarks/bench_data.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_images(folder: Path, count: int) -> Path:
    """``count`` 224px JPEGs + ``train.jsonl`` in ``folder`` (skipped when present)."""
    manifest = folder / "train.jsonl"
    if manifest.is_file() and len(manifest.read_text().splitlines()) == count:
        return manifest
    from PIL import Image

    from vlm_data.digits import DIGIT_WORDS, digit_images

    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        j = i % len(images)
        big = np.asarray(images[j].resize((224, 224), Image.BILINEAR), dtype=np.float32)
        noisy = np.clip(big[..., None] + rng.normal(0, 25, (224, 224, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8), "RGB").save(folder / f"{i:05d}.jpg", quality=90)
        rows.append({"image": f"{i:05d}.jpg", "caption": DIGIT_WORDS[int(labels[j])]})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def job(manifest: Path, out: Path, workers: int, batch: int, threads: int) -> Any:
    from vlm_config import load_job_config

    return load_job_config(
        {
            "name": "bench-data",
            "model": {"dim": 256, "n_layers": 4, "n_heads": 4, "vocab_size": 64, "max_seq_len": 64},
            "encoder": {
                "type": "siglip",
                "tower": {
                    "hidden_size": 128,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "intermediate_size": 256,
                    "image_size": 224,
                    "patch_size": 32,
                },
            },
            "adapter": {"type": "mlp_2layer"},
            "arch": {"arch": "joint_decoder", "max_text_len": 8},
            "data": {"type": "jsonl", "train_file": str(manifest), "num_workers": workers},
            "train": {
                "steps": 10**6,
                "batch_size": batch,
                "warmup_steps": 0,
                "progress": False,
                "eval_at_end": False,
                "export": False,
                "resume": False,
                "num_threads": threads,
                "output_dir": str(out),
            },
        }
    )


def time_steps(trainer: Any, steps: int, batches: list[Any] | None = None) -> float:
    """Steps per second over ``steps`` steps (after 2 warm-up steps)."""
    feed = (lambda k: [batches[k % len(batches)]]) if batches else (lambda k: None)
    for k in range(2):
        trainer.step(feed(k))
    start = time.perf_counter()
    for k in range(steps):
        trainer.step(feed(k + 2))
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the step")
    parser.add_argument("--cache", type=Path, default=Path("build/bench/data_cache"))
    parser.add_argument("--out", type=Path, default=Path("build/bench"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlm_train import Trainer

    manifest = make_images(args.cache, args.images)
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (0, args.workers):
            trainer = Trainer(
                job(manifest, Path(tmp) / f"w{workers}", workers, args.batch, args.threads),
                log=lambda _m: None,
            )
            trainer.setup()
            try:
                rows[f"workers={workers}"] = time_steps(trainer, args.steps)
                if workers == 0:
                    memory = [trainer.next_batches()[0] for _ in range(args.steps)]
                    rows["in memory"] = time_steps(trainer, args.steps, memory)
            finally:
                trainer.close()
    ref = rows["in memory"]
    print(f"{args.images} JPEGs 224px, batch {args.batch}, {args.steps} steps")
    print(f"{'row':<12} {'steps/s':>8} {'pipeline cost':>14}")
    for name, rate in rows.items():
        print(f"{name:<12} {rate:8.2f} {max(0.0, 1 - rate / ref):14.1%}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_data.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
