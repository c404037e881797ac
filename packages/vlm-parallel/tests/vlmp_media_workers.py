"""Workers of ``test_media_distributed.py``: FSDP2 training on batches with images
anywhere, where one rank's micro-batches hold no image for the first steps.

Run as ``python vlmp_media_workers.py <rank> <world> <port> <outdir> <json-kwargs>``
(see :func:`launch`), or call :func:`w_text_only_rank` in-process (one process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from vlmp_workers import free_port, full_params, tiny_job_dict, wait_all, worker_env

torch.set_num_threads(1)

WORKER_TIMEOUT_S = 180
TEXT_ONLY_STEPS = 3  # rank 1's micro-batches hold no image for the first steps


def launch(world: int, outdir: Path, **kwargs: Any) -> list[Any]:
    """Run :func:`w_text_only_rank` in ``world`` fresh processes (gloo)."""
    outdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = worker_env()
    args = [str(world), str(port), str(outdir), json.dumps(kwargs)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    wait_all(procs, "text-only-rank workers", WORKER_TIMEOUT_S)
    return [torch.load(outdir / f"result_{r}.pt", weights_only=False) for r in range(world)]


def global_rows(step: int, model: Any, placeholder: int) -> list[tuple[torch.Tensor, int]]:
    """The 4 rows of global batch ``step``: ``(ids, images)``. Rows 0-1 go to rank 0,
    rows 2-3 to rank 1; rank 1's rows are text-only for the first
    :data:`TEXT_ONLY_STEPS` steps, then row 2 holds an image. Every row has the same
    length and its last 6 tokens are the only labels, so every rank has the same
    number of targets (the mean of the rank means is the global mean)."""
    gen = torch.Generator().manual_seed(100 + step)
    per_image = model.strategy.image_placeholders(model.num_image_tokens)
    length = 11 + per_image
    rows = []
    for r in range(4):
        has_image = r < 2 or (r == 2 and step >= TEXT_ONLY_STEPS)
        ids = torch.randint(0, placeholder, (length,), generator=gen)
        if has_image:
            ids[3 : 3 + per_image] = placeholder
        rows.append((ids, int(has_image)))
    return rows


def make_batch(rows: list[tuple[torch.Tensor, int]], placeholder: int, seed: int) -> Any:
    from vlm_strategies import MediaBatch

    ids = torch.stack([r[0] for r in rows])
    labels = torch.full_like(ids, -100)
    labels[:, -6:] = ids[:, -6:]
    index = [i for i, (_, n) in enumerate(rows) for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(index), 3, 16, 16, generator=gen)
    return MediaBatch(
        input_ids=ids,
        image_token_id=placeholder,
        pixel_values=pixels,
        image_sample_index=torch.tensor(index, dtype=torch.long),
        labels=labels,
    )


def w_text_only_rank(job: dict[str, Any], steps: int = 5) -> dict[str, Any]:
    """Losses (averaged over ranks) and final parameters of ``steps`` AdamW steps."""
    import torch.distributed as tdist

    from vlm_config import JobConfig
    from vlm_parallel import build_parallel_vlm, init_distributed

    job_cfg = JobConfig.model_validate(job)
    ctx = init_distributed(job_cfg.parallel)
    model = build_parallel_vlm(job_cfg, ctx, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    placeholder = job_cfg.model.vocab_size - 1
    losses, images_seen = [], []
    for step in range(steps):
        rows = global_rows(step, model, placeholder)
        # the images of the global batch, drawn once so every world size sees the same
        pixels_all = make_batch(rows, placeholder, seed=step).pixel_values
        per = len(rows) // ctx.world_size
        mine = rows[ctx.rank * per : (ctx.rank + 1) * per]
        before = sum(n for _, n in rows[: ctx.rank * per])
        batch = make_batch(mine, placeholder, seed=step)
        count = sum(n for _, n in mine)
        assert pixels_all is not None and batch.pixel_values is not None
        batch = type(batch)(
            **{**batch.__dict__, "pixel_values": pixels_all[before : before + count]}
        )
        images_seen.append(count)
        loss = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.detach().clone()
        if ctx.distributed:
            tdist.all_reduce(value)
            value /= ctx.world_size
        losses.append(float(value))
    return {"losses": losses, "images": images_seen, "final": full_params(model)}


def _main(argv: list[str]) -> None:
    rank, world, port, outdir, kwargs = argv
    os.environ.update(
        {
            "RANK": rank,
            "LOCAL_RANK": rank,
            "WORLD_SIZE": world,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
    )
    result = w_text_only_rank(**json.loads(kwargs))
    torch.save(result, Path(outdir) / f"result_{rank}.pt")
    from vlm_parallel import destroy_distributed

    destroy_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see vlmp_workers._main


if __name__ == "__main__":
    _main(sys.argv[1:])


__all__ = ["launch", "tiny_job_dict", "w_text_only_rank"]
