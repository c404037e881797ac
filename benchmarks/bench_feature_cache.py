"""Feature-cache benchmark: the Trainer's step with a frozen SigLIP tower, live vs cached.

Two ``vlm_train.Trainer`` runs of one job differ only in ``train.feature_cache``:
``off`` runs the frozen tower on every batch's pixels, ``on`` reads its features from
the cache (built once, before timing; its build time is reported).  Both time
``Trainer.step()`` as ``vlm train`` runs it: the ``DataLoader`` (``num_workers = 0``:
reading happens inside the timed step, cached shards included), forward, fused
loss, backward, AdamW.  Data: the embedded digits, augmentation off, joint_decoder, the
decoder of ``bench_vlm.py`` (dim 256, 4 layers, 8 heads, vocab 4096, 128 text + 64
image positions, batch 8, float32).

Sizes (``--sizes``):

* ``bench``: a tiny tower (width 64, 2 layers, 32 px, patch 4: 64 patches) and the
  ``mlp_2layer`` adapter; the tower is a few percent of the model;
* ``equal``: a tower with about the decoder's parameters (width 256, 6 layers, 64 px,
  patch 4: 256 patches) and an ``avgpool`` (window 2) adapter down to the same 64
  image positions: a typical frozen-tower VLM, where the tower's forward is a large
  share of the step.

Timing: rounds alternate the two trainers (order flipped every round), ``--steps``
steps each; the medians of all per-step times are compared (``live / cached``) in the
same process.  Writes ``--out`` (JSON).  ``nox -s bench`` runs it with 1 thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DECODER = {"dim": 256, "n_layers": 4, "n_heads": 8, "vocab_size": 4096, "max_seq_len": 256}
SIZES: dict[str, dict[str, Any]] = {
    "bench": {
        "tower": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "image_size": 32,
            "patch_size": 4,
        },
        "adapter": {"type": "mlp_2layer"},
    },
    "equal": {
        "tower": {
            "hidden_size": 256,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "intermediate_size": 1024,
            "image_size": 64,
            "patch_size": 4,
        },
        "adapter": {"type": "avgpool", "window": 2},
    },
}


def job_for(size: str, mode: str, out: Path, threads: int) -> Any:
    from vlm_config import load_job_config

    spec = SIZES[size]
    return load_job_config(
        {
            "name": f"bench-feature-cache-{size}-{mode}",
            "model": DECODER,
            "encoder": {"type": "siglip", "tower": spec["tower"]},
            "adapter": spec["adapter"],
            "arch": {
                "arch": "joint_decoder",
                "max_text_len": 128,
                "freeze": [{"module": "vision_encoder"}],
            },
            "data": {"type": "digits", "augment_shift": 0, "num_workers": 0},
            "train": {
                "steps": 100_000,
                "batch_size": 8,
                "warmup_steps": 0,
                "progress": False,
                "eval_at_end": False,
                "export": False,
                "num_threads": threads,
                "feature_cache": mode,
                "output_dir": str(out / f"{size}-{mode}"),
            },
        }
    )


def params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_size(size: str, out: Path, threads: int, steps: int, rounds: int) -> dict[str, Any]:
    from vlm_train import Trainer

    trainers = {}
    for mode in ("off", "on"):
        trainer = Trainer(job_for(size, mode, out, threads), log=lambda _m: None)
        trainer.setup()
        trainers[mode] = trainer
    t0 = time.perf_counter()
    trainers["on"].step()  # the first step builds the cache
    build_s = time.perf_counter() - t0
    assert trainers["on"]._features.cache is not None, "the cache did not turn on"
    for _ in range(2):  # warm-up
        for trainer in trainers.values():
            trainer.step()
    times: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            for _ in range(steps):
                t = time.perf_counter()
                trainers[mode].step()
                times[mode].append(time.perf_counter() - t)
    model = trainers["off"].model
    row = {
        "size": size,
        "tower_params": params(model.vision_encoder),
        "decoder_params": params(model.transformer),
        "adapter_params": params(model.adapter),
        "tower_tokens": model.vision_encoder.num_tokens,
        "live_ms": 1e3 * statistics.median(times["off"]),
        "cached_ms": 1e3 * statistics.median(times["on"]),
        "cache_build_s": build_s,
        "steps_timed": len(times["off"]),
    }
    row["speedup"] = row["live_ms"] / row["cached_ms"]
    for trainer in trainers.values():
        trainer.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="steps per trainer per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("build/bench/bench_feature_cache.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rows.append(bench_size(size, Path(tmp), args.threads, args.steps, args.rounds))
    print(
        "| size | tower params | decoder params | tower tokens | live ms | cached ms "
        "| live / cached | cache build s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['size']} | {r['tower_params'] / 1e6:.2f}M | {r['decoder_params'] / 1e6:.2f}M "
            f"| {r['tower_tokens']} | {r['live_ms']:.1f} | {r['cached_ms']:.1f} "
            f"| {r['speedup']:.2f} | {r['cache_build_s']:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "steps": args.steps, "rounds": args.rounds}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
