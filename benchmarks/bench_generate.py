"""Batched greedy generation: tokens/s of every arch against a peer, identical tokens.

One process, the same inputs for everybody.  Model (``--size``): ``small`` = text dim
128, 2 layers, 4 heads, vocab 512 (the digits examples' decoder, where per-token
overhead dominates) or ``medium`` = dim 256, 4 layers, 8 heads, vocab 4096 (the size
of ``bench_vlm.py``; at batch 32 its decode steps are GEMM-bound), float32; a tiny
SigLIP tower (hidden 64, 2 layers, patch 4 on 32 px = 64 visual tokens) and an
``mlp_2layer`` adapter; one image per row, a 6-token prompt (``[BOS] + 5``),
left-padded to 8 when the prompts have different lengths (``--ragged``), ``--new`` (32)
new tokens, no EOS (every row runs to the end, so every row of every runner does the
same work).  Batch 1 and 32 (``--batch``).

Rows (``ours`` = ``VLMWrapper.generate``, the call ``vlm eval`` / ``vlm generate``
make; ``tokens/s`` = ``B * new / wall`` of the whole call: image encoding, prefill and
decode):

* ``joint_decoder`` vs ``LlavaForConditionalGeneration.generate`` (transformers, greedy,
  its default dynamic cache) on the folder :func:`vlm_train.hf_export.export_hf_llava`
  writes from our model (same weights; the prompt ``<image> * 64 + [BOS] + prompt``
  reproduces ours exactly).  The peer's generation config is greedy with no EOS, no
  suppressed token, and the loaded model's own ``generation_config`` is replaced by a
  bare one: ``generate`` fills every field its argument leaves ``None`` from the
  model's, and the exported one (EOS id 2, ``<image>`` suppressed) made a row that
  greedily produced id 2 stop there (pad after it: "different" tokens with bitwise
  equal logits) and ran a suppress-tokens processor every step.  So the tokens must be
  identical (checked).
* every arch vs ``legacy``: this package's previous per-token path (kept here only):
  a concatenating :class:`vlm_transformer.KVCache`, a full ``Transformer.forward`` per
  token (context validation, mask construction), ``sample_next_token`` with its
  checks, the output grown by ``torch.cat`` (``moma`` recomputes the whole sequence
  per token on both paths: it has no KV cache).
* ``cross_attention``: no ``MllamaForConditionalGeneration`` row.  Its vision side is a
  tiled encoder with gated positional embeddings whose weights have no counterpart
  in ours, and ``MllamaForCausalLM.generate`` with precomputed ``cross_attention_states``
  needs Mllama's cross-attention masks rebuilt per step; mapping that faithfully is out
  of proportion, so cross_attention is compared with ``legacy`` only.
* ``--compile``: adds ``joint_decoder, compile=True`` (Inductor on the one-token step,
  static shapes); the first call's wall time (compilation) is reported separately.

Columns: ``ratio`` = the runner's median time / ours (> 1: we are faster); ``same`` =
its tokens equal ours; when they do not, the row says how many tokens in how many rows
differ and, at the earliest divergence, the gap between the logits our model (one full
forward over the shared history) gives our token and the runner's: ~1e-6 is a near-tie
broken by float rounding, a large gap a real difference (:func:`divergence`).

Timing: ``--warmup`` untimed calls per runner, then ``--reps`` timed rounds in which
the runners of one arch alternate (rotating order); medians.  ``cpu ratio`` is the same
ratio of the process's CPU time (``time.process_time``), which leaves out the time the
process waited for a core: steadier than wall time on a machine shared with other jobs.  Threads:
``--threads`` (default 1, ``torch.set_num_threads``; set ``OMP_NUM_THREADS`` to the same
value).  ``--profile``: one more call per runner under ``torch.profiler``, split into
matmuls (with their GFLOP/s), attention kernels, ``cat`` / copies, other ops and the
time outside ops (:func:`profile_call`).  Writes ``build/bench/bench_generate_<size>.json``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_generate.py`` (or ``nox -s bench``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from vlm_config import JobConfig
from vlm_strategies import VLMWrapper, build_vlm
from vlm_transformer import KVCache, ModalityContext, sample_next_token
from vlm_transformer.generate import _with_padding

SIZES: dict[str, dict[str, int]] = {
    # the digits examples' decoder width and depth (per-token overhead dominates)
    "small": {"dim": 128, "n_layers": 2, "n_heads": 4, "vocab_size": 512},
    # benchmarks/bench_vlm.py's size (batch-32 decode steps are GEMM-bound on a CPU)
    "medium": {"dim": 256, "n_layers": 4, "n_heads": 8, "vocab_size": 4096},
}
SIZE = dict(SIZES["medium"])
VOCAB = 512  # prompt ids are drawn below the smallest vocabulary
TOWER = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "image_size": 32,
    "patch_size": 4,
}
ARCHS: dict[str, dict[str, Any]] = {
    "joint_decoder": {"arch": "joint_decoder"},
    "cross_attention": {"arch": "cross_attention", "cross_attention_every_n_layers": 2},
    "mot": {"arch": "mot"},
    "moma": {"arch": "moma", "experts_per_modality": 4},
}


def job_config(arch: dict[str, Any]) -> JobConfig:
    return JobConfig.model_validate(
        {
            "model": {**SIZE, "max_seq_len": 256},
            "encoder": {"type": "siglip", "tower": TOWER},
            "adapter": {"type": "mlp_2layer"},
            "arch": {"max_text_len": 64, **arch},
        }
    )


def build(arch: dict[str, Any], seed: int = 0) -> VLMWrapper:
    """Our model with non-trivial weights (init, then N(0, 0.02^2) noise on everything)."""
    torch.manual_seed(seed)
    model = build_vlm(job_config(arch))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


@torch.no_grad()
def legacy_generate(
    model: nn.Module,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    context: ModalityContext | None = None,
    decode_context_fn: Any = None,
    use_cache: bool = True,
    **_: Any,
) -> Tensor:
    """The previous ``vlm_transformer.generate`` loop (greedy), as it was before the
    batched fast path: growing cache, full ``forward`` and ``torch.cat`` per token."""
    batch = input_ids.shape[0]
    valid = None if attention_mask is None else attention_mask.bool()
    if valid is not None and bool(valid.all()):
        valid = None

    def padded(ctx: ModalityContext | None, v: Tensor | None) -> ModalityContext | None:
        if v is None:
            return ctx
        if ctx is None:
            return ModalityContext(key_padding_mask=v)
        ones = torch.ones(batch, ctx.prefix_len, dtype=torch.bool)
        return ModalityContext(
            **{
                f: getattr(ctx, f)
                for f in ("prefix_embeds", "image_features", "image_mask", "modality_ids")
            },
            key_padding_mask=torch.cat((ones, v), 1),
        )

    eos = torch.tensor([] if eos_token_id is None else [eos_token_id])
    pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
    cache = KVCache() if use_cache else None
    seq = input_ids
    finished = torch.zeros(batch, dtype=torch.bool)
    logits = model(input_ids, padded(context, valid), cache, logits_to_keep=1)[:, -1]
    for step in range(1, max_new_tokens + 1):
        token = sample_next_token(logits, temperature=0.0)
        token = torch.where(finished, torch.full_like(token, pad), token)
        seq = torch.cat((seq, token[:, None]), dim=1)
        if eos_token_id is not None:
            finished = finished | torch.isin(token, eos)
            if bool(finished.all()):
                break
        if step == max_new_tokens:
            break
        if cache is not None:
            new = token[:, None]
            ctx = None if decode_context_fn is None else decode_context_fn(step, new, cache)
            logits = model(new, ctx, cache, logits_to_keep=1)[:, -1]
        else:
            ctx = decode_context_fn(step, seq, None) if decode_context_fn else context
            v = None if valid is None else torch.cat((valid, torch.ones(batch, step).bool()), 1)
            logits = model(seq, padded(ctx, v), None, logits_to_keep=1)[:, -1]
    return seq


def inputs(batch: int, ragged: bool, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``pixels (B,3,32,32)``, left-padded ``prompts (B,S)`` (``[BOS]=1`` first, then ids
    >= 100: never the exported ``<image>`` id) and their mask."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, 32, 32, generator=g)
    lengths = [6 - (r % 3 if ragged else 0) for r in range(batch)]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, width - n] = 1
        ids[r, width - n + 1 :] = torch.randint(100, VOCAB, (n - 1,), generator=g)
        mask[r, width - n :] = 1
    return pixels, ids, mask


def ours_runner(
    model: VLMWrapper, pixels: Tensor, ids: Tensor, mask: Tensor, new: int, **kw: Any
) -> Callable[[], Tensor]:
    def run() -> Tensor:
        out = model.generate(pixels, ids, attention_mask=mask, max_new_tokens=new, **kw)
        return out[:, ids.shape[1] :]

    return run


def legacy_runner(
    model: VLMWrapper, pixels: Tensor, ids: Tensor, mask: Tensor, new: int
) -> Callable[[], Tensor]:
    inner = ours_runner(model, pixels, ids, mask, new)

    def run() -> Tensor:
        with mock.patch("vlm_strategies.wrapper._generate", legacy_generate):
            return inner()

    return run


def llava_runner(
    model: VLMWrapper, folder: Path, pixels: Tensor, ids: Tensor, mask: Tensor, new: int
) -> Callable[[], Tensor]:
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    image_id = int(llava.config.image_token_index)
    n_img = model.num_image_tokens
    # Llava: the image placeholders go after the left padding, before [BOS] + prompt
    width = ids.shape[1]
    rows, masks = [], []
    for r in range(ids.shape[0]):
        n_pad = int((mask[r] == 0).sum())
        body = torch.cat((torch.full((n_img,), image_id), ids[r, n_pad:]))
        rows.append(torch.cat((torch.zeros(n_pad, dtype=torch.long), body)))
        masks.append(torch.cat((torch.zeros(n_pad, dtype=torch.long), torch.ones(len(body)))))
    hf_ids, hf_mask = torch.stack(rows), torch.stack(masks).long()
    assert hf_ids.shape[1] == width + n_img
    config = GenerationConfig(
        max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True
    )
    # ``generate`` fills every field the call leaves ``None`` from the model's own
    # generation config (seen with transformers 5.24): with the exported one (eos 2, suppress
    # ``<image>``) a row that greedily produced id 2 stopped there and got pad after it,
    # and a suppress-tokens processor ran on every step.  Replace it, so that no EOS and
    # no logits processor apply to the peer either.
    llava.generation_config = GenerationConfig(pad_token_id=0)

    @torch.no_grad()
    def run() -> Tensor:
        out = llava.generate(
            input_ids=hf_ids,
            attention_mask=hf_mask,
            pixel_values=pixels,
            generation_config=config,
        )
        return out[:, hf_ids.shape[1] :]  # type: ignore[no-any-return]

    return run


def export_llava(model: VLMWrapper, folder: Path) -> Path:
    from vlm_train.hf_export import export_hf_llava
    from vlm_train.tokenizer import TextTokenizer

    tok = TextTokenizer.train(["zero one two three four five six seven eight nine"])
    return export_hf_llava(model, job_config(ARCHS["joint_decoder"]), tok, folder)


@torch.no_grad()
def divergence(
    model: VLMWrapper, pixels: Tensor, ids: Tensor, mask: Tensor, ours: Tensor, other: Tensor
) -> dict[str, Any]:
    """Where ``other`` (B, T) departs from ``ours`` (B, T): how many tokens and rows
    differ, the first divergence (row with the earliest one) and, there, the gap between
    the logits our model gives (one full forward over the shared history) to our token and
    to the other runner's: about 1e-6 for a near-tie broken by float rounding, large for
    a real difference (mapping, masks, positions)."""
    diff = ours != other
    if not bool(diff.any()):
        return {"tokens_differing": 0}
    firsts = [
        int(diff[r].nonzero()[0]) if bool(diff[r].any()) else ours.shape[1]
        for r in range(len(diff))
    ]
    row = min(range(len(firsts)), key=firsts.__getitem__)
    step = firsts[row]
    seq = torch.cat((ids[row : row + 1], ours[row : row + 1, :step]), dim=1)
    valid = torch.cat((mask[row : row + 1], torch.ones(1, step, dtype=mask.dtype)), dim=1).bool()
    ctx = model.strategy.prepare(model, pixels[row : row + 1], seq, None)
    logits = model.transformer(
        seq, _with_padding(ctx, None if bool(valid.all()) else valid, 1), logits_to_keep=1
    )[0, -1]
    a, b = int(ours[row, step]), int(other[row, step])
    return {
        "tokens_differing": int(diff.sum()),
        "rows_differing": int(diff.any(dim=1).sum()),
        "first_row": row,
        "first_step": step,
        "logit_gap": float(logits[a] - logits[b]),
    }


_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkl::_mkl_linear")


def profile_call(run: Callable[[], Tensor]) -> dict[str, float]:
    """One call under ``torch.profiler``: self CPU time (ms) of its matmuls (and their
    GFLOP/s), attention kernels, ``cat`` / copies, every other op, and the rest of the
    wall time (Python, dispatch, the profiler's own overhead)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t = time.perf_counter()
        run()
        wall = time.perf_counter() - t
    out = {"matmul": 0.0, "attention": 0.0, "cat_copy": 0.0, "other_ops": 0.0, "flops": 0.0}
    for evt in prof.key_averages():
        ms = evt.self_cpu_time_total / 1e3
        if evt.key in _MATMUL:
            out["matmul"] += ms
            out["flops"] += float(evt.flops or 0)
        elif "scaled_dot_product" in evt.key:
            out["attention"] += ms
        elif evt.key in ("aten::cat", "aten::copy_", "aten::index_copy_"):
            out["cat_copy"] += ms
        elif evt.key.startswith("aten::"):
            out["other_ops"] += ms
    out["wall"] = wall * 1e3
    ops = out["matmul"] + out["attention"] + out["cat_copy"] + out["other_ops"]
    out["outside_ops"] = max(out["wall"] - ops, 0.0)
    out["matmul_gflops"] = out["flops"] / max(out["matmul"], 1e-9) / 1e6
    return out


def time_group(runners: dict[str, Callable[[], Tensor]], warmup: int, reps: int) -> dict[str, Any]:
    tokens: dict[str, Tensor] = {}
    first: dict[str, float] = {}
    for name, run in runners.items():
        t = time.perf_counter()
        tokens[name] = run()
        first[name] = time.perf_counter() - t
        for _ in range(warmup - 1):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            t, c = time.perf_counter(), time.process_time()
            runners[name]()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {
        name: {
            "median_s": statistics.median(ts),
            "median_cpu_s": statistics.median(cpu[name]),
            "first_call_s": first[name],
            "tokens": tokens[name],
        }
        for name, ts in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ragged", action="store_true", help="left-padded prompts")
    parser.add_argument("--compile", action="store_true", help="add a compile=True row")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one call per runner (op classes)"
    )
    parser.add_argument("--out", default=None, help="default build/bench/bench_generate_SIZE.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    SIZE.clear()
    SIZE.update(SIZES[args.size])
    results: list[dict[str, Any]] = []
    print(
        f"size={args.size} {SIZE} threads={args.threads} new={args.new} reps={args.reps} "
        f"ragged={args.ragged}"
    )
    header = (
        f"{'arch':<16}{'B':>4}  {'runner':<24}{'tok/s':>10}{'median s':>10}  ratio"
        f"{'cpu ratio':>10}  same"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            model = build(ARCHS[arch])
            folder = export_llava(model, Path(tmp) / "llava") if arch == "joint_decoder" else None
            for batch in (int(b) for b in args.batch.split(",")):
                pixels, ids, mask = inputs(batch, args.ragged)
                runners: dict[str, Callable[[], Tensor]] = {
                    "ours": ours_runner(model, pixels, ids, mask, args.new),
                    "legacy": legacy_runner(model, pixels, ids, mask, args.new),
                }
                if folder is not None:
                    runners["llava (transformers)"] = llava_runner(
                        model, folder, pixels, ids, mask, args.new
                    )
                if args.compile and arch == "joint_decoder":
                    runners["ours, compile=True"] = ours_runner(
                        model, pixels, ids, mask, args.new, compile=True
                    )
                res = time_group(runners, args.warmup, args.reps)
                ref = res["ours"]
                for name, r in res.items():
                    tps = batch * args.new / r["median_s"]
                    same = torch.equal(r["tokens"], ref["tokens"])
                    div = divergence(model, pixels, ids, mask, ref["tokens"], r["tokens"])
                    ratio = r["median_s"] / ref["median_s"]  # peer time / ours = our speedup
                    cpu_ratio = r["median_cpu_s"] / ref["median_cpu_s"]
                    note = (
                        ""
                        if same
                        else f"  ({div['tokens_differing']} tokens in {div['rows_differing']} "
                        f"rows differ; first: row {div['first_row']} step {div['first_step']}, "
                        f"our logit gap there {div['logit_gap']:.2e})"
                    )
                    print(
                        f"{arch:<16}{batch:>4}  {name:<24}{tps:>10.1f}{r['median_s']:>10.4f}"
                        f"  {ratio:5.2f}{cpu_ratio:10.2f}  {same}{note}"
                        + (f"  (first call {r['first_call_s']:.1f}s)" if "compile" in name else "")
                    )
                    prof = profile_call(runners[name]) if args.profile else None
                    if prof is not None:
                        w = prof["wall"]
                        print(
                            f"{'':<22}profiled call {w:.0f} ms: "
                            + ", ".join(
                                f"{k} {prof[k]:.0f} ms ({prof[k] / w:.0%})"
                                for k in ("matmul", "attention", "cat_copy", "other_ops")
                            )
                            + f", outside ops {prof['outside_ops']:.0f} ms; "
                            f"matmul {prof['matmul_gflops']:.0f} GFLOP/s"
                        )
                    results.append(
                        {
                            "profile": prof,
                            "arch": arch,
                            "batch": batch,
                            "runner": name,
                            "tokens_per_s": tps,
                            "median_s": r["median_s"],
                            "first_call_s": r["first_call_s"],
                            "time_over_ours": ratio,
                            "median_cpu_s": r["median_cpu_s"],
                            "cpu_time_over_ours": cpu_ratio,
                            "tokens_equal_ours": same,
                            "divergence": div,
                        }
                    )
    out = Path(args.out or f"build/bench/bench_generate_{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
