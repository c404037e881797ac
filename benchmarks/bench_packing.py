"""Packing benchmark: useful (non-pad) tokens per second of ``Trainer.step()``, packed
rows (``data.packing = true``) against padded rows, on captions of varied length.

Data: a ``jsonl`` manifest of 8x8 digits (as PNGs) whose captions are the digit's word
followed by a long-tailed number of further digit words (geometric, capped so BOS +
caption + EOS fit ``arch.max_text_len``), every ``--text-only``-th sample without an
image.  Padded training gives every sample a row of ``image positions + max_text_len``;
packed training puts the same samples back to back in rows of ``--packed-length``.

Both trainers start from the same seed and read the same global batches, so their
losses must agree per step (printed: first and last, and the largest difference).
Each step's batches are read before the clock starts; the two trainers alternate
step by step so that machine load hits both alike.  Prints the medians of useful
tokens/s, their ratio (target >= 1.3x), ``OMP_NUM_THREADS``, the thread count and the
load average, and writes ``--out/bench_packing.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_data(folder: Path, count: int, max_words: int, text_only_every: int) -> Path:
    """``count`` samples (PNGs + ``train.jsonl``) in ``folder``; returns the manifest."""
    from vlm_data.digits import DIGIT_WORDS, digit_images

    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        j = i % len(images)
        extra = min(int(rng.geometric(0.12)) - 1, max_words - 1)
        words = [DIGIT_WORDS[int(labels[j])]]
        words += [DIGIT_WORDS[int(d)] for d in rng.integers(0, 10, extra)]
        row: dict[str, Any] = {"caption": " ".join(words)}
        if text_only_every <= 0 or i % text_only_every:
            images[j].save(folder / f"{i:05d}.png")
            row["image"] = f"{i:05d}.png"
        rows.append(row)
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def job(manifest: Path, out: Path, args: argparse.Namespace, packing: bool) -> Any:
    from vlm_config import load_job_config

    return load_job_config(
        {
            "name": "bench-packing",
            "model": {
                "dim": args.dim,
                "n_layers": args.layers,
                "n_heads": 4,
                "vocab_size": 32,
                "max_seq_len": 64,
            },
            "encoder": {
                "type": "siglip",
                "tower": {
                    "hidden_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "intermediate_size": 128,
                    "image_size": 32,
                    "patch_size": 8,
                },
            },
            "adapter": {"type": "avgpool", "window": 2},
            "arch": {"arch": args.arch, "max_text_len": args.max_text_len},
            "data": {
                "type": "jsonl",
                "train_file": str(manifest),
                "num_workers": 0,
                "packing": packing,
                "packed_length": args.packed_length,
            },
            "train": {
                "steps": args.steps,
                "batch_size": args.batch,
                "lr": 2e-3,
                "warmup_steps": 2,
                "num_threads": args.threads,
                "progress": False,
                "checkpoint_every": None,
                "eval_at_end": False,
                "export": False,
                "resume": False,
                "output_dir": str(out / ("packed" if packing else "padded")),
            },
        }
    )


def useful_tokens(batch: Any, image_positions: int) -> int:
    """Real positions of a micro-batch: text tokens + image positions, no padding."""
    if "useful_tokens" in batch:
        return int(batch["useful_tokens"])
    text = int(batch["attention_mask"].sum())
    return text + image_positions * int(batch["image_mask"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--arch", default="joint_decoder")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-text-len", type=int, default=40)
    parser.add_argument("--packed-length", type=int, default=128)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--text-only", type=int, default=8, help="every n-th sample; 0: none")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("build/bench"))
    args = parser.parse_args()

    import torch

    from vlm_train import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_data(root / "data", args.samples, args.max_text_len - 2, args.text_only)
        trainers = {
            name: Trainer(job(manifest, root, args, packing), log=lambda _m: None)
            for name, packing in (("padded", False), ("packed", True))
        }
        for t in trainers.values():
            t.setup()
        rates: dict[str, list[float]] = {name: [] for name in trainers}
        losses: dict[str, list[float]] = {name: [] for name in trainers}
        shapes: dict[str, list[tuple[int, int]]] = {name: [] for name in trainers}
        positions = getattr(trainers["padded"].model, "num_image_positions", 0)
        for step in range(args.steps):
            for name, t in trainers.items():
                batches = t.next_batches()
                tokens = sum(useful_tokens(b, positions) for b in batches)
                t0 = time.perf_counter()
                losses[name].append(t.step(batches))
                dt = time.perf_counter() - t0
                if step >= args.warmup:
                    rates[name].append(tokens / dt)
                shapes[name].append(tuple(batches[0]["input_ids"].shape))
        for t in trainers.values():
            t.close()

    median = {name: statistics.median(r) for name, r in rates.items()}
    ratio = median["packed"] / median["padded"]
    diff = max(abs(a - b) for a, b in zip(losses["padded"], losses["packed"]))
    load = os.getloadavg()
    result = {
        "arch": args.arch,
        "steps_timed": args.steps - args.warmup,
        "batch": args.batch,
        "max_text_len": args.max_text_len,
        "packed_length": args.packed_length,
        "median_useful_tokens_per_s": median,
        "ratio_packed_over_padded": ratio,
        "first_loss": {n: v[0] for n, v in losses.items()},
        "last_loss": {n: v[-1] for n, v in losses.items()},
        "max_loss_diff": diff,
        "row_shapes_step0": {n: v[0] for n, v in shapes.items()},
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "threads": args.threads,
        "loadavg": load,
    }
    print(
        f"packing benchmark ({args.arch}, batch {args.batch}, {args.steps - args.warmup} timed "
        f"steps, OMP_NUM_THREADS={result['OMP_NUM_THREADS']}, threads={args.threads}, "
        f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})"
    )
    for name in trainers:
        print(
            f"  {name:>6}: rows {shapes[name][0]} at step 0, median {median[name]:9.0f} useful "
            f"tok/s, loss first {losses[name][0]:.5f} last {losses[name][-1]:.5f}"
        )
    print(f"  packed / padded: {ratio:.2f}x (target >= 1.3x); largest loss difference {diff:.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_packing.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
