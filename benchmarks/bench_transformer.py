"""Training-step benchmark: vlm_transformer.Transformer vs Hugging Face LlamaForCausalLM.

Both models get the identical config and identical weights (the HF weights are
loaded into ours through ``vlm_transformer.hf``), the same batch, the same loss
(``F.cross_entropy`` on float32 logits, computed outside the model) and the same
optimizer (``torch.optim.AdamW`` with identical settings, ``foreach=True`` by default).
Steps of the two models alternate so that machine drift hits both equally.

    OMP_NUM_THREADS=2 python benchmarks/bench_transformer.py --threads 2

Prints the median step time, tokens/s, peak RSS growth during a step, and the
ratio HF / ours (> 1 means ours is faster). ``--profile`` adds a torch.profiler table
for one step of each.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from peak_rss import PeakRSS, rss_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--seq", type=int, default=192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--adamw", choices=["foreach", "fused", "for-loop"], default="foreach")
    p.add_argument("--hf-attn", default="sdpa", help="HF attn_implementation (sdpa|eager)")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm_config import ModelConfig
    from vlm_transformer import Transformer
    from vlm_transformer.hf import config_from_hf, from_hf_state_dict

    cfg = ModelConfig(
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_seq_len=max(args.seq, 512),
    )
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        attn_implementation=args.hf_attn,
    )
    hf = LlamaForCausalLM(hf_cfg).train()
    ours_cfg = config_from_hf(hf_cfg.to_dict())
    ours = Transformer(ours_cfg)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), ours_cfg))
    ours.train()
    n_params = sum(p.numel() for p in ours.parameters())

    opt_kw: dict[str, object] = {"lr": 1e-4, "weight_decay": 0.1, "betas": (0.9, 0.95)}
    if args.adamw == "foreach":
        opt_kw["foreach"] = True
    elif args.adamw == "fused":
        opt_kw["fused"] = True
    else:
        opt_kw["foreach"] = False
    opts = {
        "ours": torch.optim.AdamW(ours.parameters(), **opt_kw),  # type: ignore[arg-type]
        "hf": torch.optim.AdamW(hf.parameters(), **opt_kw),  # type: ignore[arg-type]
    }
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    forwards: dict[str, Callable[[], torch.Tensor]] = {
        "ours": lambda: ours(inputs),
        "hf": lambda: hf(input_ids=inputs, use_cache=False).logits,
    }

    def step(name: str) -> float:
        logits = forwards[name]()
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return float(loss.detach())

    first = {name: step(name) for name in ("ours", "hf")}
    for _ in range(args.warmup - 1):
        for name in ("ours", "hf"):
            step(name)

    times: dict[str, list[float]] = {"ours": [], "hf": []}
    growth: dict[str, int] = {"ours": 0, "hf": 0}
    for i in range(args.steps):
        for name in ("ours", "hf") if i % 2 == 0 else ("hf", "ours"):
            gc.collect()
            base = rss_bytes()
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - t0)
            growth[name] = max(growth[name], peak.peak - base)

    tokens = args.batch * args.seq
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, AdamW({args.adamw}), "
        f"HF attn={args.hf_attn}"
    )
    print(
        f"config: dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} "
        f"kv_heads={cfg.kv_heads} ffn={cfg.hidden_dim} vocab={cfg.vocab_size} "
        f"batch={args.batch} seq={args.seq} params={n_params / 1e6:.2f}M"
    )
    print(f"first-step loss: ours={first['ours']:.6f} hf={first['hf']:.6f}")
    print(
        f"{'model':<6} {'median step (ms)':>17} {'min (ms)':>9} {'tokens/s':>10} "
        f"{'peak RSS growth (MiB)':>22}"
    )
    med = {}
    for name in ("ours", "hf"):
        med[name] = statistics.median(times[name])
        print(
            f"{name:<6} {med[name] * 1e3:17.1f} {min(times[name]) * 1e3:9.1f} "
            f"{tokens / med[name]:10.0f} {growth[name] / 2**20:22.1f}"
        )
    print(f"speedup (hf median / ours median): {med['hf'] / med['ours']:.2f}x")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("ours", "hf"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(name)
            print(f"\n=== profile: {name} ===")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
